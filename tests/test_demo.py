"""`dvsa demo` end to end on a very small world: every step runs, the runs land in MLflow."""

from __future__ import annotations

import json

import pytest
from run_checks import split_count


def test_demo_runs_every_step_and_records_the_runs(demo_run):
    """The demo itself runs once per session (conftest.demo_run); its trained models are
    checked job by job in tests/test_train.py."""
    import mlflow

    from dvsa.demo import EXPERIMENT

    opts, res = demo_run
    out = opts.out
    # the comparison table holds both captioners of Table 5 and the alignment model's retrieval row
    assert "| fullframe | lstm |" in res.table and "| region | lstm |" in res.table
    assert "| brnn | eq8 |" in res.table
    # every claim is checked and reported (whether a 1-epoch model meets it is not the point here)
    assert [c[0].split(" ")[0] for c in res.checks] == ["region", "region", "word-to-region", "image"]
    vg, kp = out / "data" / "vg", out / "data" / "karpathy"
    for key in ("region", "fullframe"):
        m = res.metrics[key]
        # both captioners describe every VG test region group (the demo caps at 600; far more than here)
        assert m["region/queries"] == min(600, split_count(vg, "test", "groups"))
        assert 0.0 <= m["region/METEOR"] <= 1.0 and 0.0 <= m["region/attr_acc"] <= 1.0
    assert 0.0 <= res.metrics["align"]["align/word_acc_mrf"] <= 1.0
    # retrieval ranks every Karpathy test image against every test sentence
    assert res.metrics["align"]["retrieval/images"] == split_count(kp, "test")
    assert res.metrics["align"]["retrieval/sentences"] == split_count(kp, "test", "sentences")
    # the runs, their metrics and the pictures are where the demo says
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")  # no global MLflow state
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(res.runs.values()) <= set(runs)
    for key in ("region", "fullframe"):          # what the demo reports is what its runs hold
        logged = runs[res.runs[key]].data.metrics
        assert {k: logged[k] for k in res.metrics[key] if k.startswith("region/")} == pytest.approx(
            {k: v for k, v in res.metrics[key].items() if k.startswith("region/")})
    assert (out / "compare" / "compare.md").is_file()
    assert list((out / "search").glob("*.png")) and (out / "pictures" / "fig5_alignment.png").is_file()
    summary = json.loads((out / "demo.json").read_text())
    assert summary["runs"] == res.runs
    snippets = json.loads((out / "data" / "snippets" / "manifest.json").read_text())
    assert snippets["splits"]["train"]["regions"] > 0


def test_demo_model_settings_yield_to_the_users_overrides():
    from dvsa.demo import ALIGN_OVERRIDES, REGION_OVERRIDES, _unless_given

    assert _unless_given(REGION_OVERRIDES, []) == REGION_OVERRIDES
    assert _unless_given(REGION_OVERRIDES, ["train.epochs=1"]) == {}
    got = _unless_given(ALIGN_OVERRIDES, ["data.image_size=32", "train.lr=0.01"])
    assert "data.image_size" not in got and "train.lr" not in got
    assert got["align.whole_image"] is False and got["train.grad_clip_mode"] == "norm"
