"""``build_dataset``: a streaming Ray Dataset of fixed-shape batches for one split and row layout.

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

import zlib
from typing import Optional

from dvsa.config import Config
from dvsa.data.manifest import FeatureManifest, Manifest
from dvsa.data.shards import list_shards
from dvsa.errors import DataError
from dvsa.ingest.builder import BatchBuilder, ChunkedBatchBuilder, IngestSpec
from dvsa.ingest.counter import SkipCounter
from dvsa.ingest.samples import LAYOUTS
from dvsa.text import Vocab

# Read+decode tasks per decode slot (data.decode_concurrency): each task streams its share of
# the shards; one per slot measured cheaper per row and no slower than two (fewer task starts,
# fewer short blocks at task ends; docs/ingest.md, "Parity with the same decode").
READ_TASKS_PER_SLOT = 1


def resolve_layout(layout: str, cfg: Config) -> str:
    """The row layout: ``"caption"`` -> ``"caption_<cfg.caption.mode>"``; the names of
    :data:`dvsa.ingest.samples.LAYOUTS` pass."""
    if layout == "caption":
        return f"caption_{cfg.caption.mode}"
    if layout in LAYOUTS:
        return layout
    raise DataError(f"unknown row layout {layout!r} (allowed: caption, {', '.join(LAYOUTS)})")


def rows_per_image(layout: str, cfg: Config) -> int:
    """R (caption) or M (align): the box rows of each image."""
    if layout == "caption_region":
        return cfg.caption.max_regions_per_image
    if layout == "caption_fullframe":
        return 1
    return cfg.data.max_regions


def ingest_spec(layout: str, cfg: Config, *, seed: int = 0, epoch: int = 0, randomize: bool = True,
                feat_dim: int = 0) -> IngestSpec:
    """What :func:`build_dataset` does to each sample of ``layout`` (a resolved layout) under
    ``cfg``: rows, caption length, decoder, seeded draws (``randomize``: training) or the first
    ones. ``feat_dim``: D of ``cfg.data.features`` (0 for JPEG shards)."""
    return IngestSpec(layout=layout, image_size=cfg.data.image_size, rows=rows_per_image(layout, cfg),
                      max_len=cfg.data.max_len, seed=int(seed), epoch=int(epoch), randomize=bool(randomize),
                      decoder=cfg.data.jpeg_decoder, features=bool(cfg.data.features), feat_dim=int(feat_dim),
                      whole_image=bool(cfg.align.whole_image))


def caption_len(cfg) -> int:
    """T of caption ``inputs``/``targets``: ``data.max_len - 1`` (the sequence shifted by one)."""
    return cfg.data.max_len - 1


def dataset_paths(root: str, split: str) -> list[str]:
    """The ``{split}-NNNNNN.tar`` shards under ``root``; DataError when there are none."""
    paths = list_shards(str(root), split)
    if not paths:
        raise DataError(f"{root}: no {split} shards ({split}-NNNNNN.tar)")
    return paths


def expected_samples(root: str, split: str, features: bool = False) -> dict[str, int]:
    """Samples per shard file of ``split`` as the set's manifest records them (``{}`` for a set
    without one, e.g. shards written by hand): a shard that delivers fewer is reported."""
    try:
        m = FeatureManifest.read(root) if features else Manifest.read(root)
    except DataError:
        return {}
    return {s.name: s.samples for s in m.shards_of(split)}


def mix_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed from (seed, epoch), stable across processes (unlike ``hash``)."""
    return zlib.crc32(f"{int(seed)}:{int(epoch)}".encode())


def build_dataset(shards_root_or_url: str, split: str, layout: str, cfg: Config, vocab: Vocab, *, seed: int = 0,
                  epoch: int = 0, shuffle: Optional[bool] = None,
                  skip_counter: Optional[SkipCounter] = None, preserve_order: bool = False):
    """A streaming ``ray.data.Dataset`` of fixed-shape numpy rows for ``split`` and ``layout``.

    ``layout``: ``"align"``, ``"caption"`` (mode from ``cfg.caption.mode``), ``"caption_region"``
    or ``"caption_fullframe"``. When ``cfg.data.features`` is set, rows come from those feature
    shards (``feats`` column) instead of decoding JPEGs from ``shards_root_or_url``.
    ``shuffle`` (default: ``split == "train"``) turns on the seeded shard order and seeded
    random draws of regions/sentences, different every pass. ``skip_counter`` (created when
    None) counts skipped samples; it is also available as ``dataset.dvsa_skips``.
    ``preserve_order``: rows come out in read order (reproducible order across runs, at some
    throughput cost when one task is slow); always on for an unshuffled dataset (validation,
    test), whose batches would otherwise come out of Ray Data's format threads in any order.
    """
    import ray
    from ray.data import FileShuffleConfig

    from dvsa.ingest.shard_source import ShardDatasource

    layout = resolve_layout(layout, cfg)
    shuffle = (split == "train") if shuffle is None else bool(shuffle)
    features = cfg.data.features
    feat_dim = 0
    if features:
        fm = FeatureManifest.read(features)
        feat_dim = fm.feat_dim
        if fm.image_size != cfg.data.image_size:
            raise DataError(f"{features}: features were computed at image_size {fm.image_size}, "
                            f"config has data.image_size={cfg.data.image_size}")
        root, suffixes = features, ["npy", "json"]
    else:
        root, suffixes = shards_root_or_url, ["jpg", "json"]
    paths = dataset_paths(root, split)
    spec = ingest_spec(layout, cfg, seed=seed, epoch=epoch, randomize=shuffle, feat_dim=feat_dim)
    counter = skip_counter if skip_counter is not None else SkipCounter()

    file_shuffle = FileShuffleConfig(seed=mix_seed(seed, epoch), reseed_after_execution=True) if shuffle else None
    n = cfg.data.decode_concurrency
    chunk = cfg.data.decode_batch_size
    actors = cfg.data.decode_pool == "actors"
    # Read and decode in one task (see docs/ingest.md "Throughput" and "Parity"). Task pool:
    # the read tasks decode (ShardDatasource with a builder), each turning the samples of its
    # shards into blocks of exactly `chunk` rows (a shard's last rows carried into the next
    # shard's first chunk): a raw sample never crosses the object store, a shard costs no task
    # of its own, and with a chunk that is a multiple of the train batch size iter_batches
    # hands batches on as zero-copy slices instead of concatenating two blocks' pieces per
    # batch (a copy of every image in the train worker). READ_TASKS_PER_SLOT tasks per slot,
    # each streaming whole shards, cut the per-task start cost. With fewer shards than decode
    # slots such a read could not use every slot: the read is then split into raw blocks
    # decoded by separate map tasks. An actor pool reads in the actors: Ray Data fuses
    # Read -> MapBatches when the read is not split into more blocks than files
    # (override_num_blocks <= shards) and the map takes whole read blocks (batch_size=None);
    # unfused, actors holding every CPU would starve separate read tasks.
    fuse = actors or len(paths) >= n
    decode_in_read = fuse and not actors
    read_kw = {"override_num_blocks": min(len(paths), READ_TASKS_PER_SLOT * n)} if fuse else {}
    if decode_in_read:
        read_kw["concurrency"] = n
    # read_webdataset's reader, but a truncated shard becomes a counted, named skip (shard_source)
    source = ShardDatasource(paths, suffixes, expected=expected_samples(root, split, bool(features)),
                             shuffle=file_shuffle, chunk=chunk,
                             builder=BatchBuilder(spec, vocab, counter) if decode_in_read else None)
    ds = ray.data.read_datasource(source, **read_kw)
    if preserve_order or not shuffle:
        ds.context.execution_options.preserve_order = True
    # One output block per decoded chunk (a chunk is ~1.33x this target: emitted as it is,
    # neither merged with the next nor sliced), so a task streams its shards out in
    # chunk-row blocks: the first batch waits for one chunk, not for a whole shard.
    ds.context.target_max_block_size = max(1, int(0.75 * chunk * spec.row_bytes))
    if actors:
        ds = ds.map_batches(ChunkedBatchBuilder, fn_constructor_args=(spec, vocab, counter, chunk),
                            batch_size=None, batch_format="numpy", zero_copy_batch=True,
                            compute=ray.data.ActorPoolStrategy(size=n))
    elif not decode_in_read:
        ds = ds.map_batches(ChunkedBatchBuilder(spec, vocab, counter, chunk), batch_size=chunk,
                            batch_format="numpy", zero_copy_batch=True,
                            compute=ray.data.TaskPoolStrategy(size=n))
    ds.dvsa_skips = counter
    ds.dvsa_spec = spec
    return ds
