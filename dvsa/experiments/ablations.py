"""Table 1's ablation rows: the alignment model with the BRNN vs a bag-of-words sentence
encoder, and the eq. 8 score vs eq. 7 (Karpathy et al. 2014), trained through the same
``train-align`` job (:func:`dvsa.train.launch.train`) with config overrides.

Each variant's MLflow run is tagged ``dvsa.ablation=<variant>`` and ``dvsa.ablation_group=<group>``;
:func:`collect_ablation_table` reads them back (the retrieval metrics the run holds:
``retrieval/*`` when the run was evaluated on the test set, else the best validation
checkpoint's ``best/val/*``) and :func:`format_markdown` prints Table 1.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional, Sequence

from dvsa import tracking
from dvsa.config import Config
from dvsa.errors import DvsaError

log = logging.getLogger(__name__)

ABLATION_TAG = "dvsa.ablation"
GROUP_TAG = "dvsa.ablation_group"

# variant -> overrides (the first is the full model of section 3.1)
VARIANTS: dict[str, dict] = {
    "brnn_eq8": {"align.sentence_encoder": "brnn", "align.score": "eq8"},
    "bow_eq8": {"align.sentence_encoder": "bow", "align.score": "eq8"},
    "brnn_eq7": {"align.sentence_encoder": "brnn", "align.score": "eq7"},
}
LABELS = {"brnn_eq8": "BRNN, eq. 8 (ours)", "bow_eq8": "bag of words, eq. 8", "brnn_eq7": "BRNN, eq. 7",
          "bow_eq7": "bag of words, eq. 7"}
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr")
SOURCES = ("retrieval/", "best/val/")


def variant_config(cfg: Config, variant: str, overrides: Optional[Mapping] = None, group: str = "table1") -> Config:
    """The config of one variant: its overrides, a run name and a Ray Train name of its own."""
    if variant not in VARIANTS and overrides is None:
        raise DvsaError(f"unknown ablation {variant!r} (known: {', '.join(VARIANTS)})")
    ov = dict(VARIANTS.get(variant, {}) if overrides is None else overrides)
    base_name = cfg.train.name or cfg.name
    ov.update({"task": "align", "mlflow.run_name": f"{group}-{variant}",
               "train.name": f"{base_name}-{group}-{variant}"})
    return cfg.replace(**ov)


def run_ablations(cfg: Config, variants: Sequence[str] = tuple(VARIANTS), group: str = "table1",
                  train_fn: Optional[Callable] = None) -> list[dict]:
    """Train every variant through the train-align job, tag its run, return Table 1's rows."""
    if train_fn is None:
        from dvsa.train.launch import train as train_fn
    uri = None
    for v in variants:
        vcfg = variant_config(cfg, v, group=group)
        log.info("ablation %s: %s", v, {k: vcfg.flat()[k] for k in ("align.sentence_encoder", "align.score")})
        outcome = train_fn(vcfg, "align")
        uri = outcome.tracking_uri
        tracking.RunLogger(uri, outcome.run_id).set_tags({ABLATION_TAG: v, GROUP_TAG: group})
    return collect_ablation_table(uri, cfg.mlflow.experiment, group) if uri else []


def collect_ablation_table(uri: str, experiment: str, group: str = "table1") -> list[dict]:
    """Rows ``{variant, label, run_id, source, i2t_r1, ..., t2i_medr}`` of the group's runs
    (the latest run per variant), in :data:`VARIANTS` order then by name."""
    c = tracking.client(uri)
    exp = tracking.retry_locked(c.get_experiment_by_name, experiment)
    if exp is None:
        raise DvsaError(f"no MLflow experiment {experiment!r} in {uri}")
    runs = tracking.retry_locked(c.search_runs, [exp.experiment_id],
                                 filter_string=f"tags.`{GROUP_TAG}` = '{group}'",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    latest: dict[str, object] = {}
    for r in runs:
        latest.setdefault(r.data.tags.get(ABLATION_TAG, "?"), r)
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows = []
    for variant in sorted(latest, key=lambda v: (order.get(v, len(order)), v)):
        run = latest[variant]
        metrics = run.data.metrics
        source = next((p for p in SOURCES if any(f"{p}{m}" in metrics for m in METRICS)), None)
        row = {"variant": variant, "label": LABELS.get(variant, variant), "run_id": run.info.run_id,
               "source": (source or "").rstrip("/") or "none"}
        for m in METRICS:
            if source and f"{source}{m}" in metrics:
                row[m] = metrics[f"{source}{m}"]
        rows.append(row)
    return rows


def format_markdown(rows: Sequence[dict]) -> str:
    head = ["model", "i2t R@1", "R@5", "R@10", "Med r", "t2i R@1", "R@5", "R@10", "Med r", "from"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + [_fmt(r.get(m), m) for m in METRICS] + [r["source"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v, metric: str) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if metric.endswith("medr") else f"{v:.1f}"
