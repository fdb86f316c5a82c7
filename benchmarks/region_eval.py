"""Region-evaluation captioning throughput: batched (one CNN pass per batch of images, RoIAlign
for every group box, one beam search for all boxes) vs the loop a user would otherwise write
(one CNN pass + one beam search per group box), same model, same synthetic test images.

    .venv/bin/python benchmarks/region_eval.py [--images 40] [--backbone resnet18] [--image-size 224]

Prints a table and writes benchmarks/results/region_eval.json. Both paths must produce the
same captions (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40, help="synthetic world size (a tenth are test images)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8, help="images per batched call")
    ap.add_argument("--beam-size", type=int, default=3)
    args = ap.parse_args()

    import torch

    from dvsa.config import load_config
    from dvsa.data.prepare import PrepareOptions, VGSource, prepare_vg
    from dvsa.data.shards import iter_samples, load_vocab
    from dvsa.data.synth import SynthOptions, write_world
    from dvsa.evaluation.regions import sample_queries
    from dvsa.inference.captioning import BoxCaptioner
    from dvsa.models.build import build_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="dvsa-bench-"))
    write_world(tmp / "w", SynthOptions(images=args.images, image_size=128, seed=0, test_fraction=0.5))
    prepare_vg(VGSource(str(tmp / "w" / "vg"), split_file=str(tmp / "w" / "vg" / "densecap_splits.json"), min_count=2),
               str(tmp / "vg"), PrepareOptions(use_ray=False, progress=False))
    vocab = load_vocab(str(tmp / "vg"))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "task=caption", f"model.backbone={args.backbone}", f"data.image_size={args.image_size}",
        "model.roi_size=7", "caption.decode=beam", f"caption.beam_size={args.beam_size}"])
    torch.manual_seed(0)
    bc = BoxCaptioner(build_model(cfg, vocab), vocab, cfg, device="cpu")
    samples = []
    for _, jpg, meta in iter_samples(str(tmp / "vg"), "test"):
        img, (w, h) = bc.prepare_image(jpg)
        boxes = bc.to_frame([q["box"] for q in sample_queries(meta)], w, h)
        samples.append((img, boxes))
    n_groups = sum(len(b) for _, b in samples)

    def batched():
        out = []
        for i in range(0, len(samples), args.batch):
            chunk = samples[i:i + args.batch]
            out += [c for per in bc.describe([s[0] for s in chunk], [s[1] for s in chunk]) for c in per]
        return out

    def per_group():
        return [bc.describe([img], [boxes[j:j + 1]])[0][0] for img, boxes in samples for j in range(len(boxes))]

    results = {}
    captions = {}
    for name, fn in (("per-group loop (baseline)", per_group), ("batched + RoIAlign (ours)", batched)):
        fn()  # warm-up
        t0 = time.perf_counter()
        captions[name] = fn()
        dt = time.perf_counter() - t0
        results[name] = {"seconds": dt, "groups_per_s": n_groups / dt}
    a, b = captions.values()
    same = [x[0] for x in a] == [x[0] for x in b]
    base = results["per-group loop (baseline)"]["groups_per_s"]
    print(f"{len(samples)} test images, {n_groups} groups, backbone {args.backbone} @ {args.image_size}px, "
          f"beam {args.beam_size}, {torch.get_num_threads()} threads")
    print(f"{'method':<28} {'seconds':>8} {'groups/s':>9} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<28} {r['seconds']:8.2f} {r['groups_per_s']:9.1f} {r['groups_per_s'] / base:6.2f}")
    print(f"same captions: {same}")
    out = {"images": len(samples), "groups": n_groups, "backbone": args.backbone, "image_size": args.image_size,
           "beam_size": args.beam_size, "threads": torch.get_num_threads(), "results": results,
           "speedup": results["batched + RoIAlign (ours)"]["groups_per_s"] / base, "same_captions": same}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "region_eval.json").write_text(json.dumps(out, indent=2))
    if not same:
        sys.exit("batched and per-group captions differ")


if __name__ == "__main__":
    main()
