"""Training: schedule, checkpoints, input checks, and one end-to-end job per model on a local Ray."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvsa.config import ConfigError, load_config
from dvsa.errors import DataError, DvsaError
from dvsa.models.optim import build_optimizer
from dvsa.train import common
from dvsa.train.checkpoints import (STATE_FILE, best_checkpoint_dir, load_state, load_trained,
                                    save_checkpoint)
from dvsa.train.loop import cap_images

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(shards, out, *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"out={out}", f"data.shards={shards / 'vg'}", f"data.fullframe_shards={shards / 'kp'}",
        f"train.storage_path={out / 'ray_results'}", "data.max_val_images=12", *overrides])


# --------------------------------------------------------------------------- units


def test_lr_schedules_by_hand():
    f = common.lr_factor("cosine", 10)
    assert [round(f(s), 6) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    g = common.lr_factor("step", 8)
    assert [g(s) for s in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert common.lr_factor("constant", 3)(100) == 1.0


def test_cap_images_cuts_the_stream_exactly():
    batches = [{"images": torch.zeros(4, 1), "x": torch.arange(4)} for _ in range(3)]
    got = list(cap_images(iter(batches), 6))
    assert [len(b["x"]) for b in got] == [4, 2]
    assert [len(b["x"]) for b in cap_images(iter(batches), 0)] == [4, 4, 4]
    assert [len(b["x"]) for b in cap_images(iter(batches), 8)] == [4, 4]


def test_checkpoint_roundtrip_without_pickle(shards, tmp_path):
    from dvsa.text import Vocab
    from dvsa.train.build import build_model

    cfg = tiny_cfg(shards, tmp_path)
    vocab = Vocab.load(str(shards / "vg" / "vocab.json"))
    model = build_model(cfg, vocab)
    opt = build_optimizer(model.parameters(), cfg.train)
    sched = common.build_scheduler(opt, cfg.train, 10)
    model(torch.zeros(1, 3, 64, 64), [torch.tensor([[0.0, 0.0, 32.0, 32.0]])],
          torch.ones(1, 5, dtype=torch.long)).sum().backward()
    opt.step()
    sched.step()
    d = save_checkpoint(tmp_path / "checkpoint_a", model=model, optimizer=opt, scheduler=sched, step=7, epoch=2,
                        vocab=vocab, cfg=cfg, metrics={"val/METEOR": 0.25})
    state = load_state(d)
    assert state["step"] == 7 and state["epoch"] == 2 and state["metrics"] == {"val/METEOR": 0.25}
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 1
    m2, v2, c2 = load_trained(str(d))
    assert v2 == vocab and c2 == cfg and not m2.training
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    # a pickled object inside state.pt is refused (weights_only)
    import datetime

    torch.save({"model": {}, "evil": datetime.date(2020, 1, 1)}, tmp_path / "bad.pt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad.pt").rename(tmp_path / "bad" / STATE_FILE)
    with pytest.raises(DvsaError, match="cannot load checkpoint"):
        load_state(tmp_path / "bad")
    # a run dir: best by the metric wins over the latest
    save_checkpoint(tmp_path / "checkpoint_b", model=model, step=9, epoch=3, vocab=vocab, cfg=cfg,
                    metrics={"val/METEOR": 0.1})
    assert best_checkpoint_dir(tmp_path, "val/METEOR", "max").name == "checkpoint_a"
    assert best_checkpoint_dir(tmp_path).name == "checkpoint_b"
    with pytest.raises(DvsaError, match="no such checkpoint"):
        load_trained(str(tmp_path / "missing"))


def test_inputs_checked_before_ray(shards, tmp_path):
    from dvsa.train.launch import check_inputs, total_steps

    cfg = tiny_cfg(shards, tmp_path)
    manifest = check_inputs(cfg, "caption")
    assert total_steps(cfg, manifest) == (manifest["splits"]["train"]["images"] // 8) * 2
    assert total_steps(cfg.replace(**{"train.max_steps": 3}), manifest) == 3
    with pytest.raises(ConfigError, match="task: this job trains 'align'"):
        check_inputs(cfg, "align")
    with pytest.raises(DataError, match="data.shards: no such shard directory"):
        check_inputs(cfg.replace(**{"data.shards": str(tmp_path / "nope")}), "caption")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="manifest.json"):
        check_inputs(cfg.replace(**{"data.shards": str(empty)}), "caption")


def test_cli_config_errors_are_one_line(tmp_path):
    for argv in (["-m", "dvsa.cli", "train-caption"], ["-m", "jobs.train_caption"]):
        p = subprocess.run([sys.executable, *argv, "--config", str(ROOT / "configs" / "tiny.yaml"),
                            "train.optimiser=adam"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 2
        assert p.stderr.strip().splitlines() == [
            "dvsa train-caption: config error: train.optimiser: unknown key (allowed: " + p.stderr.split(
                "(allowed: ")[1].strip()]
    p = subprocess.run([sys.executable, "-m", "dvsa.cli", "train-align", "--config", str(ROOT / "configs" / "tiny.yaml"),
                        f"data.fullframe_shards={tmp_path}/none", f"out={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "data.fullframe_shards: no such shard directory" in p.stderr
    assert not (tmp_path / "ray-tmp").exists()          # refused before any Ray work


# --------------------------------------------------------------------------- end to end


def _run_contents(outcome):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(outcome.tracking_uri)
    run = c.get_run(outcome.run_id)
    arts = {a.path for a in c.list_artifacts(outcome.run_id)}
    return c, run, arts


def _check_common(outcome, cfg, steps_per_epoch_min=1):
    assert outcome.epoch == cfg.train.epochs and outcome.step >= cfg.train.epochs * steps_per_epoch_min
    state = load_state(outcome.checkpoint)
    assert state["epoch"] >= 1 and state["step"] >= 1
    ckpts = [p for p in Path(outcome.run_dir).glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(ckpts) <= cfg.train.keep_checkpoints
    c, run, arts = _run_contents(outcome)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)
    assert run.data.params["model.backbone"] == "tiny" and len(run.data.params) == len(cfg.flat())
    assert {"checkpoint.json", "vocab.json", "config.yaml", "plots"} <= arts
    loss = c.get_metric_history(outcome.run_id, "train/loss")
    assert [m.step for m in loss] == list(range(cfg.train.log_every, outcome.step + 1, cfg.train.log_every)) \
        or loss[-1].step == outcome.step
    val = c.get_metric_history(outcome.run_id, "val/loss")
    assert len(val) == cfg.train.epochs and all(m.value > 0 for m in val)
    assert run.data.tags["dvsa.checkpoint"] == outcome.checkpoint
    return c, run, arts


@pytest.mark.ray
def test_region_captioner_end_to_end(ray_local, shards, tmp_path):
    from dvsa.train.launch import train

    cfg = tiny_cfg(shards, tmp_path, "caption.mode=region", "caption.cell=lstm", "train.name=region-e2e")
    outcome = train(cfg, "caption")
    c, run, arts = _check_common(outcome, cfg)
    assert run.data.tags["task"] == "caption" and run.data.tags["mode"] == "region"
    assert run.data.tags["dataset"] == "vg"
    meteor = c.get_metric_history(outcome.run_id, "val/METEOR")
    assert len(meteor) == cfg.train.epochs and all(0.0 <= m.value <= 1.0 for m in meteor)
    assert "samples" in arts and "pictures" in arts
    pics = [a.path for a in c.list_artifacts(outcome.run_id, "pictures")]
    assert len(pics) == 1 and pics[0].endswith(".png")
    table = json.load(open(c.download_artifacts(outcome.run_id, "samples/val_captions.json")))
    assert table["columns"] == ["image_id", "generated", "reference"] and table["data"]
    # the checkpoint loads back by MLflow run id, as a CaptioningModel with its vocabulary
    model, vocab, cfg2 = load_trained(outcome.run_id, tracking_uri=outcome.tracking_uri)
    assert type(model).__name__ == "CaptioningModel" and cfg2.caption.mode == "region"
    assert len(vocab) == model.captioner.vocab_size


@pytest.mark.ray
def test_fullframe_rnn_captioner_end_to_end(ray_local, shards, tmp_path):
    from dvsa.train.launch import train

    cfg = tiny_cfg(shards, tmp_path, "caption.mode=fullframe", "caption.cell=rnn", "train.epochs=1",
                   "train.name=ff-e2e")
    outcome = train(cfg, "caption")
    c, run, arts = _check_common(outcome, cfg)
    assert run.data.tags["mode"] == "fullframe" and run.data.tags["cell"] == "rnn"
    assert run.data.tags["dataset"] == "karpathy"
    n_val = json.loads((shards / "kp" / "manifest.json").read_text())["splits"]["val"]["images"]
    assert "val/METEOR" in outcome.metrics and outcome.metrics["val/captions"] == min(12, n_val)


@pytest.mark.ray
def test_alignment_end_to_end(ray_local, shards, tmp_path):
    from dvsa.train.launch import train

    cfg = tiny_cfg(shards, tmp_path, "train.name=align-e2e", "train.epochs=1")
    cfg = cfg.replace(task="align")
    outcome = train(cfg, "align")
    c, run, arts = _check_common(outcome, cfg)
    assert run.data.tags["task"] == "align"
    for k in ("val/i2t_r1", "val/i2t_r10", "val/t2i_r5", "val/t2i_medr", "val/rsum"):
        assert len(c.get_metric_history(outcome.run_id, k)) == cfg.train.epochs
    # n validation images (one sentence each): R@10 covers at least min(10, n)/n of the queries
    n = json.loads((shards / "kp" / "manifest.json").read_text())["splits"]["val"]["images"]
    n = min(12, n)
    assert outcome.metrics["val/images"] == n
    assert outcome.metrics["val/i2t_r10"] >= 100 * min(10, n) / n - 1e-6
    model, vocab, cfg2 = load_trained(outcome.checkpoint)
    assert type(model).__name__ == "AlignmentModel" and cfg2.task == "align"
