"""dvsa's local shuffle buffer: every row once per pass, whole rows (columns kept together), a
seeded uniform draw that mixes blocks, and memory bounded by the blocks it holds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dvsa.ingest.row_shuffle import RowShuffleBuffer, shuffled_batches


def _blocks(n_blocks: int, rows: int, start: int = 0) -> list[dict]:
    """Blocks whose every column encodes the row's id, so a torn row is visible."""
    out = []
    for b in range(n_blocks):
        ids = np.arange(start + b * rows, start + (b + 1) * rows, dtype=np.int64)
        out.append({"image_id": ids,
                    "images": np.broadcast_to((ids % 251).astype(np.uint8)[:, None, None, None],
                                              (rows, 3, 4, 4)).copy(),
                    "boxes": np.repeat(ids.astype(np.float32)[:, None, None], 4, axis=2).repeat(2, axis=1),
                    "jpeg": np.array([f"jpg{i}".encode() for i in ids], dtype=object)})
    return out


def _check_rows(batch: dict) -> None:
    ids = batch["image_id"]
    assert (batch["images"] == (ids % 251).astype(np.uint8)[:, None, None, None]).all()
    assert (batch["boxes"] == ids.astype(np.float32)[:, None, None]).all()
    assert list(batch["jpeg"]) == [f"jpg{i}".encode() for i in ids]


@pytest.mark.parametrize("rows,size,batch", [(128, 256, 32), (50, 64, 32), (7, 300, 16), (128, 1, 32)])
def test_every_row_once_whole_and_the_last_batch_short(rows, size, batch):
    blocks = _blocks(23, rows)
    out = list(shuffled_batches(iter(blocks), size, batch, seed=3))
    ids = np.concatenate([b["image_id"] for b in out])
    assert sorted(ids.tolist()) == list(range(23 * rows))          # every row exactly once
    assert all(len(b["image_id"]) == batch for b in out[:-1]) and 0 < len(out[-1]["image_id"]) <= batch
    for b in out:
        _check_rows(b)
    dropped = list(shuffled_batches(iter(blocks), size, batch, seed=3, drop_last=True))
    assert all(len(b["image_id"]) == batch for b in dropped)
    assert len(dropped) == (23 * rows) // batch


def test_seeded_draws_mix_blocks_and_differ_by_seed():
    blocks = _blocks(40, 128)
    a = [b["image_id"].tolist() for b in shuffled_batches(iter(blocks), 256, 32, seed=1)]
    assert a == [b["image_id"].tolist() for b in shuffled_batches(iter(blocks), 256, 32, seed=1)]
    b = [x["image_id"].tolist() for x in shuffled_batches(iter(blocks), 256, 32, seed=2)]
    assert a != b
    # the first batch draws from the first 256 + 32 rows (three blocks), not the first 32 rows
    assert set(a[0]) <= set(range(384)) and len({i // 128 for i in a[0]}) >= 2
    # drawn uniformly: over a pass, how far a row moves from its read position is spread wide,
    # and each batch mixes several blocks
    position = {i: k for k, batch in enumerate(a) for i in batch}
    moved = np.array([position[i] - i // 32 for i in range(40 * 128)])
    assert moved.std() > 3 and np.abs(moved).mean() > 2
    assert np.mean([len({i // 128 for i in batch}) for batch in a]) > 2.5


def test_the_buffer_holds_a_bounded_number_of_blocks():
    buffer = RowShuffleBuffer(256, 32, seed=0)
    held = []
    for block in _blocks(200, 128):
        buffer.add(block)
        held.append(buffer.held_blocks)
        for batch in buffer.ready():
            _check_rows(batch)
        assert len(buffer) < 256 + 32 + 128
    assert buffer.max_blocks == 2 * 3 + 2 and max(held) <= buffer.max_blocks
    left = len(buffer)
    rest = list(buffer.drain())
    assert sum(len(b["image_id"]) for b in rest) == left and buffer.held_blocks == 0


def test_uniformity_of_the_draw():
    # with a buffer as large as the data, each batch is a uniform sample of all rows
    counts: Counter = Counter()
    for seed in range(300):
        first = next(shuffled_batches(iter(_blocks(4, 16)), 64, 8, seed=seed))
        counts.update(first["image_id"].tolist())
    expected = 300 * 8 / 64
    assert set(counts) == set(range(64))
    assert max(abs(c - expected) for c in counts.values()) < 5 * expected ** 0.5


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        RowShuffleBuffer(0, 32)
    with pytest.raises(ValueError):
        RowShuffleBuffer(256, 0)
    assert list(shuffled_batches(iter([]), 256, 32)) == []
    assert list(shuffled_batches(iter([{"image_id": np.zeros(0, np.int64)}]), 256, 32)) == []


def test_a_block_is_let_go_once_its_rows_are_drawn():
    import gc
    import weakref

    blocks = _blocks(30, 64)
    first = weakref.ref(blocks[0]["images"])
    buffer = RowShuffleBuffer(128, 32, seed=0)
    source = iter(blocks)
    del blocks
    buffer.add(next(source))
    for block in source:
        buffer.add(block)
        list(buffer.ready())
    list(buffer.drain())
    del block, source
    gc.collect()
    assert buffer.held_blocks == 0 and first() is None      # not kept alive as a template either
