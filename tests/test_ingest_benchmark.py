"""benchmarks/ingest.py compares like with like: its DataLoader arms make the rows the Ray arms'
builder makes, by the same per-sample work (box checks, the train split's seeded draws)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from dvsa.config import Config
from dvsa.data.shards import list_shards, load_vocab
from dvsa.ingest.builder import BatchBuilder
from dvsa.ingest.dataset import ingest_spec


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest.py"
    spec = importlib.util.spec_from_file_location("dvsa_bench_ingest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def shards(bench, tmp_path_factory):
    # 12 regions an image and 10 rows: the train split draws which 10, so the draw is tested;
    # 320x240 -> 64 px: the draft decode runs at half size
    root = bench.make_bench_shards(str(tmp_path_factory.mktemp("bench") / "shards"), 6, width=320, height=240,
                                   regions=12, shard_images=3)
    return root, load_vocab(root)


def _samples(root):
    import webdataset as wds

    return list(wds.WebDataset(list_shards(root, "train"), shardshuffle=False, empty_check=False))


def test_the_dataloader_arm_makes_the_ray_arms_rows_of_each_sample(bench, shards):
    root, vocab = shards
    cfg = Config().replace(**{"data.image_size": 64, "caption.max_regions_per_image": 10})
    spec = ingest_spec("caption_region", cfg, seed=0, epoch=0, randomize=True)
    assert spec.randomize and spec.rows == 10 and spec.max_len == cfg.data.max_len
    samples = _samples(root)
    assert len(samples) == 6
    arm = bench._WdsRows(spec, vocab, "pil")
    ray_rows = BatchBuilder(spec, vocab)({"__key__": np.array([s["__key__"] for s in samples], object),
                                          "jpg": np.array([s["jpg"] for s in samples], object),
                                          "json": np.array([s["json"] for s in samples], object)})
    loader_rows = bench._collate([arm(s) for s in samples])
    assert set(loader_rows) == set(ray_rows)
    for column, values in ray_rows.items():
        np.testing.assert_array_equal(loader_rows[column].numpy(), values, err_msg=column)
    # the draw is a seeded random subset, not the first 10 regions
    first = BatchBuilder(ingest_spec("caption_region", cfg, randomize=False), vocab)
    firsts = bench._collate([bench._WdsRows(first.spec, vocab, "pil")(s) for s in samples])
    assert not np.array_equal(firsts["boxes"].numpy(), loader_rows["boxes"].numpy())


def test_the_full_decode_baseline_differs_only_in_its_decode(bench, shards):
    root, vocab = shards
    cfg = Config().replace(**{"data.image_size": 64, "caption.max_regions_per_image": 10})
    spec = ingest_spec("caption_region", cfg, randomize=True)
    samples = _samples(root)
    draft = bench._collate([bench._WdsRows(spec, vocab, "pil")(s) for s in samples])
    full = bench._collate([bench._WdsRows(spec, vocab, "full")(s) for s in samples])
    for column in ("boxes", "box_mask", "inputs", "targets", "image_id"):
        np.testing.assert_array_equal(full[column].numpy(), draft[column].numpy(), err_msg=column)
    images_full, images_draft = full["images"].numpy(), draft["images"].numpy()
    assert images_full.shape == images_draft.shape == (6, 3, 64, 64)
    # a full-size decode, not the reduced one: close, but not the same pixels
    assert not np.array_equal(images_full, images_draft)
    assert np.abs(images_full.astype(int) - images_draft.astype(int)).mean() < 8
