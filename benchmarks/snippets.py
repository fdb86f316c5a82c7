"""Snippet alignment throughput: the Ray Data job (`dvsa snippets`) vs a plain loop.

The baseline a user would otherwise write: one process reading the shards with
``dvsa.data.shards.iter_samples``, aligning batch by batch with the same functions and
writing with ``ShardWriter``. Both on the same synthetic world and the same (randomly
initialised, tiny-config) alignment model, so only the execution differs.

    .venv/bin/python benchmarks/snippets.py [--images 400] [--concurrency 1 2]

Prints a table and writes benchmarks/results/snippets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def plain_loop(ckpt: str, shards: str, out: str, batch_size: int) -> int:
    import torch

    from dvsa.data.shards import ShardWriter, iter_samples
    from dvsa.experiments.snippets import (
        align_sentences,
        alignment_boxes,
        embed_images,
        encode_sentences,
        snippet_sample,
    )
    from dvsa.inference.checkpoints import load_trained

    model, vocab, cfg = load_trained(ckpt)
    n = 0
    with ShardWriter(out, "train", 128 << 20) as w:
        batch = []

        def flush():
            nonlocal n
            if not batch:
                return
            v, vm = embed_images(model, [b[1] for b in batch], [b[3] for b in batch], cfg.data.image_size)
            sent_img, toks = [], []
            for i, b in enumerate(batch):
                for s in b[2]["sentences"]:
                    sent_img.append(i)
                    toks.append(s["tokens"])
            tokens, lengths = encode_sentences(vocab, toks)
            assign, _ = align_sentences(model, v, vm, torch.tensor(sent_img), tokens, lengths, cfg.align.mrf_beta)
            first = 0
            for key, jpg, meta, boxes in batch:
                k = len(meta["sentences"])
                new, _, _ = snippet_sample(meta, assign[first:first + k], boxes, meta["sentences"])
                first += k
                w.write(key, jpg, new)
                n += 1
            batch.clear()

        for key, jpg, meta in iter_samples(shards, "train"):
            batch.append((key, jpg, meta, alignment_boxes(meta, cfg.data.max_regions)))
            if len(batch) >= batch_size:
                flush()
        flush()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1])
    args = ap.parse_args()

    import ray
    import torch

    from dvsa.config import Config
    from dvsa.data.prepare import KarpathySource, PrepareOptions, prepare_karpathy
    from dvsa.data.shards import load_vocab
    from dvsa.data.synth import SynthOptions, write_world
    from dvsa.experiments.snippets import SnippetOptions, write_snippet_shards
    from dvsa.models.alignment import AlignmentModel
    from dvsa.models.checkpoint import save_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="dvsa-bench-snip-"))
    try:
        write_world(tmp / "world", SynthOptions(images=args.images, image_size=128, seed=0, val_fraction=0.05,
                                                test_fraction=0.05))
        shards = tmp / "kp"
        prepare_karpathy(KarpathySource(str(tmp / "world/karpathy/dataset_synth.json"), str(tmp / "world/vg"),
                                        proposals=str(tmp / "world/karpathy/proposals.json"), min_count=1),
                         str(shards), PrepareOptions(use_ray=False, progress=False))
        cfg = Config().replace(**{"task": "align", "data.image_size": 64, "data.max_regions": 8,
                                  "model.backbone": "tiny", "model.roi_size": 3, "model.embed_dim": 64,
                                  "model.word_dim": 32, "model.hidden_dim": 64})
        vocab = load_vocab(str(shards))
        torch.manual_seed(0)
        ckpt = save_checkpoint(tmp / "ckpt", model=AlignmentModel(cfg.model, cfg.align, len(vocab)), step=0,
                               epoch=0, vocab=vocab, cfg=cfg)
        rows = []
        t0 = time.perf_counter()
        n = plain_loop(str(ckpt), str(shards), str(tmp / "plain"), args.batch_size)
        base = time.perf_counter() - t0
        rows.append({"method": "plain loop (1 process)", "images": n, "seconds": round(base, 2),
                     "images_per_s": round(n / base, 1), "speedup": 1.0})
        ray_tmp = tempfile.mkdtemp(prefix="dvsa-ray-", dir="/tmp")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False,
                 configure_logging=False)
        try:
            for c in args.concurrency:
                t0 = time.perf_counter()
                m = write_snippet_shards(str(ckpt), str(shards), str(tmp / f"ray{c}"), SnippetOptions(
                    splits=("train",), batch_size=args.batch_size, concurrency=c))
                dt = time.perf_counter() - t0
                k = m.written["images"]
                rows.append({"method": f"Ray Data job, {c} actor(s)", "images": k, "seconds": round(dt, 2),
                             "images_per_s": round(k / dt, 1), "speedup": round(base / dt, 2)})
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'method':<28} {'images':>7} {'seconds':>8} {'img/s':>7} {'vs plain':>9}")
    for r in rows:
        print(f"{r['method']:<28} {r['images']:>7} {r['seconds']:>8} {r['images_per_s']:>7} {r['speedup']:>8}x")
    res = Path(__file__).parent / "results" / "snippets.json"
    res.parent.mkdir(exist_ok=True)
    res.write_text(json.dumps({"cpus": os.cpu_count(), "images_requested": args.images, "rows": rows,
                               "note": "Ray times include actor start-up and model load; same model and data"},
                              indent=2))
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
