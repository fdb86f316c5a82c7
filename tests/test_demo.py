"""`dvsa demo` end to end on a very small world: every step runs, the runs land in MLflow."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    assert [c[0].split(" ")[0] for c in res.checks] == ["region", "region", "word-to-region", "image", "image"]
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


def test_demo_trains_exactly_the_shipped_presets():
    """Each demo model's config is its preset as `dvsa train-align/train-caption --config` loads it;
    the demo adds only where things go, and the user's key=value wins for every model."""
    from dvsa.commands import _train
    from dvsa.demo import ENVIRONMENT_KEYS, PRESETS, TASKS, DemoOptions, demo_configs

    cfgs = demo_configs(DemoOptions(out=Path("/tmp/d"), seed=3))
    assert set(cfgs) == {"region", "fullframe", "align"}
    seen: list = []
    for model, cfg in cfgs.items():
        args = argparse.Namespace(config=str(PRESETS[model]), overrides=[], outcome_json=None)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_train, "train", lambda c, task: seen.append((c, task)))
            _train.run(args, TASKS[model])
        cli_cfg, task = seen.pop()
        assert task == cfg.task == TASKS[model]
        flat, cli = cfg.flat(), cli_cfg.flat()
        assert {k for k in flat if flat[k] != cli[k]} <= set(ENVIRONMENT_KEYS), model
        assert flat["train.seed"] == 3 and flat["data.fullframe_shards"] == "/tmp/d/data/karpathy"
    assert cfgs["region"].caption.mode == "region" and cfgs["fullframe"].caption.mode == "fullframe"
    # what makes the alignment model work is in its preset, not in dvsa.demo
    align = cfgs["align"]
    assert (align.data.image_size, align.align.whole_image, align.train.grad_clip_mode) == (80, False, "norm")
    assert align.train.checkpoint_select == "last"
    assert cfgs["region"].train.epochs == 16
    user = demo_configs(DemoOptions(out=Path("/tmp/d"), overrides=["train.lr=0.01", "data.image_size=32"]))
    assert all(c.train.lr == 0.01 and c.data.image_size == 32 for c in user.values())


def test_demo_refuses_an_unknown_model_preset(tmp_path):
    from dvsa.demo import DemoOptions, demo_configs
    from dvsa.errors import DvsaError

    with pytest.raises(DvsaError, match="--preset regoin: not one of the demo's models"):
        demo_configs(DemoOptions(out=tmp_path, presets={"regoin": tmp_path / "x.yaml"}))
    with pytest.raises(DvsaError, match="demo preset for the align model not found"):
        demo_configs(DemoOptions(out=tmp_path, presets={"align": tmp_path / "x.yaml"}))


def test_demo_checks_name_the_targets_and_count_silent_words():
    """The check lines: the issue's targets in their text, the measured figure beside them, and
    a few object words without evidence counted (a rounded 0.0% would hide them) and missed."""
    from dvsa.demo import DemoResult, _checks

    words = 4702.0
    align = {"align/word_acc_mrf": 0.952, "align/word_acc_argmax": 0.934, "align/word_acc_chance": 0.345,
             "align/word_no_evidence": 2 / words, "align/word_acc_words": words,
             "retrieval/images": 120.0, "retrieval/i2t_r1": 94.2, "retrieval/t2i_r1": 69.9}
    res = DemoResult(metrics={"region": {"region/METEOR": 0.46, "region/attr_acc": 0.99},
                              "fullframe": {"region/METEOR": 0.18}, "align": align})
    _checks(res)
    by_claim = {claim.split(" (")[0].split(",")[0]: (measured, ok) for claim, measured, ok in res.checks}
    assert [ok for _, _, ok in res.checks] == [True, True, False, True, False]
    grounding = by_claim["word-to-region accuracy after the MRF >= 0.93"][0]
    assert "2 of 4702 object words (0.04%) carry no evidence" in grounding
    assert by_claim["image annotation R@1 >= 90%"] == ("94.2% (chance 0.8%)", True)
    assert by_claim["image search R@1 >= 70%"] == ("69.9% (chance 0.8%)", False)
    align["align/word_no_evidence"] = 0.0
    res = DemoResult(metrics={**res.metrics, "align": align})
    _checks(res)
    assert res.checks[2][2] and "0 of 4702 object words" in res.checks[2][1]
