"""Beam search: batched over images x beams (ours) vs a loop of one image at a time.

Both arms run the same ``dvsa.models.decoding.beam_search`` on the same LSTM captioner
(random weights, eval mode): ``batched`` decodes all N images in one [N*k, ...] state;
``per_image`` calls it N times with one image (k beams each), as a decoding loop over a
dataset would. Outputs are checked equal. Arms are interleaved per repetition after one
warm-up each; the figure is the median.

    .venv/bin/python benchmarks/decoding.py [--images 64] [--beam 3] [--vocab 10000]
        [--hidden 512] [--max-len 16] [--reps 3] [--threads 2]
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

from dvsa.config import Config
from dvsa.models.captioner import Captioner
from dvsa.models.decoding import beam_search


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--word-dim", type=int, default=256)
    ap.add_argument("--feat-dim", type=int, default=2048)
    ap.add_argument("--cell", default="lstm", choices=["lstm", "rnn"])
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decoding.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Config().replace(**{"model.hidden_dim": args.hidden, "model.word_dim": args.word_dim,
                              "caption.cell": args.cell})
    cap = Captioner(cfg.model, cfg.caption, args.vocab, args.feat_dim).eval()
    feats = torch.randn(args.images, args.feat_dim)

    def batched():
        return beam_search(cap, feats, args.max_len, args.beam)

    def per_image():
        outs = [beam_search(cap, feats[i:i + 1], args.max_len, args.beam) for i in range(len(feats))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    arms = {"batched": batched, "per_image": per_image}
    times: dict[str, list[float]] = {a: [] for a in arms}
    results = {}
    for rep in range(args.reps + 1):                     # rep 0 is the warm-up
        for name, fn in arms.items():
            t0 = time.perf_counter()
            results[name] = fn()
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
    same = bool(torch.equal(results["batched"][0], results["per_image"][0]))
    lp_diff = float((results["batched"][1] - results["per_image"][1]).abs().max())
    b, p = statistics.median(times["batched"]), statistics.median(times["per_image"])
    print(f"{args.cell}, V={args.vocab}, hidden {args.hidden}, {args.images} images, k={args.beam}, "
          f"max_len {args.max_len}, {args.threads} threads, median of {args.reps}")
    print(f"{'arm':>10} {'seconds':>9} {'images/s':>9}")
    for name, t in (("batched", b), ("per_image", p)):
        print(f"{name:>10} {t:>9.3f} {args.images / t:>9.1f}")
    print(f"speedup {p / b:.1f}x; same captions: {same}; max |logprob diff| {lp_diff:.2e}")
    result = {"benchmark": "decoding", "cell": args.cell, "vocab": args.vocab, "hidden": args.hidden,
              "word_dim": args.word_dim, "images": args.images, "beam": args.beam,
              "max_len": args.max_len, "reps": args.reps, "threads": args.threads,
              "batched_s": b, "per_image_s": p, "speedup": p / b, "same_captions": same,
              "max_logprob_diff": lp_diff, "batched_all_s": times["batched"],
              "per_image_all_s": times["per_image"], "target_speedup": 5.0,
              "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
