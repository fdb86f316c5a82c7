"""Ray Data ingest: shapes, box mapping after resize, token encoding, seeded shuffling,
skipped-and-counted corrupt samples; on hand-written shards and on prepared synthetic ones."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dvsa.config import Config
from dvsa.data.shards import ShardWriter
from dvsa.ingest import build_dataset, decode_resize, iter_eval_batches, iter_train_batches, scale_boxes
from dvsa.ingest.builder import BatchBuilder, ChunkedBatchBuilder, IngestSpec
from dvsa.text import END, START, UNK, Vocab

S = 40  # data.image_size in these tests


def _jpeg(w: int, h: int, white_box=None) -> bytes:
    """A black w x h image, with a white rectangle at ``white_box`` (pixels) if given."""
    im = Image.new("RGB", (w, h), (0, 0, 0))
    if white_box is not None:
        x1, y1, x2, y2 = white_box
        im.paste((255, 255, 255), (x1, y1, x2, y2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


VOCAB = Vocab.build(Counter({"a": 9, "red": 8, "dog": 7, "the": 6, "cat": 5, "runs": 4}), 1, 20)
A, RED, DOG, THE, CAT, RUNS = (VOCAB.word_id(w) for w in ("a", "red", "dog", "the", "cat", "runs"))


def _meta(i: int, w: int, h: int, n_regions: int = 3, sentences=True, proposals=None) -> dict:
    regions = [{"id": 100 * i + j, "box": [10 * j, 20, 10 * j + 80, 60], "raw": "a red dog",
                "tokens": ["a", "red", "dog"] if j % 2 == 0 else ["the", "cat", "zebra"]}
               for j in range(n_regions)]
    m = {"image_id": i, "source": "vg", "split": "train", "width": w, "height": h, "regions": regions,
         "groups": [], "sentences": [{"raw": "the cat runs", "tokens": ["the", "cat", "runs"]},
                                     {"raw": "a dog", "tokens": ["a", "dog"]}] if sentences else []}
    if proposals is not None:
        m["proposals"] = proposals
    return m


def _cfg(**kw) -> Config:
    base = {"data.image_size": S, "data.max_len": 6, "caption.max_regions_per_image": 2,
            "data.max_regions": 3, "data.decode_batch_size": 4}
    base.update(kw)
    return Config().replace(**base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 train images (200x100) in several shards; image 5 a truncated JPEG, image 7 without
    region captions or sentences; 6 val images."""
    root = tmp_path_factory.mktemp("shards")
    with ShardWriter(str(root), "train", shard_bytes=6000) as w:
        for i in range(24):
            jpg = _jpeg(200, 100, white_box=(100, 50, 200, 100))
            if i == 5:
                jpg = jpg[: len(jpg) // 3]
            meta = _meta(i, 200, 100, n_regions=0 if i == 7 else 3, sentences=i != 7,
                         proposals=[[0, 0, 100, 50], [50, 50, 150, 100], [5, 5, 5, 9]] if i % 2 else None)
            w.write(f"img{i:04d}", jpg, meta)
    with ShardWriter(str(root), "val", shard_bytes=10 ** 9) as w:
        for i in range(100, 106):
            w.write(f"img{i:04d}", _jpeg(160, 160), _meta(i, 160, 160))
    VOCAB.save(str(root / "vocab.json"))
    return str(root)


# --------------------------------------------------------------------------- no Ray


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_decode_resize_maps_pixels_and_boxes(decoder):
    # white box in the lower-right quarter of a 200x100 image -> resized S x S
    img, (w, h) = decode_resize(_jpeg(200, 100, white_box=(100, 50, 200, 100)), S, decoder)
    assert img.shape == (3, S, S) and img.dtype == np.uint8 and (w, h) == (200, 100)
    # box (100,50,200,100) -> x * 40/200, y * 40/100 -> (20, 20, 40, 40) by hand
    np.testing.assert_allclose(scale_boxes([[100, 50, 200, 100]], w, h, S), [[20, 20, 40, 40]])
    assert img[:, 22:38, 22:38].min() > 200      # inside the mapped box: white
    assert img[:, 2:18, 2:18].max() < 50         # outside: black
    assert img[:, 2:18, 22:38].max() < 50


def test_scale_boxes_hand_computed_and_clipped():
    out = scale_boxes([[50, 20, 150, 80], [-10, 0, 250, 120]], 200, 100, 32)
    np.testing.assert_allclose(out, [[8.0, 6.4, 24.0, 25.6], [0.0, 0.0, 32.0, 32.0]], rtol=1e-6)


class _ListCounter:
    def __init__(self):
        self.counts = Counter()

    def add(self, counts, examples=None):
        self.counts.update(counts)


def _raw_batch(samples):
    return {"__key__": np.array([k for k, _, _ in samples], dtype=object),
            "jpg": np.array([j for _, j, _ in samples], dtype=object),
            "json": np.array([__import__("json").dumps(m).encode() for _, _, m in samples], dtype=object)}


def test_builder_caption_region_tokens_and_skips():
    counter = _ListCounter()
    spec = IngestSpec(layout="caption_region", image_size=S, rows=2, max_len=5, randomize=False)
    builder = BatchBuilder(spec, VOCAB, counter)
    good = _jpeg(200, 100)
    out = builder(_raw_batch([("k0", good, _meta(0, 200, 100)),
                              ("k1", good[:50], _meta(1, 200, 100)),         # corrupt JPEG
                              ("k2", good, _meta(2, 200, 100, n_regions=0))]))  # no region caption
    assert counter.counts == {"corrupt_image": 1, "no_region_caption": 1}
    assert out["images"].shape == (1, 3, S, S) and out["image_id"].tolist() == [0]
    # first 2 regions (no shuffle): "a red dog" and "the cat zebra" (zebra unknown), max_len 5
    # -> T = 4: inputs [START a red dog], targets [a red dog END]; [START the cat UNK] ...
    np.testing.assert_array_equal(out["inputs"][0], [[START, A, RED, DOG], [START, THE, CAT, UNK]])
    np.testing.assert_array_equal(out["targets"][0], [[A, RED, DOG, END], [THE, CAT, UNK, END]])
    # region boxes [0,20,80,60] and [10,20,90,60] on 200x100 -> x*0.2, y*0.4
    np.testing.assert_allclose(out["boxes"][0], [[0, 8, 16, 24], [2, 8, 18, 24]], rtol=1e-6)
    assert out["box_mask"].tolist() == [[True, True]]


def test_builder_truncates_long_captions_keeping_end():
    spec = IngestSpec(layout="caption_region", image_size=S, rows=1, max_len=3, randomize=False)
    out = BatchBuilder(spec, VOCAB)(_raw_batch([("k0", _jpeg(64, 64), _meta(0, 64, 64))]))
    # max_len 3: [START a END] -> inputs [START a], targets [a END]
    np.testing.assert_array_equal(out["inputs"][0], [[START, A]])
    np.testing.assert_array_equal(out["targets"][0], [[A, END]])


def test_builder_align_proposals_first_image_then_boxes():
    spec = IngestSpec(layout="align", image_size=S, rows=3, max_len=4, randomize=False)
    props = [[0, 0, 100, 50], [50, 50, 150, 100], [10, 10, 20, 20]]
    out = BatchBuilder(spec, VOCAB)(_raw_batch([("k0", _jpeg(200, 100), _meta(0, 200, 100, proposals=props)),
                                                ("k1", _jpeg(200, 100), _meta(1, 200, 100))]))
    # whole image first, then the first M-1 = 2 proposals; sample 2 falls back to region boxes
    np.testing.assert_allclose(out["boxes"][0], [[0, 0, 40, 40], [0, 0, 20, 20], [10, 20, 30, 40]])
    np.testing.assert_allclose(out["boxes"][1], [[0, 0, 40, 40], [0, 8, 16, 24], [2, 8, 18, 24]])
    assert out["box_mask"].all()
    # first sentence "the cat runs": word ids only, no START/END, T = max_len = 4
    np.testing.assert_array_equal(out["tokens"], [[THE, CAT, RUNS, 0]] * 2)
    assert out["lengths"].tolist() == [3, 3]


def test_chunked_builder_yields_chunks_like_the_batch_builder():
    spec = IngestSpec(layout="caption_region", image_size=S, rows=2, max_len=5, randomize=False)
    good = _jpeg(200, 100)
    samples = [(f"k{i}", good[:50] if i == 2 else good, _meta(i, 200, 100)) for i in range(7)]
    counter = _ListCounter()
    chunks = list(ChunkedBatchBuilder(spec, VOCAB, counter, chunk=3)(_raw_batch(samples)))
    # rows 0-2 (2 corrupt), 3-5, 6: chunk by chunk, each as BatchBuilder builds it
    assert [c["image_id"].tolist() for c in chunks] == [[0, 1], [3, 4, 5], [6]]
    whole = BatchBuilder(spec, VOCAB)(_raw_batch(samples))
    for k, v in whole.items():
        np.testing.assert_array_equal(np.concatenate([c[k] for c in chunks]), v)
    assert counter.counts == {"corrupt_image": 1}
    # every row skipped: one empty batch with the full schema (Ray Data keeps the columns)
    empty = list(ChunkedBatchBuilder(spec, VOCAB, chunk=3)(_raw_batch([("k9", good[:50], _meta(9, 200, 100))])))
    assert len(empty) == 1 and set(empty[0]) == set(whole) and empty[0]["images"].shape == (0, 3, S, S)
    with pytest.raises(ValueError):
        ChunkedBatchBuilder(spec, VOCAB, chunk=0)


def test_read_tasks_decode_chunks_across_shard_boundaries():
    # a read task's raw blocks of 3, 5 and 2 samples (three shards), a broken shard's marker
    # between the second and the third: chunks of exactly 4 built rows in read order (a shard's
    # last rows start the next chunk), the task's rest last; the marker counted, not a row
    import pandas as pd

    from dvsa.ingest.samples import ERROR_COLUMN, LOST_COLUMN, TRUNCATED_SHARD
    from dvsa.ingest.shard_source import decoded_blocks, marker

    spec = IngestSpec(layout="caption_region", image_size=S, rows=2, max_len=5, randomize=False)
    good = _jpeg(200, 100)
    samples = [(f"k{i}", good[:50] if i == 6 else good, _meta(i, 200, 100)) for i in range(10)]

    def frame(part):
        return pd.DataFrame({k: list(v) for k, v in _raw_batch(part).items()})

    broken = pd.DataFrame.from_records([marker("train-000002.tar", "ReadError: cut", 3)])
    counter = _ListCounter()
    blocks = list(decoded_blocks([frame(samples[:3]), frame(samples[3:8]), broken, frame(samples[8:])],
                                 BatchBuilder(spec, VOCAB, counter), chunk=4))
    assert [b["image_id"].tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 7], [8, 9]]
    whole = BatchBuilder(spec, VOCAB)(_raw_batch(samples))
    for k, v in whole.items():
        np.testing.assert_array_equal(np.concatenate([b[k] for b in blocks]), v)
    assert counter.counts == {"corrupt_image": 1, TRUNCATED_SHARD: 3}
    assert ERROR_COLUMN in broken and LOST_COLUMN in broken
    # nothing decodable: one empty batch with the full schema
    empty = list(decoded_blocks([frame(samples[6:7])], BatchBuilder(spec, VOCAB), chunk=4))
    assert len(empty) == 1 and set(empty[0]) == set(whole) and empty[0]["images"].shape == (0, 3, S, S)


def test_seeded_draws_are_uniform_subsets_the_same_in_every_process():
    import os
    import subprocess
    import sys

    from dvsa.ingest.samples import SampleDraws, select

    a = SampleDraws(7, 3, "vg_000001")
    assert [SampleDraws(7, 3, "vg_000001").subset(12, 10) for _ in range(3)] == [a.subset(12, 10)] * 3
    draws = [SampleDraws(0, 0, f"k{i}").subset(12, 10) for i in range(3000)]
    assert all(d == sorted(set(d)) and len(d) == 10 and 0 <= d[0] and d[-1] < 12 for d in draws)
    # every region is left out ~2/12 of the time; sampling error at 3000 draws is ~0.7%
    left_out = Counter(i for d in draws for i in set(range(12)) - set(d))
    assert all(abs(left_out[i] / 3000 - 2 / 12) < 0.03 for i in range(12)), left_out
    # a new pass or seed draws anew (two different 10-of-12 subsets of 1000 samples: all but never equal)
    def subsets(seed, pass_):
        return [SampleDraws(seed, pass_, f"k{i}").subset(12, 10) for i in range(1000)]
    assert sum(x != y for x, y in zip(subsets(0, 0), subsets(0, 1))) > 800
    assert sum(x != y for x, y in zip(subsets(0, 0), subsets(1, 0))) > 800
    indices = Counter(SampleDraws(0, 0, f"k{i}").index(5) for i in range(2000))
    assert set(indices) == set(range(5)) and min(indices.values()) > 300
    # the same draws in another process, whatever its hash seed (a read task, a DataLoader worker)
    code = ("from dvsa.ingest.samples import SampleDraws; "
            "print(SampleDraws(7, 3, 'vg_000001').subset(12, 10), SampleDraws(7, 3, 'vg_000001').index(5))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == f"{SampleDraws(7, 3, 'vg_000001').subset(12, 10)} {SampleDraws(7, 3, 'vg_000001').index(5)}"
    # a row of the train split draws its regions; the first ones otherwise
    meta = _meta(0, 100, 80, n_regions=12)
    drawn = select("caption_region", meta, 10, SampleDraws(0, 0, "s0"))
    first = select("caption_region", meta, 10, None)
    assert [b for _, b in first.boxes] == list(range(10))
    assert [b for _, b in drawn.boxes] == SampleDraws(0, 0, "s0").subset(12, 10)


def test_row_bytes_matches_a_built_row():
    for task, rows in (("caption_region", 2), ("align", 3)):
        spec = IngestSpec(layout=task, image_size=S, rows=rows, max_len=5, randomize=False)
        out = BatchBuilder(spec, VOCAB)(_raw_batch([("k0", _jpeg(64, 64), _meta(0, 64, 64))]))
        assert spec.row_bytes == sum(v.nbytes for v in out.values())


# --------------------------------------------------------------------------- on Ray


def _rows(ds_or_iter):
    return {k: np.asarray(v) for k, v in ds_or_iter.take_batch(10_000).items()}


def test_caption_region_dataset_shapes_and_skip_counts(ray_local, shards):
    ds = build_dataset(shards, "train", "caption", _cfg(), VOCAB, seed=3)
    rows = _rows(ds)
    assert set(rows) == {"images", "boxes", "box_mask", "inputs", "targets", "image_id"}
    n = len(rows["image_id"])
    assert n == 22 and sorted(rows["image_id"].tolist()) == [i for i in range(24) if i not in (5, 7)]
    assert rows["images"].shape == (n, 3, S, S) and rows["images"].dtype == np.uint8
    assert rows["boxes"].shape == (n, 2, 4) and rows["inputs"].shape == (n, 2, 5)
    assert rows["inputs"].dtype == np.int64 and rows["box_mask"].dtype == bool
    assert ds.dvsa_skips.counts() == {"corrupt_image": 1, "no_region_caption": 1}


def _plan_and_blocks(ds):
    """(the fused operator names of the executed plan, rows of every output block)."""
    sizes = [len(b["image_id"]) for b in ds.iter_batches(batch_size=None)]
    return [l.split(":")[0] for l in ds.stats().splitlines() if l.startswith("Operator ")], sizes


@pytest.mark.parametrize("pool", ["tasks", "actors"])
def test_read_and_decode_fuse_into_one_task_streaming_chunks(ray_local, shards, pool):
    # 12 train shards >= 2 decode slots: one operator that reads and decodes (tasks: the read
    # tasks decode; actors: Read fused into the actors' MapBatches), blocks of at most
    # data.decode_batch_size (4) rows, every row there
    cfg = _cfg(**{"data.decode_concurrency": 2, "data.decode_pool": pool})
    ds = build_dataset(shards, "train", "caption", cfg, VOCAB, seed=3)
    ops, sizes = _plan_and_blocks(ds)
    fused = "ReadShardDecode" if pool == "tasks" else "ReadShard->MapBatches(ChunkedBatchBuilder)"
    assert len(ops) == 1 and fused in ops[0], ops
    assert sum(sizes) == 22 and max(sizes) <= 4
    if pool == "tasks":   # chunks span shards (12 shards of 2): short blocks only at the end of each
        # of the 2 read tasks and where one of the 2 skipped samples was
        assert sum(size < 4 for size in sizes) <= 2 + 2, sizes
    # one val shard < 2 slots: tasks split the read into blocks decoded by separate map tasks;
    # actors still fuse (2 actors on 2 CPUs would starve separate read tasks); in order
    ds = build_dataset(shards, "val", "caption", cfg, VOCAB, seed=0)
    ops, sizes = _plan_and_blocks(ds)
    assert len(ops) == (1 if pool == "actors" else 2) and sum(sizes) == 6 and max(sizes) <= 4, ops
    assert [int(i) for b in iter_eval_batches(ds, batch_size=4) for i in b["image_id"]] == list(range(100, 106))


def test_fullframe_and_align_datasets(ray_local, shards):
    ff = _rows(build_dataset(shards, "train", "caption_fullframe", _cfg(), VOCAB, seed=0))
    n = len(ff["image_id"])
    assert n == 22 and ff["boxes"].shape == (n, 1, 4) and ff["inputs"].shape == (n, 1, 5)
    np.testing.assert_allclose(ff["boxes"][:, 0], np.tile([0, 0, S, S], (n, 1)))
    firsts = {tuple(r) for r in ff["inputs"][:, 0, :2]}
    assert firsts <= {(START, THE), (START, A)}

    al_ds = build_dataset(shards, "train", "align", _cfg(), VOCAB, seed=0)
    al = _rows(al_ds)
    assert al["boxes"].shape == (22, 3, 4) and al["tokens"].shape == (22, 6) and al["lengths"].shape == (22,)
    odd = al["image_id"] % 2 == 1          # these have proposals; the degenerate third is dropped
    np.testing.assert_allclose(al["boxes"][odd][:, 1:], np.tile([[0, 0, 20, 20], [10, 20, 30, 40]], (odd.sum(), 1, 1)))
    assert al_ds.dvsa_skips.counts() == {"corrupt_image": 1, "no_sentence": 1}


def test_the_process_that_runs_a_dataset_tunes_ray_datas_executor(ray_local, shards):
    """Ray Data starts every pass on an empty answer from its autoscaling coordinator (one task
    until the next step), refreshes its CPU limits once a second, and emits each block one
    scheduling step after it sees it (dvsa.ingest.warmup): whichever process unpickles a dvsa
    dataset to run it (the driver, Train's split coordinator) waits for the coordinator's first
    answer, refreshes unknown limits every 0.1 s (or as DVSA_RAY_DATA_LIMITS_REFRESH_S says) and
    known ones at Ray's 1 s, and fetches block metadata inline, unless its user set Ray's
    RAY_DATA_METADATA_PREFETCH_ON_THREAD."""
    ds = build_dataset(shards, "train", "caption_region", _cfg(), VOCAB, seed=0)

    class Executor:                    # a fresh process (its own runtime env), as an actor that runs a dataset
        def settings(self):
            import sys

            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                DefaultAutoscalingCoordinator,
            )
            from ray.data._internal.execution import metadata_fetcher
            from ray.data._internal.execution.resource_manager import ResourceManager
            interval = ResourceManager.__dict__["GLOBAL_LIMITS_UPDATE_INTERVAL_S"]
            return ((getattr(interval, "fast", interval), getattr(interval, "slow", interval)),
                    metadata_fetcher._PREFETCH_ON_THREAD,
                    getattr(DefaultAutoscalingCoordinator.get_reserved_resources, "dvsa_awaits_first", False),
                    "dvsa.ingest.shard_source" in sys.modules)

        def take(self, holder):
            return holder[0].take_batch(2, batch_format="numpy")["image_id"].shape, self.settings()[:3]

    def start(env):
        return ray_local.remote(num_cpus=0, runtime_env={"env_vars": env})(Executor).remote()

    ex = start({"DVSA_RAY_DATA_LIMITS_REFRESH_S": "0.2"})
    assert ray_local.get(ex.settings.remote()) == ((1, 1), True, False, False)      # Ray's own
    assert ray_local.get(ex.take.remote([ds])) == ((2,), ((0.2, 1.0), False, True))
    # the user's choice of Ray's switch stands
    mine = start({"RAY_DATA_METADATA_PREFETCH_ON_THREAD": "1"})
    assert ray_local.get(mine.take.remote([ds])) == ((2,), ((0.1, 1.0), True, True))
    from ray.data._internal.execution import metadata_fetcher
    from ray.data._internal.execution.interfaces.execution_options import ExecutionResources
    from ray.data._internal.execution.resource_manager import ResourceManager

    from dvsa.ingest.warmup import RefreshInterval, refresh_limits_often
    interval = ResourceManager.__dict__["GLOBAL_LIMITS_UPDATE_INTERVAL_S"]
    assert isinstance(interval, RefreshInterval) and (interval.fast, interval.slow) == (0.1, 1.0)   # this driver
    assert metadata_fetcher._PREFETCH_ON_THREAD is False
    # a resource manager reads the interval for its own limits: short until they are known
    manager = ResourceManager.__new__(ResourceManager)
    manager._global_limits = ExecutionResources.zero()
    assert manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 0.1
    manager._global_limits = ExecutionResources(cpu=2, object_store_memory=1e9)
    assert manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 1.0
    manager._global_limits = ExecutionResources(cpu=0, object_store_memory=1e9)   # known: no CPU left to Data
    assert manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 1.0
    assert refresh_limits_often() is not None                                      # applied again: Ray's 1 s kept
    assert ResourceManager.__dict__["GLOBAL_LIMITS_UPDATE_INTERVAL_S"].slow == 1.0


def test_a_pass_starts_on_the_coordinators_first_answer(ray_local):
    """Ray Data's coordinator client returns the answer cached from its previous question, so a
    pass's first question gets nothing. dvsa's waits for the first answer of each pass (up to
    FIRST_ANSWER_WAIT_S, once: a coordinator with nothing to give is not asked to wait again),
    and again after the pass ends (cancel_request empties the cache)."""
    import time

    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        DefaultAutoscalingCoordinator,
    )

    from dvsa.ingest import warmup

    assert warmup.await_first_reservation() is True           # applied on import, and idempotent
    reserved = {"node-1": {"CPU": 2.0}}

    @ray_local.remote(num_cpus=0)
    class Coordinator:                 # the coordinator actor's two calls the client makes here
        def __init__(self, answer, delay):
            self.answer, self.delay, self.asked = answer, delay, 0

        def get_reserved_resources(self, requester_id):
            self.asked += 1
            time.sleep(self.delay)
            return self.answer

        def cancel_request(self, requester_id):
            pass

        def questions(self):
            return self.asked

    def coordinator(answer, delay):    # started: its process's start-up is not the answer's time
        actor = Coordinator.remote(answer, delay)
        ray_local.get(actor.questions.remote())
        return actor

    client = DefaultAutoscalingCoordinator("pass-1", autoscaling_coordinator_actor=coordinator(reserved, 0.02))
    assert client.get_reserved_resources() == reserved          # Ray's client alone: {} (the empty cache)
    client.cancel_request()                                     # the pass ends
    assert client.get_reserved_resources() == reserved          # the next pass waits again

    empty = coordinator({}, 0.0)
    client = DefaultAutoscalingCoordinator("pass-2", autoscaling_coordinator_actor=empty)
    t = time.perf_counter()
    assert client.get_reserved_resources() == {}
    assert time.perf_counter() - t < 5 * warmup.FIRST_ANSWER_WAIT_S       # bounded by the wait
    asked = ray_local.get(empty.questions.remote())
    for _ in range(3):                                          # asked once per pass: no more waits
        assert client.get_reserved_resources() == {}
    assert ray_local.get(empty.questions.remote()) <= asked + 3

    saved, warmup.FIRST_ANSWER_WAIT_S = warmup.FIRST_ANSWER_WAIT_S, 0.0
    try:                                                        # 0: Ray's behaviour
        client = DefaultAutoscalingCoordinator("pass-3", autoscaling_coordinator_actor=coordinator(reserved, 0.0))
        assert client.get_reserved_resources() == {}
    finally:
        warmup.FIRST_ANSWER_WAIT_S = saved


def test_validation_is_unshuffled_and_whole(ray_local, shards):
    ds = build_dataset(shards, "val", "caption", _cfg(), VOCAB, seed=0)
    ids = [int(i) for b in iter_eval_batches(ds, batch_size=4) for i in b["image_id"]]
    assert ids == list(range(100, 106))


def _order(shards, seed, epoch, passes=1):
    ds = build_dataset(shards, "train", "caption_fullframe", _cfg(), VOCAB, seed=seed, epoch=epoch,
                       preserve_order=True)
    out = []
    for _ in range(passes):
        ids, sents = [], []
        for b in iter_train_batches(ds, batch_size=5, device="cpu", prefetch_batches=1, epoch=epoch,
                                    seed=seed, shuffle_buffer=8):
            ids += b["image_id"].tolist()
            sents += b["inputs"][:, 0, 1].tolist()
        out.append((ids, sents))
    return out


def test_seeded_shuffle_is_deterministic_and_changes_per_epoch(ray_local, shards):
    (a_ids, a_sents), = _order(shards, seed=7, epoch=0)
    (b_ids, b_sents), = _order(shards, seed=7, epoch=0)
    (c_ids, _), = _order(shards, seed=7, epoch=1)
    assert sorted(a_ids) == sorted(c_ids) == [i for i in range(24) if i not in (5, 7)]
    assert a_ids == b_ids and a_sents == b_sents       # same seed, same epoch: same order and draws
    assert a_ids != c_ids                              # another epoch: another order
    assert a_ids != sorted(a_ids)                      # actually shuffled


def test_one_dataset_iterated_twice_draws_new_sentences(ray_local, shards):
    (ids0, s0), (ids1, s1) = _order(shards, seed=1, epoch=0, passes=2)
    by0, by1 = dict(zip(ids0, s0)), dict(zip(ids1, s1))
    assert by0.keys() == by1.keys()
    assert by0 != by1                                  # a new pass, new seeded sentence draws


def test_prepared_synthetic_shards(ray_local, synth_world, tmp_path):
    from dvsa.data.manifest import Manifest
    from dvsa.data.prepare import PrepareOptions, VGSource, prepare_vg
    from dvsa.data.shards import iter_samples, load_vocab

    out = str(tmp_path / "vg")
    prepare_vg(VGSource(str(synth_world / "vg"), min_count=1), out, PrepareOptions(use_ray=False, progress=False))
    vocab = load_vocab(out)
    manifest = Manifest.read(out)
    cfg = _cfg(**{"data.max_len": 8, "caption.max_regions_per_image": 4})
    rows = _rows(build_dataset(out, "train", "caption", cfg, vocab, seed=0, shuffle=False))
    expected = {int(m["image_id"]): m for _, _, m in iter_samples(out, "train")}
    assert len(rows["image_id"]) == len(expected) > 0
    assert manifest.split_count("train", "images") == len(expected)
    for r in range(len(rows["image_id"])):
        meta = expected[int(rows["image_id"][r])]
        w, h = meta["width"], meta["height"]
        k = min(4, len(meta["regions"]))
        assert rows["box_mask"][r].sum() == k
        for j in range(k):
            reg = meta["regions"][j]
            x1, y1, x2, y2 = reg["box"]
            np.testing.assert_allclose(rows["boxes"][r, j], [x1 * S / w, y1 * S / h, x2 * S / w, y2 * S / h],
                                       rtol=1e-5, atol=1e-4)
            assert vocab.decode(rows["targets"][r, j]) == [t for t in reg["tokens"][:6] if t in vocab]


def test_batch_builder_imports_without_ray():
    """The GPU check and feature-free tools build batches with BatchBuilder on machines without
    Ray: importing the ingest package must not import Ray (the skip counter makes its actor on
    first use)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"
            "from dvsa.ingest.builder import BatchBuilder, IngestSpec\n"
            "from dvsa.ingest.dataset import resolve_layout, rows_per_image\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# --------------------------------------------------------------------------- data.jpeg_decoder=gpu


def _photo(w: int, h: int, seed: int) -> bytes:
    """Smooth gradients and a few shapes: a JPEG whose decoders differ only by rounding."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255 * rng.random()], -1)
    im = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        draw.ellipse([x, y, x + 30, y + 25], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


class _NumpyShard:
    """Stands for a Ray Data iterator: ``iter_batches(batch_format="numpy")`` of built rows."""

    def __init__(self, columns: dict):
        self.columns = columns

    def iter_batches(self, *, batch_size, batch_format, **_kwargs):
        assert batch_format == "numpy"
        n = len(self.columns["image_id"])
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.columns.items()}


def _built(decoder: str, samples) -> dict:
    spec = IngestSpec(layout="caption_region", image_size=S, rows=2, max_len=5, randomize=False, decoder=decoder)
    return BatchBuilder(spec, VOCAB, _ListCounter())(_raw_batch(samples))


def test_gpu_decoder_rows_carry_the_jpeg_bytes_and_the_same_boxes_and_tokens():
    samples = [(f"k{i}", _photo(200, 100, i), _meta(i, 200, 100)) for i in range(3)]
    truncated = samples[1][1][: len(samples[1][1]) // 2]
    samples.append(("bad", truncated, _meta(9, 200, 100)))
    counter = _ListCounter()
    spec = IngestSpec(layout="caption_region", image_size=S, rows=2, max_len=5, randomize=False, decoder="gpu")
    out = BatchBuilder(spec, VOCAB, counter)(_raw_batch(samples))
    ref = _built("pil", samples)
    assert counter.counts == {"corrupt_image": 1}              # the header check catches truncation
    assert "images" not in out and out["jpeg"].dtype == object
    assert list(out["jpeg"]) == [j for _, j, _ in samples[:3]]
    for k in ("boxes", "box_mask", "inputs", "targets", "image_id"):
        np.testing.assert_array_equal(out[k], ref[k])
    assert set(BatchBuilder(spec, VOCAB).empty()) == set(out)


def test_device_decode_gives_the_cpu_decoders_batch():
    """The gpu decoder's code path, run with device="cpu": the same batch as the torchvision
    decoder in Ray Data (exactly) and as the default PIL reduced-size decode (JPEG tolerance)."""
    samples = [(f"k{i}", _photo(200 + 40 * i, 100 + 30 * i, i), _meta(i, 200, 100)) for i in range(5)]
    jpeg_rows = _built("gpu", samples)
    batches = list(iter_train_batches(_NumpyShard(jpeg_rows), 3, "cpu", shuffle_buffer=0, jpeg_size=S))
    got = {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}
    torchvision_rows, pil_rows = _built("torchvision", samples), _built("pil", samples)
    assert set(got) == set(pil_rows) and got["images"].dtype == np.uint8
    np.testing.assert_array_equal(got["images"], torchvision_rows["images"])
    diff = np.abs(got["images"].astype(np.int16) - pil_rows["images"].astype(np.int16))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12, (diff.mean(), np.percentile(diff, 99))
    for k in ("boxes", "box_mask", "inputs", "targets", "image_id"):
        np.testing.assert_array_equal(got[k], pil_rows[k])


def test_device_decode_blackens_an_image_that_fails_inside_its_stream(caplog):
    from dvsa.ingest.decode import decode_jpeg_batch

    good = _photo(64, 48, 0)
    # header and markers intact, entropy-coded data replaced: passes jpeg_size, fails to decode
    start = good.index(b"\xff\xda")
    broken = good[:start] + b"\xff\xda\x00\x02" + b"\xff\xd9"
    out = decode_jpeg_batch([good, broken], 16, "cpu")
    assert out.shape == (2, 3, 16, 16) and out[0].float().mean() > 0 and int(out[1].abs().sum()) == 0
    assert "does not decode" in caplog.text


def test_gpu_decoder_through_ray_data(ray_local, shards):
    cfg = _cfg(**{"data.jpeg_decoder": "gpu"})
    ds = build_dataset(shards, "train", "caption", cfg, VOCAB, seed=3)
    batches = list(iter_train_batches(ds, 8, "cpu", shuffle_buffer=0, jpeg_size=S))
    assert sum(len(b["image_id"]) for b in batches) == 22
    assert all(b["images"].shape[1:] == (3, S, S) and "jpeg" not in b for b in batches)
    assert ds.dvsa_skips.counts() == {"corrupt_image": 1, "no_region_caption": 1}


# --------------------------------------------------------------------------- the shard reader


def _tar(path, members) -> None:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _webdataset_samples(path, suffixes):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def members(f):
        for m in tar_file_iterator(f):
            m["__url__"] = str(path)
            yield m

    with open(path, "rb") as f:
        return list(group_by_keys(members(f), suffixes=set(suffixes)))


def test_shard_reader_groups_members_as_webdataset_does(tmp_path):
    from dvsa.ingest.shard_source import group_samples, tar_members

    path = tmp_path / "train-000000.tar"
    _tar(path, [("__meta__.json", b"{}"), ("dir", None), ("a/k1.jpg", b"J1"), ("a/k1.json", b"{1}"),
                ("a/k1.TXT", b"t"), ("k2.seg.png", b"P"), ("k2.seg.json", b"{2}"), ("noext", b"x"),
                ("k3.json", b"{3}")])
    with open(path, "rb") as f:
        ours = list(group_samples(tar_members(f), str(path), {"jpg", "json", "txt"}))
    assert ours == _webdataset_samples(path, ["jpg", "json", "txt"])
    assert [s["__key__"] for s in ours] == ["__meta__", "a/k1", "k2", "k3"] and ours[1]["txt"] == b"t"
    # members of one key that are not adjacent: both readers refuse the shard
    _tar(path, [("k1.jpg", b"J"), ("k2.jpg", b"J"), ("k1.jpg", b"J"), ("k1.jpg", b"J")])
    with open(path, "rb") as f, pytest.raises(ValueError, match="duplicate file name"):
        list(group_samples(tar_members(f), str(path), {"jpg"}))
    with pytest.raises(ValueError, match="duplicate file name"):
        _webdataset_samples(path, ["jpg"])


def test_shard_reading_does_not_import_torch():
    """Ray worker processes that only read and decode shards never pay torch's import."""
    import subprocess
    import sys

    code = ("import sys, io\n"
            "from dvsa.ingest.shard_source import read_shard\n"
            "from dvsa.ingest.builder import ChunkedBatchBuilder\n"
            "list(read_shard(io.BytesIO(b''), 'x.tar', ['jpg'], 0))\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr[-2000:]
