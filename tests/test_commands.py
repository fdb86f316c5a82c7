"""The ``dvsa`` command modules (:mod:`dvsa.commands`): each one parses its arguments, hands the
work to the library with the settings it was given, writes what it promises (outcome JSON,
printed lines) and refuses bad input with a one-line error and exit code before any Ray or
training starts. The heavy library calls are replaced by recorders here; the commands' real
end-to-end runs are in test_train, test_tune, test_evaluate, test_caption_cli, test_search,
test_compare, test_prepare, test_stats, test_synth, test_features, test_snippets, test_demo."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from dvsa import cli
from dvsa.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------- dispatch


COMMAND_MODULES = {
    "synth": "dvsa.commands.synth", "prepare": "dvsa.commands.prepare", "stats": "dvsa.commands.stats",
    "train-align": "dvsa.commands.train_align", "train-caption": "dvsa.commands.train_caption",
    "evaluate": "dvsa.commands.evaluate", "features": "dvsa.commands.features", "tune": "dvsa.commands.tune",
    "compare": "dvsa.commands.compare", "caption": "dvsa.commands.caption", "search": "dvsa.commands.search",
    "demo": "dvsa.commands.demo", "snippets": "dvsa.commands.snippets",
}


def test_the_dispatch_table_names_every_command_module():
    assert {name: f"dvsa.commands.{m}" for name, m in cli.COMMANDS.items()} == COMMAND_MODULES


@pytest.mark.parametrize("name", list(COMMAND_MODULES))
def test_every_command_module_parses_and_has_help(name, capsys):
    module = importlib.import_module(COMMAND_MODULES[name])
    assert callable(module.add_arguments) and callable(module.run)
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dvsa {name}")


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out
    assert main(["-v", "--help"]) == 0
    assert main([]) == 2                                   # no command: help, and an error code
    assert "usage: dvsa" in capsys.readouterr().out


def test_unknown_command_and_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian-align"])
    assert e.value.code == 2
    assert "unknown command 'trian-align'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["synth"])                                    # --out is required
    assert e.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def _replace(monkeypatch, library_module, name: str, fake, *command_modules: str) -> None:
    """Replace ``library_module.name`` and the command modules' own reference to it (whether
    they import it at the top or inside ``run``)."""
    monkeypatch.setattr(library_module, name, fake)
    for m in command_modules:
        module = importlib.import_module(m)
        if hasattr(module, name):
            monkeypatch.setattr(module, name, fake)


# --------------------------------------------------------------------------- train-align / train-caption


def _record_train(monkeypatch, tmp_path):
    from dvsa.train import launch

    seen = []

    def fake_train(cfg, task):
        seen.append((cfg, task))
        return launch.TrainOutcome(name="n", run_dir=str(tmp_path / "r"), run_id="a" * 32, tracking_uri="sqlite:///x",
                                   checkpoint=str(tmp_path / "ckpt"), latest_checkpoint=None, step=12, epoch=3,
                                   metrics={"val/rsum": 42.0})

    _replace(monkeypatch, launch, "train", fake_train, "dvsa.commands._train", "dvsa.commands.train_align",
             "dvsa.commands.train_caption")
    return seen


@pytest.mark.parametrize("command,task", [("train-align", "align"), ("train-caption", "caption")])
def test_train_commands_pass_the_task_and_overrides_and_write_the_outcome(command, task, monkeypatch, tmp_path):
    from dvsa.commands import _train  # noqa: F401  (the shared body of both commands)

    seen = _record_train(monkeypatch, tmp_path)
    outcome = tmp_path / "outcome.json"
    rc = main([command, "--config", TINY, "--outcome-json", str(outcome), "train.epochs=3", "caption.cell=rnn"])
    assert rc == 0
    (cfg, got_task), = seen
    assert got_task == task and cfg.task == task
    assert cfg.train.epochs == 3 and cfg.caption.cell == "rnn"
    assert cfg.name == "tiny" and cfg.model.backbone == "tiny"          # the rest from the preset
    assert json.loads(outcome.read_text()) == {
        "name": "n", "run_dir": str(tmp_path / "r"), "run_id": "a" * 32, "tracking_uri": "sqlite:///x",
        "checkpoint": str(tmp_path / "ckpt"), "latest_checkpoint": None, "step": 12, "epoch": 3,
        "metrics": {"val/rsum": 42.0}, "resumed": False}


def test_train_commands_refuse_bad_input_before_ray(tmp_path, capsys):
    """Real train(): its input checks run first, so these never start Ray."""
    assert main(["train-align", "model.nope=1"]) == 2
    assert "dvsa train-align: config error: " in capsys.readouterr().err
    assert main(["train-align", "task=caption"]) == 2
    assert "this job trains 'align' but the config says 'caption'" in capsys.readouterr().err
    missing = tmp_path / "none"
    assert main(["train-align", f"out={tmp_path}", f"data.fullframe_shards={missing}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dvsa train-align: error: data.fullframe_shards: no such shard directory")
    assert main(["train-caption", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err
    assert not (tmp_path / "ray").exists() and not list(tmp_path.glob("**/session_*"))


# --------------------------------------------------------------------------- tune


def test_tune_command_names_the_sweep_and_writes_the_outcome(monkeypatch, tmp_path):
    import dvsa.tuning
    from dvsa.tuning.report import SweepOutcome, TrialRow

    seen = []
    result = SweepOutcome(name="s1", experiment_dir="/x", tracking_uri="sqlite:///y", parent_run_id="p",
                          metric="val/rsum", mode="max",
                          trials=[TrialRow("t0", "finished", 2, {"train.lr": 0.01}, 10.0, best=True)])

    def fake_sweep(cfg):
        seen.append(cfg)
        return result

    _replace(monkeypatch, dvsa.tuning, "run_sweep", fake_sweep, "dvsa.commands.tune")
    outcome = tmp_path / "o.json"
    rc = main(["tune", "--config", str(ROOT / "configs" / "tune_tiny.yaml"), "--name", "s1",
               "--outcome-json", str(outcome), "tune.num_samples=2"])
    assert rc == 0
    (cfg,), = [seen]
    assert cfg.tune.name == "s1" and cfg.tune.num_samples == 2
    assert json.loads(outcome.read_text()) == json.loads(json.dumps(asdict(result)))
    assert main(["tune", "tune.nope=1"]) == 2


# --------------------------------------------------------------------------- demo


def test_demo_command_options_and_strict_exit_code(monkeypatch, tmp_path, capsys):
    import dvsa.demo

    seen = []

    def fake_demo(opts):
        seen.append(opts)
        return dvsa.demo.DemoResult(checks=[("claim", "measured", False)])

    _replace(monkeypatch, dvsa.demo, "run_demo", fake_demo, "dvsa.commands.demo")
    assert main(["demo", "--images", "10"]) == 1
    assert "--images must be >= 50" in capsys.readouterr().err
    assert not seen
    assert main(["demo", "--out", str(tmp_path / "d"), "--images", "60", "--seed", "3", "train.epochs=1"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d"), "--strict", "--preset", "align=my.yaml"]) == 1  # a claim missed
    assert main(["demo", "--preset", "my.yaml"]) == 1
    assert "--preset 'my.yaml': expected MODEL=FILE" in capsys.readouterr().err
    first, second = seen
    assert (first.out, first.images, first.seed, first.overrides, first.presets) == (
        tmp_path / "d", 60, 3, ["train.epochs=1"], {})
    assert second.presets == {"align": Path("my.yaml")}
    assert second.images == dvsa.demo.DemoOptions(out=Path("x")).images      # the default world size


# --------------------------------------------------------------------------- features / snippets / evaluate


def test_features_command_refuses_bad_arguments_before_ray(tmp_path, capsys):
    assert main(["features", "--out", str(tmp_path / "f"), "--samples-per-shard", "0"]) == 1
    assert "--samples-per-shard: must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["features", "--out", str(tmp_path / "f"), "--splits", " , "]) == 1
    assert "--splits: name at least one split" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_snippets_command_refuses_bad_arguments_before_ray(tmp_path, capsys):
    base = ["snippets", "--checkpoint", str(tmp_path / "c"), "--shards", str(tmp_path / "s"),
            "--out", str(tmp_path / "o")]
    assert main(base + ["--splits", ","]) == 1
    assert "--splits: name at least one split" in capsys.readouterr().err
    assert main(base + ["--batch-size", "0"]) == 1
    assert "--batch-size and --concurrency must be >= 1" in capsys.readouterr().err
    assert main(base + ["--concurrency", "0"]) == 1
    assert not (tmp_path / "o").exists()


def test_evaluate_command_argument_errors(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--max-groups", "0"]) == 1
    assert "--max-groups must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", str(tmp_path), "--on", "video"])
    assert "invalid choice: 'video'" in capsys.readouterr().err


def test_evaluate_environment_keys_and_merge(tmp_path):
    from dvsa.commands.evaluate import format_metrics
    from dvsa.config import Config, ConfigError
    from dvsa.evaluation.job import EVAL_KEYS, environment_config, merged_config

    env, given = environment_config(None, ["caption.beam_size=5", f"out={tmp_path}"])
    assert given == {"caption.beam_size", "out"} and env.caption.beam_size == 5
    trained = Config().replace(**{"task": "caption", "caption.beam_size": 2, "model.hidden_dim": 8, "out": "elsewhere"})
    merged = merged_config(trained, env, given)
    assert (merged.caption.beam_size, merged.out, merged.model.hidden_dim, merged.task) == (
        5, str(tmp_path), 8, "caption")
    # a key in the YAML file counts as given too; a model key in an override is refused
    yml = tmp_path / "env.yaml"
    yml.write_text("data:\n  shards: /some/where\nmodel:\n  hidden_dim: 99\n")
    _, given = environment_config(str(yml), [])
    assert given == {"data.shards"}                       # model.* in a file is not applied
    with pytest.raises(ConfigError, match="model.embed_dim: cannot be changed at evaluation"):
        environment_config(None, ["model.embed_dim=4"])
    assert "data.shards" in EVAL_KEYS and "model.hidden_dim" not in EVAL_KEYS
    assert format_metrics({"region/METEOR": 0.123456, "region/queries": 12.0, "x": 1e7}) == (
        "  region/METEOR   0.1235\n  region/queries  12.0000\n  x               1e+07")


# --------------------------------------------------------------------------- stats / synth / prepare / compare


def test_synth_command_prints_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["synth", "--out", str(out), "--images", "4", "--seed", "2", "--image-size", "64",
                 "--phrases-per-object", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    truth = json.loads((out / "truth.json").read_text())["images"]
    regions = json.loads((out / "vg" / "region_descriptions.json").read_text())
    n_regions = sum(len(r["regions"]) for r in regions)
    n_sentences = sum(len(t["sentences"]) for t in truth)
    assert len(truth) == 4 and n_sentences == 4 * 5
    assert n_regions == sum(len(t["objects"]) for t in truth)          # one phrase per object
    assert printed[0].startswith(f"wrote 4 images, {n_regions} region phrases, {n_sentences} sentences to {out}")
    assert printed[1] == (f"  next: dvsa prepare vg --root {out}/vg --split-file {out}/vg/densecap_splits.json "
                          f"--out OUT")


def test_stats_command_refuses_shards_without_captions(tmp_path, capsys):
    from dvsa.data.shards import ShardWriter

    with ShardWriter(str(tmp_path / "s"), "train", 1 << 20) as w:
        w.write("0001", b"", {"image_id": 1, "split": "train", "regions": [], "sentences": []})
    assert main(["stats", str(tmp_path / "s"), "--out", str(tmp_path / "o")]) == 1
    assert "no captions in split 'train'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_command_needs_a_store(tmp_path, capsys):
    assert main(["compare", "--experiment", "e", "--runs", str(tmp_path)]) == 1
    assert f"no MLflow store at {tmp_path.resolve()}" in capsys.readouterr().err
