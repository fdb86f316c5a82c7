"""Table 1's ablation rows: the alignment model with the BRNN vs a bag-of-words sentence
encoder, and the eq. 8 score vs eq. 7 (Karpathy et al. 2014), trained through the same
``train-align`` job (:func:`dvsa.train.launch.train`) with config overrides.

Each variant's MLflow run is tagged ``dvsa.ablation=<variant>`` and ``dvsa.ablation_group=<group>``;
:func:`collect_ablation_table` reads them back (the retrieval metrics the run holds:
``retrieval/*`` when the run was evaluated on the test set, else the best validation
checkpoint's ``best/val/*``; a variant trained with several seeds is one row, each figure the
median over its runs with the range) and :func:`format_markdown` prints Table 1. Other
variants (any overrides) go through ``run_ablations(..., settings={name: overrides}, seeds=...)``:
``scripts/align_ablations.py`` runs the demo world's ablations of docs/experiments.md that way.
"""

from __future__ import annotations

import logging
import statistics
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


def variant_config(cfg: Config, variant: str, overrides: Optional[Mapping] = None, group: str = "table1",
                   seed: Optional[int] = None) -> Config:
    """The config of one variant: its overrides, a run name and a Ray Train name of its own
    (with ``-s<seed>`` and ``train.seed`` when a seed is given)."""
    if variant not in VARIANTS and overrides is None:
        raise DvsaError(f"unknown ablation {variant!r} (known: {', '.join(VARIANTS)})")
    ov = dict(VARIANTS.get(variant, {}) if overrides is None else overrides)
    base_name = cfg.train.name or cfg.name
    suffix = "" if seed is None else f"-s{seed}"
    ov.update({"task": "align", "mlflow.run_name": f"{group}-{variant}{suffix}",
               "train.name": f"{base_name}-{group}-{variant}{suffix}"})
    if seed is not None:
        ov["train.seed"] = seed
    return cfg.replace(**ov)


def run_ablations(cfg: Config, variants: Sequence[str] = tuple(VARIANTS), group: str = "table1",
                  train_fn: Optional[Callable] = None, *, settings: Optional[Mapping[str, Mapping]] = None,
                  seeds: Optional[Sequence[int]] = None,
                  evaluate_fn: Optional[Callable[[object], dict]] = None) -> list[dict]:
    """Train every variant (``settings[variant]`` overrides, default :data:`VARIANTS`) once per
    seed (default: ``cfg.train.seed`` alone) through the train-align job, log ``evaluate_fn(outcome)``
    (e.g. test-set retrieval) into its run, tag it; return the table's rows."""
    if train_fn is None:
        from dvsa.train.launch import train as train_fn
    uri = None
    for v in variants:
        for seed in (seeds if seeds is not None else [None]):
            overrides = None if settings is None else settings[v]
            vcfg = variant_config(cfg, v, overrides, group=group, seed=seed)
            log.info("ablation %s (seed %s): %s", v, vcfg.train.seed, overrides or VARIANTS.get(v))
            outcome = train_fn(vcfg, "align")
            uri = outcome.tracking_uri
            logger = tracking.RunLogger(uri, outcome.run_id)
            if evaluate_fn is not None:
                logger.log_metrics(evaluate_fn(outcome), step=outcome.step)
            logger.set_tags({ABLATION_TAG: v, GROUP_TAG: group})
            logger.flush()
    return collect_ablation_table(uri, cfg.mlflow.experiment, group, order=variants) if uri else []


def collect_ablation_table(uri: str, experiment: str, group: str = "table1",
                           order: Sequence[str] = tuple(VARIANTS)) -> list[dict]:
    """Rows ``{variant, label, run_id, runs, seeds, source, i2t_r1, ..., range}`` of the group's
    runs, one per variant: each metric the median over the variant's runs (its seeds), ``range``
    metric -> (min, max); ``run_id`` the latest run. In ``order``, then by name."""
    c = tracking.client(uri)
    exp = tracking.retry_locked(c.get_experiment_by_name, experiment)
    if exp is None:
        raise DvsaError(f"no MLflow experiment {experiment!r} in {uri}")
    runs = tracking.retry_locked(c.search_runs, [exp.experiment_id],
                                 filter_string=f"tags.`{GROUP_TAG}` = '{group}'",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    by_variant: dict[str, list] = {}
    for r in runs:
        by_variant.setdefault(r.data.tags.get(ABLATION_TAG, "?"), []).append(r)
    rank = {v: i for i, v in enumerate(order)}
    return [_variant_row(v, by_variant[v]) for v in sorted(by_variant, key=lambda v: (rank.get(v, len(rank)), v))]


def _variant_row(variant: str, runs: list) -> dict:
    """One table row from a variant's runs (newest first): the first source in :data:`SOURCES`
    that any run holds, each metric's median and range over the runs that hold it."""
    source = next((p for p in SOURCES for r in runs if any(f"{p}{m}" in r.data.metrics for m in METRICS)), None)
    row: dict = {"variant": variant, "label": LABELS.get(variant, variant), "run_id": runs[0].info.run_id,
                 "runs": len(runs), "seeds": sorted({r.data.params.get("train.seed", "?") for r in runs}),
                 "source": (source or "").rstrip("/") or "none", "range": {}}
    for m in METRICS:
        values = sorted(r.data.metrics[f"{source}{m}"] for r in runs if source and f"{source}{m}" in r.data.metrics)
        if values:
            row[m] = float(statistics.median(values))
            row["range"][m] = (values[0], values[-1])
    return row


def format_markdown(rows: Sequence[dict]) -> str:
    """Table 1's rows; a figure over several seeds reads ``median (min-max)``."""
    head = ["model", "i2t R@1", "R@5", "R@10", "Med r", "t2i R@1", "R@5", "R@10", "Med r", "seeds", "from"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + [_fmt_range(r, m) for m in METRICS] + [str(r.get("runs", 1)), r["source"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_range(row: dict, metric: str) -> str:
    text = _fmt(row.get(metric), metric)
    lo, hi = row.get("range", {}).get(metric, (None, None))
    return f"{text} ({_fmt(lo, metric)}-{_fmt(hi, metric)})" if lo is not None and lo != hi else text


def _fmt(v, metric: str) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if metric.endswith("medr") else f"{v:.1f}"
