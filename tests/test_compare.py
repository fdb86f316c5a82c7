"""`dvsa compare`: runs logged with known metrics come back as the right rows, in Table 5's order."""

from __future__ import annotations

import csv

import pytest

from dvsa import tracking
from dvsa.cli import main


def _run(uri, name, tags, metrics, params=None):
    logger, _ = tracking.start_run(uri, "table5", name, tags)
    if params:
        logger.log_params(params)
    logger.log_metrics(metrics, step=1)
    logger.end("FINISHED")
    return logger.run_id


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    region = _run(uri, "region-lstm", {"task": "caption", "mode": "region", "cell": "lstm"},
                  {"region/METEOR": 0.302, "region/Bleu_4": 0.21, "region/CIDEr": 1.5, "region/ROUGE_L": 0.55,
                   "region/queries": 40})
    full = _run(uri, "fullframe-rnn", {"task": "caption", "mode": "fullframe", "cell": "rnn"},
                {"region/METEOR": 0.101, "region/Bleu_4": 0.02, "region/CIDEr": 0.1, "region/ROUGE_L": 0.2,
                 "region/queries": 40})
    pending = _run(uri, "region-rnn", {"task": "caption", "mode": "region", "cell": "rnn"}, {"val/loss": 2.0})
    align = _run(uri, "align", {"task": "align"}, {"retrieval/i2t_r1": 90.0, "retrieval/t2i_medr": 1.0,
                                                   "retrieval/images": 6},
                 params={"align.sentence_encoder": "brnn", "align.score": "eq8"})
    return uri, {"region": region, "full": full, "pending": pending, "align": align}


def test_compare_reads_back_rows_in_table_order(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "table"
    assert main(["compare", "--experiment", "table5", "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["cell"], r["run_id"]) for r in rows] == [
        ("fullframe", "rnn", ids["full"]), ("region", "rnn", ids["pending"]), ("region", "lstm", ids["region"])]
    assert float(rows[0]["METEOR"]) == pytest.approx(0.101) and float(rows[2]["METEOR"]) == pytest.approx(0.302)
    assert float(rows[2]["BLEU-4"]) == pytest.approx(0.21) and float(rows[2]["CIDEr"]) == pytest.approx(1.5)
    assert float(rows[2]["ROUGE-L"]) == pytest.approx(0.55) and rows[1]["METEOR"] == ""

    with open(out / "compare_retrieval.csv") as f:
        ret = list(csv.DictReader(f))
    assert len(ret) == 1 and ret[0]["run_id"] == ids["align"] and ret[0]["encoder"] == "brnn"
    assert float(ret[0]["i2t R@1"]) == 90.0 and float(ret[0]["t2i medr"]) == 1.0

    md = (out / "compare.md").read_text()
    assert md in printed
    lines = [ln for ln in md.splitlines() if ln.startswith("| fullframe") or ln.startswith("| region")]
    assert lines[0].startswith("| fullframe | rnn | 0.1010 | 0.0200 | 0.1000 | 0.2000 | 40 |")
    assert lines[2].startswith("| region | lstm | 0.3020 | 0.2100 | 1.5000 | 0.5500 | 40 |")
    assert f"not evaluated yet: dvsa evaluate --checkpoint {ids['pending']}" in md


def test_compare_unknown_experiment_is_one_line(store, capsys):
    uri, _ = store
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "no MLflow experiment 'nope'" in err and "table5" in err
