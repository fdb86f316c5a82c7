"""Caption scoring throughput: parallel METEOR on Ray actors vs one process.

Scores ~3,000 synthetic caption pairs (2 references each) with

* pycocoevalcap's own ``Meteor`` (METEOR only, one round trip per segment): the baseline a
  user would otherwise pick;
* ``CaptionScorer.score`` (all seven metrics, one pipelined METEOR JVM), cold (JVM start
  included) and warm (JVM reused);
* ``score_parallel`` with N actors (all seven metrics; actors and their JVMs started per
  call, so always cold).

Prints a table and writes benchmarks/results/meteor_parallel.json. Also checks that the
parallel scores equal the single-process ones.

    python benchmarks/meteor_parallel.py [--pairs 3000] [--actors 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cube", "ball", "box", "ring"]
PLACES = ["on the left", "on the right", "at the top", "near the bottom", "in the middle",
          "next to a tree", "on a table", "behind the car"]
SIZES = ["small", "large", "tiny", "big", ""]


def synthetic_pairs(n: int, seed: int = 0):
    rng = random.Random(seed)

    def phrase():
        words = ["a", rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES),
                 rng.choice(PLACES)]
        return " ".join(w for w in words if w) + rng.choice(["", ".", "!"])

    refs = {i: [phrase(), phrase()] for i in range(n)}
    hyps = {i: (refs[i][0] if rng.random() < 0.3 else phrase()) for i in range(n)}
    return refs, hyps


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "meteor_parallel.json"))
    args = ap.parse_args()

    import ray
    from pycocoevalcap.meteor.meteor import Meteor

    from dvsa.evaluation.captions import CaptionScorer, prepare, score_parallel

    refs, hyps = synthetic_pairs(args.pairs)
    n = len(refs)
    rows = []

    gts, res, _ = prepare(refs, hyps)  # coco-caption's tokenisation, for the baseline
    meteor = Meteor()
    (m_cold, _), t_cold = timed(functools.partial(meteor.compute_score, gts, res))
    (m_warm, _), t_warm = timed(functools.partial(meteor.compute_score, gts, res))
    del meteor
    rows.append(("pycocoevalcap Meteor (METEOR only), cold", t_cold))
    rows.append(("pycocoevalcap Meteor (METEOR only), warm", t_warm))

    with CaptionScorer() as scorer:
        single, t_single_cold = timed(lambda: scorer.score(refs, hyps))
        _, t_single_warm = timed(lambda: scorer.score(refs, hyps))
    rows.append(("CaptionScorer.score (7 metrics), cold", t_single_cold))
    rows.append(("CaptionScorer.score (7 metrics), warm", t_single_warm))

    tmp = tempfile.mkdtemp(prefix="dvsa-bench-", dir="/tmp")
    ray.init(num_cpus=max(2, args.actors), include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False, configure_logging=False)
    try:
        parallel, t_par = timed(lambda: score_parallel(refs, hyps, num_actors=args.actors))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    rows.append((f"score_parallel, {args.actors} actors (7 metrics), cold", t_par))

    baseline = t_single_cold
    print(f"\n{n} caption pairs, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"{'method':<52} {'seconds':>8} {'pairs/s':>9} {'vs CaptionScorer cold':>22}")
    table = []
    for name, secs in rows:
        print(f"{name:<52} {secs:8.2f} {n / secs:9.0f} {baseline / secs:21.2f}x")
        table.append({"method": name, "seconds": round(secs, 3),
                      "pairs_per_s": round(n / secs, 1), "speedup_vs_single_cold":
                      round(baseline / secs, 3)})
    equal = parallel == single
    print(f"parallel == single-process scores: {equal}; METEOR {single['METEOR']:.6f} "
          f"(pycocoevalcap {m_cold:.6f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "pairs": n, "actors": args.actors, "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0], "rows": table,
        "parallel_equals_single": equal, "scores": single,
        "pycocoevalcap_meteor": m_cold,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if equal and abs(m_cold - single["METEOR"]) < 1e-12 else 1


if __name__ == "__main__":
    raise SystemExit(main())
