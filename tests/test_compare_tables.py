"""dvsa.experiments.compare: Table 5 and Table 1 rows from MLflow runs, ordered and formatted
as the paper's tables (runs stand in as plain objects with MLflow's attributes)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

from dvsa.experiments.compare import (
    CAPTION_COLUMNS,
    RETRIEVAL_COLUMNS,
    caption_rows,
    markdown,
    retrieval_rows,
    write_csv,
)


def _run(run_id, start, tags, params=None, metrics=None):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=f"name-{run_id}", start_time=start),
                           data=SimpleNamespace(tags=tags, params=params or {}, metrics=metrics or {}))


RUNS = [
    _run("r-lstm", 3, {"task": "caption", "mode": "region", "cell": "lstm"},
         metrics={"region/METEOR": 0.4761, "region/Bleu_4": 0.62, "region/queries": 347.0}),
    _run("f-lstm", 2, {"task": "caption"}, params={"caption.mode": "fullframe", "caption.cell": "lstm"},
         metrics={"region/METEOR": 0.1856}),
    _run("r-rnn", 1, {"task": "caption", "mode": "region", "cell": "rnn"}),        # not evaluated yet
    _run("al", 4, {"task": "align"}, params={"align.sentence_encoder": "brnn", "align.score": "eq8"},
         metrics={"retrieval/i2t_r1": 75.83, "retrieval/t2i_medr": 2.0, "retrieval/images": 120.0}),
    _run("tune", 5, {"task": "tune"}),
]


def test_caption_rows_in_table_5_order():
    rows = caption_rows(RUNS)
    assert [(r["mode"], r["cell"], r["run_id"]) for r in rows] == [
        ("fullframe", "lstm", "f-lstm"), ("region", "rnn", "r-rnn"), ("region", "lstm", "r-lstm")]
    assert rows[2]["METEOR"] == 0.4761 and rows[2]["BLEU-4"] == 0.62 and rows[1]["METEOR"] is None
    text = markdown(rows, CAPTION_COLUMNS)
    assert text.splitlines()[0] == "| " + " | ".join(CAPTION_COLUMNS) + " |"
    assert "| region | lstm | 0.4761 | 0.6200 |  |  | 347 | r-lstm | name-r-lstm |" in text
    assert "| region | rnn |  |  |  |  |  | r-rnn | name-r-rnn |" in text


def test_retrieval_rows_and_csv(tmp_path):
    rows = retrieval_rows(RUNS)
    assert len(rows) == 1 and rows[0]["encoder"] == "brnn" and rows[0]["score"] == "eq8"
    line = markdown(rows, RETRIEVAL_COLUMNS).splitlines()[2]
    assert line.startswith("| brnn | eq8 | 75.8 |") and "| 2 |" in line and "| 120 |" in line
    path = write_csv(rows, RETRIEVAL_COLUMNS, tmp_path / "t.csv")
    read = list(csv.reader(path.open()))
    assert read[0] == list(RETRIEVAL_COLUMNS)
    assert read[1][:3] == ["brnn", "eq8", "75.83"] and read[1][3] == ""


def test_retrieval_rows_aggregate_seeds_median_and_range():
    base = {"align.sentence_encoder": "brnn", "align.score": "eq8", "align.loss": "sum", "train.lr": "0.0005"}
    runs = [_run(f"s{seed}", seed, {"task": "align"},
                 params={**base, "train.seed": str(seed), "train.name": f"n{seed}", "out": f"/o{seed}"},
                 metrics={"retrieval/i2t_r1": i2t, "retrieval/t2i_medr": medr, "retrieval/images": 120.0})
            for seed, i2t, medr in ((0, 80.0, 2.0), (1, 92.5, 1.0), (2, 88.0, 1.0))]
    runs.append(_run("hard", 9, {"task": "align"}, params={**base, "align.loss": "hardest", "train.seed": "0"},
                     metrics={"retrieval/i2t_r1": 95.0, "retrieval/images": 120.0}))
    rows = retrieval_rows(runs)
    assert [(r["seeds"], r["setting"], r["run_id"]) for r in rows] == [
        ("0,1,2", "align.loss=sum", "s0,s1,s2"), ("0", "align.loss=hardest", "hard")]
    one, hard = rows
    assert (one["i2t R@1"], one["t2i medr"], one["images"]) == (88.0, 1.0, 120.0)     # medians
    assert one["_range"] == {"i2t R@1": (80.0, 92.5), "t2i medr": (1.0, 2.0)}       # images agree: no range
    assert hard["i2t R@1"] == 95.0 and hard["_range"] == {} and hard["t2i medr"] is None
    lines = markdown(rows, RETRIEVAL_COLUMNS).splitlines()
    assert lines[2].startswith("| brnn | eq8 | 88.0 (80.0-92.5) |  |  |  |  |  |  | 1 (1-2) | 120 | 0,1,2 |")
    assert lines[3].startswith("| brnn | eq8 | 95.0 |")
