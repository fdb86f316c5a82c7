"""``build_dataset``: a streaming Ray Dataset of fixed-shape batches for one split and task.

Shuffling (training split): the shard files are read in a seeded random order that changes
every pass (``FileShuffleConfig(seed, reseed_after_execution=True)``), and the train worker
draws rows through a seeded local shuffle buffer (``iter_train_batches``). Both stream: no
pass materialises the dataset. ``Dataset.random_shuffle`` would give a true global shuffle
but moves every row through the object store (an all-to-all exchange: memory and time grow
with the dataset), so it is not used. The price: rows of one shard stay near each other
within a buffer's reach, so write shards from shuffled inputs (``dvsa prepare`` does) and
keep several shards per worker. Validation and test splits are read in order, unshuffled.
"""

from __future__ import annotations

import json
import posixpath
import zlib
from typing import Optional

from dvsa.errors import DataError
from dvsa.ingest.builder import BatchBuilder, IngestSpec
from dvsa.ingest.counter import SkipCounter
from dvsa.ingest.samples import TASKS

FEATURES_MANIFEST = "features.json"


def resolve_task(task: str, cfg) -> str:
    """``"caption"`` -> ``"caption_<cfg.caption.mode>"``; ``"align"`` and explicit names pass."""
    if task == "caption":
        return f"caption_{cfg.caption.mode}"
    if task in TASKS:
        return task
    raise DataError(f"unknown ingest task {task!r} (allowed: caption, {', '.join(TASKS)})")


def rows_per_image(task: str, cfg) -> int:
    """R (caption) or M (align): the box rows of each image."""
    if task == "caption_region":
        return cfg.caption.max_regions_per_image
    if task == "caption_fullframe":
        return 1
    return cfg.data.max_regions


def caption_len(cfg) -> int:
    """T of caption ``inputs``/``targets``: ``data.max_len - 1`` (the sequence shifted by one)."""
    return cfg.data.max_len - 1


def dataset_paths(root: str, split: str) -> list[str]:
    """The ``{split}-NNNNNN.tar`` shards under ``root``; DataError when there are none."""
    from dvsa.data.shards import list_shards

    paths = list_shards(str(root), split)
    if not paths:
        raise DataError(f"{root}: no {split} shards ({split}-NNNNNN.tar)")
    return paths


def load_features_manifest(root: str) -> dict:
    """``features.json`` of a feature-shard directory (written by ``dvsa features``)."""
    import fsspec

    path = posixpath.join(str(root).rstrip("/"), FEATURES_MANIFEST)
    try:
        with fsspec.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{root}: no {FEATURES_MANIFEST} (run `dvsa features` first)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def mix_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed from (seed, epoch), stable across processes (unlike ``hash``)."""
    return zlib.crc32(f"{int(seed)}:{int(epoch)}".encode())


def build_dataset(shards_root_or_url: str, split: str, task: str, cfg, vocab, *, seed: int = 0,
                  epoch: int = 0, shuffle: Optional[bool] = None,
                  skip_counter: Optional[SkipCounter] = None, preserve_order: bool = False):
    """A streaming ``ray.data.Dataset`` of fixed-shape numpy rows for ``split`` and ``task``.

    ``task``: ``"align"``, ``"caption"`` (mode from ``cfg.caption.mode``), ``"caption_region"``
    or ``"caption_fullframe"``. When ``cfg.data.features`` is set, rows come from those feature
    shards (``feats`` column) instead of decoding JPEGs from ``shards_root_or_url``.
    ``shuffle`` (default: ``split == "train"``) turns on the seeded shard order and seeded
    random draws of regions/sentences, different every pass. ``skip_counter`` (created when
    None) counts skipped samples; it is also available as ``dataset.dvsa_skips``.
    ``preserve_order``: rows come out in read order (reproducible order across runs, at some
    throughput cost when one task is slow).
    """
    import ray
    from ray.data import FileShuffleConfig

    task = resolve_task(task, cfg)
    shuffle = (split == "train") if shuffle is None else bool(shuffle)
    features = cfg.data.features
    feat_dim = 0
    if features:
        fm = load_features_manifest(features)
        feat_dim = int(fm["feat_dim"])
        if int(fm.get("image_size", cfg.data.image_size)) != cfg.data.image_size:
            raise DataError(f"{features}: features were computed at image_size {fm['image_size']}, "
                            f"config has data.image_size={cfg.data.image_size}")
        root, suffixes = features, ["npy", "json"]
    else:
        root, suffixes = shards_root_or_url, ["jpg", "json"]
    paths = dataset_paths(root, split)
    spec = IngestSpec(task=task, image_size=cfg.data.image_size, rows=rows_per_image(task, cfg),
                      max_len=cfg.data.max_len, seed=int(seed), epoch=int(epoch), randomize=shuffle,
                      decoder=cfg.data.jpeg_decoder, features=bool(features), feat_dim=feat_dim)
    counter = skip_counter if skip_counter is not None else SkipCounter()

    file_shuffle = FileShuffleConfig(seed=mix_seed(seed, epoch), reseed_after_execution=True) if shuffle else None
    ds = ray.data.read_webdataset(paths, decoder=None, suffixes=suffixes, shuffle=file_shuffle)
    if preserve_order:
        ds.context.execution_options.preserve_order = True
    n = cfg.data.decode_concurrency
    if cfg.data.decode_pool == "actors":
        ds = ds.map_batches(BatchBuilder, fn_constructor_args=(spec, vocab, counter),
                            batch_size=cfg.data.decode_batch_size, batch_format="numpy",
                            concurrency=n, zero_copy_batch=True)
    else:
        ds = ds.map_batches(BatchBuilder(spec, vocab, counter), batch_size=cfg.data.decode_batch_size,
                            batch_format="numpy", concurrency=n, zero_copy_batch=True)
    ds.dvsa_skips = counter
    ds.dvsa_spec = spec
    return ds
