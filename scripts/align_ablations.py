"""The alignment model's ablations on a synthetic world (docs/experiments.md, issue 12).

Trains ``configs/demo_align.yaml`` (the demo's alignment model) plus each variant's overrides,
once per seed, through the train-align job on one local Ray; evaluates every checkpoint on the
world's test split (retrieval: full split, both ways; word -> true box before/after the MRF);
logs those figures into the run and tags it ``dvsa.ablation`` / ``dvsa.ablation_group``; prints
the table (median and range over the seeds) and appends one JSON line per run to ``--jsonl``.

    dvsa synth --out W --images 1200 && dvsa prepare vg ... && dvsa prepare karpathy ... --out K
    .venv/bin/python scripts/align_ablations.py --world W --shards K --out runs/ablations \\
        --variant base='{}' --variant ep24='{"train.epochs": 24}' --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from dvsa import runtime
from dvsa.config import load_config
from dvsa.evaluation.alignment_eval import evaluate_retrieval
from dvsa.experiments.ablations import format_markdown, run_ablations
from dvsa.experiments.word_alignment import load_truth, word_alignment_accuracy
from dvsa.inference.checkpoints import load_trained
from dvsa.train.launch import train

PRESET = Path(__file__).resolve().parents[1] / "configs" / "demo_align.yaml"
WORD_METRICS = ("align/word_acc_argmax", "align/word_acc_mrf", "align/word_no_evidence")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, help="the dvsa synth directory (truth.json)")
    ap.add_argument("--shards", required=True, help="its prepared Karpathy-split shards")
    ap.add_argument("--out", required=True, help="runs, checkpoints, mlflow.db")
    ap.add_argument("--preset", default=str(PRESET))
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=JSON",
                    help='a variant and its overrides, e.g. ep24=\'{"train.epochs": 24}\'')
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--group", default="issue12")
    ap.add_argument("--jsonl", default=None, help="append one line per run here")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    settings = {}
    for item in args.variant:
        name, _, spec = item.partition("=")
        settings[name] = json.loads(spec or "{}")
    out = Path(args.out).resolve()
    cfg = load_config(args.preset, [f"out={out}", f"data.fullframe_shards={args.shards}",
                                    f"train.storage_path={out / 'ray_results'}", "mlflow.experiment=align-ablations",
                                    "name=abl"])
    truth = load_truth(args.world)
    started = {"t": time.perf_counter()}

    def timed_train(vcfg, task):
        started["t"] = time.perf_counter()
        return train(vcfg, task)

    def evaluate(outcome) -> dict:
        train_s = time.perf_counter() - started["t"]
        model, vocab, mcfg = load_trained(outcome.checkpoint)
        metrics, _ = evaluate_retrieval(model, vocab, mcfg, args.shards, "test")
        metrics.update(word_alignment_accuracy(model, vocab, mcfg, args.shards, truth, "test").metrics())
        record = {"run": outcome.name, "seed": mcfg.train.seed, "train_s": round(train_s, 1), "epoch": outcome.epoch,
                  "run_id": outcome.run_id, **{k: round(v, 4) for k, v in metrics.items()
                                                 if k.startswith("retrieval/") or k.startswith(WORD_METRICS)}}
        print("RESULT " + json.dumps(record), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        return metrics

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with runtime.ray_session(out, None, args.num_cpus):
        rows = run_ablations(cfg, list(settings), args.group, timed_train, settings=settings,
                             seeds=[int(s) for s in args.seeds.split(",")], evaluate_fn=evaluate)
    print(format_markdown(rows))


if __name__ == "__main__":
    main()
