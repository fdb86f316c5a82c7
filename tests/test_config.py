"""Typed configuration: presets + overrides, validated with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvsa.config import Config, ConfigError, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.align.margin == 1.0
    assert cfg.flat()["train.lr"] == cfg.train.lr


def test_overrides_parse_yaml_scalars():
    ov = parse_overrides(["train.lr=1e-2", "train.use_gpu=true", "mlflow.tracking_uri=null", "name=x"])
    assert ov == {"train.lr": 0.01, "train.use_gpu": True, "mlflow.tracking_uri": None, "name": "x"}


def test_override_applies_and_coerces(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n  epochs: 3\ncaption:\n  mode: fullframe\n")
    cfg = load_config(p, ["train.epochs=7", "model.embed_dim=64", "train.weight_decay=0"])
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 7
    assert cfg.caption.mode == "fullframe"
    assert cfg.model.embed_dim == 64
    assert isinstance(cfg.train.weight_decay, float)


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.optimizer=adamw"], "train.optimizer: 'adamw' is not one of 'adam', 'rmsprop', 'sgd'"),
        (["train.lrr=0.1"], "train.lrr: unknown key (allowed:"),
        (["trian.lr=0.1"], "trian: unknown key (allowed:"),
        (["train.epochs=two"], "train.epochs: expected an integer, got 'two'"),
        (["train.use_gpu=maybe"], "train.use_gpu: expected true or false"),
        (["train.epochs=0"], "train.epochs: must be a positive integer"),
        (["model.dropout=1.5"], "model.dropout: must be in [0, 1)"),
        (["caption.mode=pixel"], "caption.mode: 'pixel' is not one of 'fullframe', 'region'"),
        (["train.lr"], "is not of the form key=value"),
        (["data.max_len=2"], "data.max_len: must be >= 3"),
        (["train.grad_clip_mode=elementwise"], "train.grad_clip_mode: 'elementwise' is not one of 'value', 'norm'"),
        (["align.whole_image=sometimes"], "align.whole_image: expected true or false"),
        (["train.grad_clip=nan"], "train.grad_clip: must be a finite number, got nan"),
        (["train.lr=nan"], "train.lr: must be a finite number, got nan"),
        (["train.cpus_per_worker=nan"], "train.cpus_per_worker: must be a finite number"),
        (["model.dropout=inf"], "model.dropout: must be a finite number, got inf"),
        (["ray.num_cpus=-1"], "ray.num_cpus: must be >= 0 or null, got -1"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value) and "line" in str(e.value)


def test_box_geometry_needs_images_not_features():
    with pytest.raises(ConfigError, match="model.box_geometry: needs the images and boxes"):
        load_config(None, ["model.box_geometry=true", "data.features=runs/feats"])


def test_missing_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/x.yaml")


def test_tune_space_validated():
    ok = load_config(None, {"tune.space": {"train.lr": {"loguniform": [1e-4, 1e-2]},
                                           "caption.cell": {"choice": ["rnn", "lstm"]}}})
    assert "train.lr" in ok.tune.space
    with pytest.raises(ConfigError, match="tune.space.train.nope: 'train.nope' is not a config key"):
        load_config(None, {"tune.space": {"train.nope": {"choice": [1]}}})
    with pytest.raises(ConfigError, match="candidate 'gru' is invalid"):
        load_config(None, {"tune.space": {"caption.cell": {"choice": ["rnn", "gru"]}}})
    with pytest.raises(ConfigError, match="low must be < high"):
        load_config(None, {"tune.space": {"train.lr": {"uniform": [0.1, 0.01]}}})


def test_replace_and_roundtrip(tmp_path):
    cfg = load_config().replace(**{"train.lr": 0.25})
    assert cfg.train.lr == 0.25
    out = tmp_path / "resolved.yaml"
    cfg.save(out)
    assert load_config(out).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_presets_validate(preset):
    load_config(CONFIGS / preset)


def test_a_preset_extends_its_base(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text("name: b\ntrain:\n  lr: 0.1\n  epochs: 3\nalign:\n  margin: 2\n")
    (tmp_path / "mid.yaml").write_text("base: shared/base.yaml\ntrain:\n  lr: 0.2\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ntask: align\nalign:\n  whole_image: false\n")
    cfg = load_config(tmp_path / "top.yaml", ["train.epochs=5"])
    # the nearest file wins key by key; sections merge; overrides win over every file
    assert (cfg.name, cfg.task, cfg.train.lr, cfg.train.epochs) == ("b", "align", 0.2, 5)
    assert (cfg.align.margin, cfg.align.whole_image) == (2.0, False)
    assert load_config(tmp_path / "top.yaml").train.epochs == 3


def test_a_bad_base_names_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="presets extend each other in a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base: no such file: .*nope.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="d.yaml: base: expected the file name of a preset"):
        load_config(tmp_path / "d.yaml")


def test_the_demo_presets_extend_demo_yaml():
    shared = load_config(CONFIGS / "demo.yaml").flat()
    for name, own in (("demo_align.yaml", {"task", "data.image_size", "align.whole_image", "train.lr",
                                           "train.grad_clip_mode", "train.epochs", "train.lr_schedule",
                                           "model.box_geometry", "train.checkpoint_select"}),
                      ("demo_region.yaml", {"caption.mode", "train.epochs"}),
                      ("demo_fullframe.yaml", {"caption.mode"})):
        flat = load_config(CONFIGS / name).flat()
        assert {k for k in flat if flat[k] != shared[k]} <= own, name
