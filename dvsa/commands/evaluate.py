"""``dvsa evaluate --checkpoint PATH_OR_RUN_ID_OR_MODEL_URI [--split test] [--max-groups N] [--config FILE]
[key=value ...]``

Loads a trained model (:func:`dvsa.inference.checkpoints.load_trained`) and evaluates it
(:func:`dvsa.evaluation.job.evaluate_checkpoint`):

* a captioner (full-frame or region): every merged region group of the split is a query
  (section 4.4, :mod:`dvsa.evaluation.regions`, a Ray Data job) -> ``region/METEOR``,
  ``region/Bleu_1..4``, ``region/ROUGE_L``, ``region/CIDEr``; with ``--on fullframe`` whole
  images against their sentences -> ``fullframe/...``;
* an alignment model: image-sentence retrieval (:mod:`dvsa.evaluation.alignment_eval`) ->
  ``retrieval/i2t_r1`` ... ``retrieval/t2i_medr`` (full split) and, when the split holds >= 1,000
  images, ``retrieval_1k/...`` (the mean over its 1K-image folds, the paper's COCO 1K test); a
  table after the metrics says which figures are which, or that a smaller split has no 1K figures.

Metrics go into the SAME MLflow run the checkpoint came from (found by run id, by the run that
logged a ``runs:/<run id>/model`` / ``models:/<name>/<version|latest>`` / ``models:/<name>@<alias>``
model, or by the run's ``dvsa.checkpoint`` / ``dvsa.run_dir`` tags), so ``dvsa compare`` sees both captioners
of Table 5 side by side; artifacts: the Fig. 10 picture of a few test images, a table of
sample captions, all predictions (jsonl) and the metrics (json), also written under
``<out>/eval/<run>/``.

The model's own settings come from its checkpoint. ``--config``/``key=value`` set where to
evaluate: ``data.shards`` (VG shards: the region queries), ``data.fullframe_shards``, ``out``,
``mlflow.*``, ``ray.*``, and the decoder (``caption.decode``, ``caption.beam_size``,
``caption.temperature``); anything that would change the trained model is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dvsa.evaluation.alignment_eval import retrieval_table
from dvsa.evaluation.job import EvalRequest, evaluate_checkpoint

HELP = "evaluate a checkpoint (captions: BLEU/METEOR/ROUGE-L/CIDEr; alignment: R@K)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint dir, its state.pt, a Ray Train run dir, an MLflow run id, or an MLflow "
                             "model URI: runs:/<run id>/model, models:/<name>/<version|latest>, models:/<name>@<alias>")
    parser.add_argument("--split", default="test", help="split of the shards to evaluate on (default: test)")
    parser.add_argument("--max-groups", type=int, default=None,
                        help="captioners: score only the first N queries (quick runs)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="alignment models: use only the first N images of the split")
    parser.add_argument("--on", choices=("region", "fullframe"), default="region",
                        help="captioners: region groups of data.shards (default), or whole images "
                             "of data.fullframe_shards against their sentences")
    parser.add_argument("--config", default=None, help="YAML preset for the evaluation environment")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run instead of the checkpoint's")
    parser.add_argument("--meteor-actors", type=int, default=2, help="Ray actors (JVMs) computing METEOR")
    parser.add_argument("--concurrency", type=int, default=1, help="captioning actors (one model each)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per captioning call")
    parser.add_argument("--examples", type=int, default=3, help="images drawn in the Fig. 10 picture(s)")
    parser.add_argument("--outcome-json", default=None, help="also write metrics + run id to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. data.shards=runs/data/vg caption.decode=beam caption.beam_size=5")


def format_metrics(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:.4f}" if abs(v) < 1e6 else f"  {k:<{width}}  {v:.4g}"
                     for k, v in metrics.items())


def run(args: argparse.Namespace) -> int:
    out = evaluate_checkpoint(EvalRequest(
        checkpoint=args.checkpoint, split=args.split, on=args.on, max_groups=args.max_groups,
        max_images=args.max_images, config_file=args.config, overrides=list(args.overrides), run_id=args.run_id,
        meteor_actors=args.meteor_actors, concurrency=args.concurrency, batch_size=args.batch_size,
        examples=args.examples))
    for note in out.notes:
        print(f"note: {note}", flush=True)
    print(f"{out.task} model {out.checkpoint} on {args.split}:\n{format_metrics(out.metrics)}\n"
          f"  MLflow run {out.run_id} ({out.tracking_uri})\n  outputs: {out.outputs}", flush=True)
    if "retrieval/images" in out.metrics:
        print(f"\nretrieval on {args.split} (R@K in %; i2t = image annotation, t2i = image search):\n"
              f"{retrieval_table(out.metrics)}", flush=True)
    if args.outcome_json:
        Path(args.outcome_json).write_text(json.dumps({"run_id": out.run_id, "tracking_uri": out.tracking_uri,
                                                       "checkpoint": out.checkpoint, "metrics": out.metrics,
                                                       "outputs": out.outputs, "pictures": out.pictures}, indent=2))
    return 0
