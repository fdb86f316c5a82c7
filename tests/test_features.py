"""Frozen-CNN feature shards: written without pickle, equal to the encoder run directly, and
read back by build_dataset when data.features is set."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dvsa.config import Config
from dvsa.data.manifest import FeatureManifest
from dvsa.data.shards import ShardWriter
from dvsa.errors import DvsaError
from dvsa.features import compute_features
from dvsa.ingest import build_dataset, decode_resize, normalize_images, scale_boxes
from dvsa.text import Vocab

S = 32
VOCAB = Vocab.build(Counter({"a": 3, "red": 2, "dog": 2, "cat": 1}), 1, 4)


def _jpeg(w, h, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _meta(i, w, h):
    return {"image_id": i, "source": "karpathy", "split": "train", "width": w, "height": h,
            "regions": [{"id": i * 10 + j, "box": [5 * j, 4, 5 * j + 30, 40], "raw": "a red dog",
                         "tokens": ["a", "red", "dog"]} for j in range(2)],
            "groups": [], "sentences": [{"raw": "a cat", "tokens": ["a", "cat"]}],
            "proposals": [[0, 0, 20, 20], [10, 10, 50, 40], [1, 1, 30, 30]]}


def _cfg(tmp_path, **kw):
    base = {"data.image_size": S, "model.backbone": "tiny", "model.trainable": False,
            "data.max_len": 5, "data.max_regions": 3, "caption.max_regions_per_image": 2,
            "data.decode_batch_size": 4, "train.seed": 11, "out": str(tmp_path)}
    base.update(kw)
    return Config().replace(**base)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    with ShardWriter(str(root), "train", shard_bytes=8000) as w:
        for i in range(9):
            jpg = _jpeg(64, 48, i)
            w.write(f"k{i:03d}", jpg[:100] if i == 4 else jpg, _meta(i, 64, 48))
    VOCAB.save(str(root / "vocab.json"))
    return str(root)


def test_feature_shards_match_direct_encoder(ray_local, image_shards, tmp_path):
    from dvsa.models.encoder import build_encoder

    cfg = _cfg(tmp_path)
    out = tmp_path / "feats"
    m = compute_features(cfg, str(out), shards=image_shards, splits=("train", "val"), samples_per_shard=3)
    assert m.feat_dim == 128 and m.image_size == S
    assert m.splits["train"].samples == 8 and m.splits["train"].skipped == {"corrupt_image": 1}
    assert "val" not in m.splits          # no val shards: nothing written, nothing claimed
    assert FeatureManifest.read(str(out)) == m
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) == 3 and (out / "vocab.json").exists()
    assert [(s.name, s.size, s.sha256) for s in m.shards] == [
        (t.name, t.stat().st_size, hashlib.sha256(t.read_bytes()).hexdigest()) for t in tars]

    torch.manual_seed(cfg.train.seed)
    enc = build_encoder(cfg.model).eval()
    seen = 0
    for t in tars:
        with tarfile.open(t) as tf:
            names = tf.getnames()
            assert all(n.endswith((".npy", ".json")) for n in names)
            for name in names:
                if not name.endswith(".npy"):
                    continue
                key = name[:-4]
                feats = np.load(io.BytesIO(tf.extractfile(name).read()), allow_pickle=False)
                meta = json.loads(tf.extractfile(key + ".json").read())
                i = meta["image_id"]
                # whole image, 2 regions, 3 proposals
                assert feats.shape == (6, 128) and meta["features"] == {"rows": 6, "dim": 128}
                img, (w, h) = decode_resize(_jpeg(64, 48, i), S, "pil")
                boxes = [[0, 0, w, h]] + [r["box"] for r in meta["regions"]] + meta["proposals"]
                with torch.inference_mode():
                    want = enc(normalize_images(torch.from_numpy(img)[None]),
                               [torch.from_numpy(scale_boxes(boxes, w, h, S))]).numpy()
                np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
                seen += 1
    assert seen == 8

    # build_dataset on the feature shards: feats rows picked per task
    fcfg = cfg.replace(**{"data.features": str(out)})
    cap = build_dataset(image_shards, "train", "caption_region", fcfg, VOCAB, shuffle=False).take_batch(100)
    assert "images" not in cap and cap["feats"].shape == (8, 2, 128)
    al = build_dataset(image_shards, "train", "align", fcfg, VOCAB, shuffle=False).take_batch(100)
    assert al["feats"].shape == (8, 3, 128) and al["tokens"].shape == (8, 5)
    # feature row order: image, regions, proposals -> align rows = image + first 2 proposals
    for t in tars:
        with tarfile.open(t) as tf:
            for name in (n for n in tf.getnames() if n.endswith(".npy")):
                feats = np.load(io.BytesIO(tf.extractfile(name).read()), allow_pickle=False)
                i = json.loads(tf.extractfile(name[:-4] + ".json").read())["image_id"]
                r = int(np.flatnonzero(cap["image_id"] == i)[0])
                np.testing.assert_allclose(cap["feats"][r], feats[[1, 2]])
                r = int(np.flatnonzero(al["image_id"] == i)[0])
                np.testing.assert_allclose(al["feats"][r], feats[[0, 3, 4]])


def test_features_need_a_frozen_cnn(tmp_path):
    with pytest.raises(DvsaError, match="model.trainable"):
        compute_features(_cfg(tmp_path, **{"model.trainable": True}), str(tmp_path / "f"), shards="unused")


def test_features_command_rejects_bad_config_before_ray(tmp_path, capsys):
    from dvsa.cli import main

    rc = main(["features", "--out", str(tmp_path / "f"), "data.image_size=0"])
    assert rc == 2 and "data.image_size" in capsys.readouterr().err
