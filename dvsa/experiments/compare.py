"""The paper's tables read back from MLflow: Table 5 (full-frame vs region captioners) and
Table 1 (retrieval).

One row per captioner run of the experiment (tag ``task=caption``): mode (fullframe |
region), cell (rnn | lstm), the region metrics ``dvsa evaluate`` logged (METEOR, BLEU-4,
CIDEr, ROUGE-L), the number of region queries scored, the run id. Full-frame rows come first
(Table 5's order), then by cell (rnn, lstm), then by start time; a run that was not
evaluated yet shows empty cells. Alignment runs (``task=align``) get a retrieval table (Table 1):
sentence encoder, score (eq. 8 / eq. 7), R@1/5/10 and median rank both ways on the full test
split (``retrieval/*``). Runs that share a config and differ only in ``train.seed`` (and where
they wrote: :data:`NOT_THE_MODEL`) are one row: each figure the median over the runs, its range
in brackets, ``seeds`` the seeds, ``setting`` the params that tell this row from the others.

Written as Markdown, ``compare.csv`` (+ ``compare_retrieval.csv``) and ``compare.md``.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Optional

from dvsa import tracking
from dvsa.errors import DvsaError

CAPTION_COLUMNS = ("mode", "cell", "METEOR", "BLEU-4", "CIDEr", "ROUGE-L", "queries", "run_id", "run_name")
CAPTION_METRICS = {"METEOR": "region/METEOR", "BLEU-4": "region/Bleu_4", "CIDEr": "region/CIDEr",
                   "ROUGE-L": "region/ROUGE_L", "queries": "region/queries"}
RETRIEVAL_COLUMNS = ("encoder", "score", "i2t R@1", "i2t R@5", "i2t R@10", "i2t medr",
                     "t2i R@1", "t2i R@5", "t2i R@10", "t2i medr", "images", "seeds", "setting", "run_id",
                     "run_name")
RETRIEVAL_METRICS = {f"{d} {m}": f"retrieval/{d}_{k}" for d in ("i2t", "t2i")
                     for m, k in (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("medr", "medr"))}
RETRIEVAL_METRICS["images"] = "retrieval/images"
#: params that say where a run went or which seed it drew, not which model it trained
NOT_THE_MODEL = ("train.seed", "train.name", "train.storage_path", "out", "mlflow.", "ray.", "tune.",
                 "train.max_failures", "train.start_timeout_s", "train.log_every")
_MODE_ORDER = {"fullframe": 0, "region": 1}
_CELL_ORDER = {"rnn": 0, "lstm": 1}


def _attr(run, tag: str, param: str) -> str:
    return run.data.tags.get(tag) or run.data.params.get(param) or ""


def _search(uri: str, experiment: str) -> list:
    c = tracking.client(uri)
    exp = tracking.retry_locked(c.get_experiment_by_name, experiment)
    if exp is None:
        names = sorted(e.name for e in tracking.retry_locked(c.search_experiments))
        raise DvsaError(f"no MLflow experiment {experiment!r} in {uri} "
                        f"(experiments there: {', '.join(names) or 'none'})")
    runs, token = [], None
    while True:
        page = tracking.retry_locked(c.search_runs, [exp.experiment_id], max_results=1000, page_token=token,
                                     order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def caption_rows(runs) -> list[dict]:
    rows = []
    for r in runs:
        if r.data.tags.get("task") != "caption":
            continue
        row = {"mode": _attr(r, "mode", "caption.mode"), "cell": _attr(r, "cell", "caption.cell")}
        for col, key in CAPTION_METRICS.items():
            row[col] = r.data.metrics.get(key)
        row.update(run_id=r.info.run_id, run_name=r.info.run_name or "", _start=r.info.start_time or 0)
        rows.append(row)
    rows.sort(key=lambda x: (_MODE_ORDER.get(x["mode"], 9), _CELL_ORDER.get(x["cell"], 9), x["_start"]))
    return [{k: v for k, v in row.items() if k != "_start"} for row in rows]


def model_params(params: dict) -> dict:
    """A run's params less :data:`NOT_THE_MODEL`: what makes runs the same config."""
    return {k: v for k, v in params.items() if not k.startswith(NOT_THE_MODEL)}


def _median_range(values: list) -> tuple:
    """(median, min, max) of the values present, or (None, None, None)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None, None, None
    return float(statistics.median(vals)), vals[0], vals[-1]


def retrieval_rows(runs) -> list[dict]:
    """One row per config (runs differing only in the seed aggregated), in the order each
    config's first run started."""
    groups: dict[tuple, list] = {}
    for r in sorted((r for r in runs if r.data.tags.get("task") == "align"), key=lambda r: r.info.start_time or 0):
        groups.setdefault(tuple(sorted(model_params(r.data.params).items())), []).append(r)
    differing = _differing_keys([dict(k) for k in groups])
    rows = []
    for key, members in groups.items():
        params = dict(key)
        first = members[0]
        row: dict = {"encoder": params.get("align.sentence_encoder", ""), "score": params.get("align.score", ""),
                     "_range": {}}
        for col, metric in RETRIEVAL_METRICS.items():
            row[col], lo, hi = _median_range([m.data.metrics.get(metric) for m in members])
            if len(members) > 1 and lo != hi:
                row["_range"][col] = (lo, hi)
        row.update(seeds=",".join(m.data.params.get("train.seed", "?") for m in members),
                   setting=", ".join(f"{k}={params.get(k, '')}" for k in differing),
                   run_id=",".join(m.info.run_id for m in members), run_name=first.info.run_name or "")
        rows.append(row)
    return rows


def _differing_keys(configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({c.get(k) for c in configs}) > 1]


def _cell(value, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if column in ("queries", "images") or column.endswith("medr"):
            return f"{value:g}"
        if column.startswith(("i2t", "t2i")):
            return f"{value:.1f}"
        return f"{value:.4f}"
    return str(value)


def _cell_with_range(row: dict, column: str) -> str:
    text = _cell(row.get(column), column)
    lo_hi = row.get("_range", {}).get(column)
    return f"{text} ({_cell(lo_hi[0], column)}-{_cell(lo_hi[1], column)})" if lo_hi else text


def markdown(rows: list[dict], columns) -> str:
    """A Markdown table; an aggregated figure reads ``median (min-max)``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell_with_range(row, c) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], columns, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in columns])   # aggregated: the median
    return path


def compare(experiment: str, uri: str, out: Optional[str | Path] = None) -> dict:
    """Read the experiment's runs; write the tables; return {caption, retrieval, paths, markdown}."""
    runs = _search(uri, experiment)
    caps, rets = caption_rows(runs), retrieval_rows(runs)
    parts = [f"## {experiment}: region captioning (Table 5)\n", markdown(caps, CAPTION_COLUMNS)
             if caps else "(no captioner runs)"]
    if rets:
        parts += ["\n## retrieval (Table 1)\n", markdown(rets, RETRIEVAL_COLUMNS)]
    missing = [r["run_id"] for r in caps if r["METEOR"] is None]
    if missing:
        parts.append(f"\n{len(missing)} captioner run(s) not evaluated yet: "
                     f"dvsa evaluate --checkpoint {missing[0]} ...")
    text = "\n".join(parts) + "\n"
    paths = []
    if out is not None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        paths.append(write_csv(caps, CAPTION_COLUMNS, d / "compare.csv"))
        if rets:
            paths.append(write_csv(rets, RETRIEVAL_COLUMNS, d / "compare_retrieval.csv"))
        (d / "compare.md").write_text(text)
        paths.append(d / "compare.md")
    return {"caption": caps, "retrieval": rets, "paths": paths, "markdown": text}
