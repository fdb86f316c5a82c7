"""Retrieval at the paper's full test size: 5,000 images x 25,000 sentences, scored block by block.

The alignment model's S_kl (eq. 8) needs v_i^T s_t for every region of every image and every
word of every sentence: one call over the whole test set would build a [5000, 25000, T, M]
tensor (160 GB in fp32 at T = 16, M = 20). ``dvsa.evaluation.retrieval.retrieval_metrics`` asks
a score callback for 100 x 1,000 blocks instead. This script measures, each arm in its own
subprocess (so peak RSS is the arm's own):

- ``chunked`` at 5,000 x 25,000 (the full set) and at a small size;
- ``one_call`` at the small size: ``model.scores`` over every pair at once, then ranks from the
  whole matrix, i.e. what a user would write first; its ranks must equal the chunked ones.

Peak memory is ``ru_maxrss`` minus the RSS once the embeddings exist. Random embeddings (h = 64),
20 regions per image, 5 sentences of 5-16 words per image.

    .venv/bin/python benchmarks/retrieval_scale.py [--images 5000] [--small 500] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvsa.config import Config
from dvsa.evaluation.retrieval import matrix_score_fn, metrics_from_ranks, model_score_fn, retrieval_ranks
from dvsa.models.alignment import AlignmentModel

REGIONS, WORDS, PER_IMAGE = 20, 16, 5


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_arm(arm: str, images: int, dim: int) -> dict:
    """One arm in this process: embeddings, then ranks; returns time, memory, a rank checksum."""
    torch.manual_seed(0)
    cfg = Config().replace(**{"model.embed_dim": dim})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=10, with_encoder=False).eval()
    n_sent = images * PER_IMAGE
    v = torch.randn(images, REGIONS, dim)
    v_mask = torch.ones(images, REGIONS, dtype=torch.bool)
    s = torch.randn(n_sent, WORDS, dim)
    lengths = torch.randint(5, WORDS + 1, (n_sent,))
    s_mask = torch.arange(WORDS)[None, :] < lengths[:, None]
    sent_img = torch.arange(images).repeat_interleave(PER_IMAGE)
    before = _rss_mb()
    t0 = time.perf_counter()
    if arm == "chunked":
        i2t, t2i = retrieval_ranks(model_score_fn(model, v, v_mask, s, s_mask), images, sent_img)
    else:
        with torch.no_grad():
            S = model.scores(v, v_mask, s, s_mask)              # [images, n_sent] in one call
        i2t, t2i = retrieval_ranks(matrix_score_fn(S), images, sent_img, img_chunk=images, sent_chunk=n_sent)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"arm": arm, "images": images, "sentences": n_sent, "dim": dim, "seconds": seconds,
            "peak_extra_mb": max(0.0, peak - before), "metrics": metrics_from_ranks(i2t, t2i),
            "rank_checksum": int(i2t.sum()) * 1_000_003 + int(t2i.sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "retrieval_scale.json"))
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.images, args.dim)))
        return 0

    def sub(arm: str, images: int) -> dict:
        cmd = [sys.executable, __file__, "--arm", arm, "--images", str(images), "--dim", str(args.dim)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    rows = [sub("chunked", args.small), sub("one_call", args.small), sub("chunked", args.images)]
    small_chunked, small_one, full = rows
    if small_chunked["rank_checksum"] != small_one["rank_checksum"]:
        raise SystemExit("chunked and one-call ranks differ")
    one_call_full_gb = args.images * args.images * PER_IMAGE * WORDS * REGIONS * 4 / 2**30
    res = {"rows": rows, "ranks_equal_at_small": True, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "one_call_full_dots_gib": one_call_full_gb,
           "memory_ratio_small": small_one["peak_extra_mb"] / max(small_chunked["peak_extra_mb"], 1e-9)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{'arm':<10} {'images x sentences':>20} {'seconds':>9} {'peak extra MB':>14}")
    for r in rows:
        print(f"{r['arm']:<10} {r['images']:>8,} x {r['sentences']:>9,} {r['seconds']:>9.1f} "
              f"{r['peak_extra_mb']:>14.0f}")
    print(f"ranks equal (chunked vs one call, {args.small:,} images); one call at {args.images:,} x "
          f"{args.images * PER_IMAGE:,} would need the [B, L, T, M] tensor alone: {one_call_full_gb:,.0f} GiB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
