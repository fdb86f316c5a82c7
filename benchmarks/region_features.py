"""Region features: one CNN pass + RoIAlign (ours) vs the paper's per-crop CNN (eq. 1).

Both arms compute CNN(I_b) for every box of one image with the same ResNet (random weights,
frozen, eval mode, no gradients): ``roi_align`` runs the trunk once on the image and pools
each box from the shared conv map; ``crop`` crops each box, resizes it to crop x crop and runs
the CNN on every crop (in batches of 64). Boxes are random, the whole image first. Arms are
interleaved per repetition (after one warm-up each) so machine load hits both alike; the
figure per arm is the median time per image.

    .venv/bin/python benchmarks/region_features.py [--backbone resnet50] [--size 224]
        [--boxes 20 40] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvsa.models.encoder import ImageEncoder


def random_boxes(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n - 1, 2, generator=g) * size * 0.7
    wh = (torch.rand(n - 1, 2, generator=g) * 0.6 + 0.1) * size
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
    return torch.cat([torch.tensor([[0.0, 0.0, size, size]]), boxes])


def time_once(enc: ImageEncoder, images: torch.Tensor, boxes: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = enc(images, boxes)
    dt = time.perf_counter() - t0
    assert out.shape == (sum(len(b) for b in boxes), enc.feat_dim)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--boxes", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "region_features.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    enc = ImageEncoder(args.backbone, trainable=False, region_features="roi_align",
                       crop_size=args.crop_size).eval()
    image = torch.randn(1, 3, args.size, args.size)
    rows = []
    for k in args.boxes:
        boxes = [random_boxes(k, args.size, g)]
        times: dict[str, list[float]] = {"roi_align": [], "crop": []}
        for rep in range(args.reps + 1):                 # rep 0 is the warm-up
            for arm in ("roi_align", "crop"):
                enc.region_features = arm
                dt = time_once(enc, image, boxes)
                if rep:
                    times[arm].append(dt)
        roi, crop = statistics.median(times["roi_align"]), statistics.median(times["crop"])
        rows.append({"boxes": k, "roi_align_s": roi, "crop_s": crop, "speedup": crop / roi,
                     "roi_align_all_s": times["roi_align"], "crop_all_s": times["crop"]})

    print(f"{args.backbone}, {args.size}px image, crops resized to {args.crop_size}px, "
          f"{args.threads} threads, median of {args.reps}")
    print(f"{'boxes':>6} {'roi_align s':>12} {'per-crop s':>12} {'speedup':>9}")
    for r in rows:
        print(f"{r['boxes']:>6} {r['roi_align_s']:>12.3f} {r['crop_s']:>12.3f} {r['speedup']:>8.1f}x")
    result = {"benchmark": "region_features", "backbone": args.backbone, "image_size": args.size,
              "crop_size": args.crop_size, "reps": args.reps, "threads": args.threads,
              "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "target_speedup": 10.0, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
