"""Frozen-CNN features, computed once (a Ray Data batch-inference job), as feature shards.

Sweeps over the language model (captioner, sentence encoder) need not run the CNN again:
``dvsa features --config CFG --out DIR`` reads the image shards of ``data.shards``, decodes and
resizes every image exactly as training ingest does, runs the frozen encoder
(``dvsa.models.encoder.build_encoder(cfg.model)``) in an actor pool, and writes per split
``{split}-NNNNNN.tar`` holding, per image:

- ``KEY.npy``: ``float[K, D]`` (``np.save(..., allow_pickle=False)``): row 0 the whole image,
  then every region (``meta["regions"]`` order), then every proposal;
- ``KEY.json``: the sample's json (captions, regions, proposals...) with ``width``/``height``
  of the stored JPEG and ``features: {rows, dim}``;

beside ``features.json`` (feature dim, image size, model settings, counts per split, skipped
samples by reason) and a copy of ``vocab.json``. Training reads them with
``data.features=DIR``: :func:`dvsa.ingest.build_dataset` then yields ``feats`` columns.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from typing import Optional

import numpy as np

from dvsa.config import Config
from dvsa.data.manifest import FeatureManifest, FeatureSplit, ShardRecord
from dvsa.data.shards import (
    BAD_JSON,
    ChecksummedFile,
    list_shards,
    load_vocab,
    parse_row,
    shard_name,
    shard_temporary_name,
)
from dvsa.errors import DvsaError
from dvsa.files import Folder
from dvsa.ingest.counter import SkipCounter
from dvsa.ingest.dataset import dataset_paths
from dvsa.ingest.decode import CorruptImage, decode_resize, scale_boxes
from dvsa.ingest.samples import all_feature_boxes
from dvsa.ingest.torch_batches import normalize_images
from dvsa.models.encoder import FEAT_DIMS, build_encoder

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1000


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class FeatureEncoder:
    """Actor-pool callable: raw ``jpg``/``json`` batch -> ``key``, ``npy``, ``json`` byte columns."""

    def __init__(self, model_cfg, image_size: int, decoder: str, dtype: str, device: str,
                 counter: Optional[SkipCounter] = None, seed: int = 0):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        # Every actor builds the same encoder: with model.weights unset the frozen CNN is a
        # random one, identical across actors (and to build_encoder after the same seed).
        torch.manual_seed(seed)
        self.encoder = build_encoder(model_cfg).to(self.device).eval()
        self.image_size = image_size
        self.decoder = decoder
        self.dtype = np.dtype(dtype)
        self.counter = counter

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        keys, images, boxes, metas = [], [], [], []
        skipped, examples = Counter(), {}
        urls = batch.get("__url__")
        for i in range(len(batch["__key__"])):
            key, jpg, meta, detail = parse_row(batch, i)
            reason = BAD_JSON if meta is None else ""
            if not reason:
                try:
                    img, (w, h) = decode_resize(jpg, self.image_size, self.decoder)
                except CorruptImage as e:
                    reason, detail = "corrupt_image", str(e)
            if reason:
                skipped[reason] += 1
                examples.setdefault(reason, f"{key} ({urls[i] if urls is not None else '?'}): {detail}")
                log.warning("features: skipped %s: %s: %s", key, reason, detail)
                continue
            meta["width"], meta["height"] = w, h     # header size of the stored JPEG
            keys.append(key)
            images.append(img)
            boxes.append(scale_boxes(all_feature_boxes(meta, w, h), w, h, self.image_size))
            metas.append(meta)
        if skipped and self.counter is not None:
            self.counter.add(skipped, examples)
        if not keys:
            return {"key": np.array([], dtype=object), "npy": np.array([], dtype=object),
                    "json": np.array([], dtype=object)}
        with torch.inference_mode():
            x = normalize_images(torch.from_numpy(np.stack(images)).to(self.device))   # [B,3,S,S]
            feats = self.encoder(x, [torch.from_numpy(b) for b in boxes])              # [sum K, D]
        feats = feats.float().cpu().numpy().astype(self.dtype)
        out_npy, out_json, start = [], [], 0
        for meta, b in zip(metas, boxes):
            k = len(b)
            out_npy.append(npy_bytes(feats[start:start + k]))
            meta["features"] = {"rows": k, "dim": int(feats.shape[1])}
            out_json.append(json.dumps(meta, separators=(",", ":")).encode())
            start += k
        return {"key": np.array(keys, dtype=object), "npy": np.array(out_npy, dtype=object),
                "json": np.array(out_json, dtype=object)}


class FeatureShardWriter:
    """``{split}-NNNNNN.tar`` of ``KEY.npy`` + ``KEY.json`` (webdataset.TarWriter, raw bytes only),
    each written under a temporary name and renamed when complete."""

    def __init__(self, out: str, split: str, samples_per_shard: int):
        self.folder = Folder.of(out)
        self.folder.make()
        self.split, self.per_shard = split, int(samples_per_shard)
        self.shards: list[ShardRecord] = []
        self._n = 0
        self._open_shard = None

    def write(self, key: str, npy: bytes, meta_json: bytes) -> None:
        import webdataset as wds

        if self._open_shard is None:
            name = shard_name(self.split, len(self.shards))
            tmp = self.folder.file(shard_temporary_name(name))
            f = ChecksummedFile(self.folder.fs.open(tmp, "wb"))
            self._open_shard = (name, tmp, f, wds.TarWriter(f, encoder=False))
            self._n = 0
        self._open_shard[3].write({"__key__": key, "npy": npy, "json": meta_json})
        self._n += 1
        if self._n >= self.per_shard:
            self._finish()

    def _finish(self) -> None:
        if self._open_shard is None:
            return
        name, tmp, f, tw = self._open_shard
        tw.close()
        f.close()
        self.folder.fs.mv(tmp, self.folder.file(name))
        self.shards.append(f.record(name, self.split, self._n))
        self._open_shard = None

    def close(self) -> list[ShardRecord]:
        self._finish()
        return self.shards


def compute_features(cfg: Config, out: str, *, shards: Optional[str] = None, splits=("train", "val", "test"),
                     samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, dtype: str = "float32",
                     batch_size: Optional[int] = None) -> FeatureManifest:
    """Run the batch-inference job on the running Ray; write feature shards, features.json and
    a copy of the image shards' vocab.json."""
    import ray

    if cfg.model.trainable:
        raise DvsaError("model.trainable=true: precomputed features need a frozen CNN "
                        "(set model.trainable=false)")
    if dtype not in ("float32", "float16"):
        raise DvsaError(f"--dtype: {dtype!r} is not one of 'float32', 'float16'")
    if not cfg.model.weights:
        log.warning("features: model.weights is unset: the frozen CNN is randomly initialised "
                    "(seed train.seed=%d); set model.weights for pretrained features", cfg.train.seed)
    src = shards or cfg.data.shards
    vocab = load_vocab(src)
    Folder.of(out).make()
    use_gpu = bool(cfg.train.use_gpu)
    manifest_splits, all_shards = {}, []
    for split in splits:
        if not list_shards(src, split):
            log.info("features: no %s shards under %s, skipped", split, src)
            continue
        counter = SkipCounter()
        ds = ray.data.read_webdataset(dataset_paths(src, split), decoder=None, suffixes=["jpg", "json"])
        ds = ds.map_batches(
            FeatureEncoder,
            fn_constructor_args=(cfg.model, cfg.data.image_size, cfg.data.jpeg_decoder, dtype,
                                 "cuda" if use_gpu else "cpu", counter, cfg.train.seed),
            batch_size=batch_size or cfg.data.decode_batch_size, batch_format="numpy",
            concurrency=cfg.data.decode_concurrency, num_gpus=1 if use_gpu else 0,
        )
        writer = FeatureShardWriter(out, split, samples_per_shard)
        n = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for key, npy, meta in zip(batch["key"], batch["npy"], batch["json"]):
                writer.write(str(key), bytes(npy), bytes(meta))
                n += 1
        written = writer.close()
        all_shards += written
        manifest_splits[split] = FeatureSplit(samples=n, skipped=counter.log(f"features {split}"))
        log.info("features: %s: %d images in %d shards", split, n, len(written))
    manifest = FeatureManifest(
        feat_dim=FEAT_DIMS[cfg.model.backbone], image_size=cfg.data.image_size, dtype=dtype, source=str(src),
        seed=cfg.train.seed,
        model={k: getattr(cfg.model, k) for k in ("backbone", "weights", "region_features", "roi_size", "crop_size")},
        splits=manifest_splits, shards=all_shards)
    manifest.write(out, vocab)
    return manifest
