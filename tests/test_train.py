"""Training: schedule, checkpoints, input checks, and one end-to-end job per model (the demo's
three jobs, trained once per session), each checked against exact expectations."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from run_checks import (
    CAPTION_METRICS,
    checkpoint_epochs,
    close,
    coco_caption_scores,
    retrieval_by_hand,
    split_count,
    steps_per_epoch,
    validation_captions,
)

from dvsa.config import ConfigError, load_config
from dvsa.errors import DataError, DvsaError
from dvsa.inference.checkpoints import best_checkpoint_dir, load_trained, resolve_checkpoint
from dvsa.models.checkpoint import STATE_FILE, load_state, save_checkpoint, score_metric
from dvsa.models.optim import build_optimizer
from dvsa.train import common
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
    from dvsa.models.build import build_model
    from dvsa.text import Vocab

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
    # ... unless the run's config selects its last checkpoint (train.checkpoint_select=last)
    assert resolve_checkpoint(str(tmp_path)).name == "checkpoint_a"
    last = cfg.replace(**{"train.checkpoint_select": "last"})
    for name, step, meteor in (("checkpoint_a", 7, 0.25), ("checkpoint_b", 9, 0.1)):
        save_checkpoint(tmp_path / "last" / name, model=model, step=step, epoch=step // 3, vocab=vocab, cfg=last,
                        metrics={"val/METEOR": meteor, "step": step})
    assert score_metric(last) == ("step", "max")
    assert resolve_checkpoint(str(tmp_path / "last")).name == "checkpoint_b"
    with pytest.raises(DvsaError, match="no such checkpoint"):
        load_trained(str(tmp_path / "missing"))


def test_inputs_checked_before_ray(shards, tmp_path):
    from dvsa.train.launch import check_inputs, total_steps

    cfg = tiny_cfg(shards, tmp_path)
    manifest = check_inputs(cfg, "caption")
    assert total_steps(cfg, manifest) == (manifest.split_count("train", "images") // 8) * 2
    assert total_steps(cfg.replace(**{"train.max_steps": 3}), manifest) == 3
    with pytest.raises(ConfigError, match="task: this job trains 'align'"):
        check_inputs(cfg, "align")
    with pytest.raises(DataError, match="data.shards: no such shard directory"):
        check_inputs(cfg.replace(**{"data.shards": str(tmp_path / "nope")}), "caption")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="manifest.json"):
        check_inputs(cfg.replace(**{"data.shards": str(empty)}), "caption")


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    """`dvsa train-*` in this process, and the cluster's job entry point as its own process (one
    interpreter start: the whole process prints the one line)."""
    from dvsa.cli import main

    def one_line(stderr: str) -> list:
        return ["dvsa train-caption: config error: train.optimiser: unknown key (allowed: "
                + stderr.split("(allowed: ")[1].strip()]

    tiny = str(ROOT / "configs" / "tiny.yaml")
    assert main(["train-caption", "--config", tiny, "train.optimiser=adam"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == one_line(err)
    p = subprocess.run([sys.executable, "-m", "jobs.train_caption", "--config", tiny, "train.optimiser=adam"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == one_line(p.stderr)
    assert main(["train-align", "--config", tiny, f"data.fullframe_shards={tmp_path}/none", f"out={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.fullframe_shards: no such shard directory" in err[0]
    assert not (tmp_path / "ray-tmp").exists()          # refused before any Ray work


# --------------------------------------------------------------------------- end to end
# The session's trained models are the three training jobs of `dvsa demo` (conftest.demo_run:
# an 80-image world, 1 epoch, batch 16, train/loss every step, 4 validation images). Each test
# checks one job's run against what its inputs dictate: steps from the manifest, the validation
# rows from the shards, the logged metrics recomputed independently from the run's own output.


@dataclass
class Job:
    cfg: Any
    run: Any                 # mlflow Run
    client: Any
    uri: str
    root: Path               # the shards the job trained on

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def history(self, key: str) -> list:
        return sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp))

    def artifact_json(self, path: str):
        return json.loads(Path(self.client.download_artifacts(self.run_id, path)).read_text())


def _job(demo_run, key: str) -> Job:
    from mlflow.tracking import MlflowClient

    from dvsa.train.launch import shards_root

    opts, res = demo_run
    uri = f"sqlite:///{opts.out / 'mlflow.db'}"
    c = MlflowClient(uri)
    run = c.get_run(res.runs[key])
    cfg = load_config(c.download_artifacts(run.info.run_id, "config.yaml"))
    return Job(cfg, run, c, uri, Path(shards_root(cfg)))


def _check_run(job: Job) -> int:
    """What every training job leaves behind, exactly; returns the steps per epoch."""
    from dvsa.tracking import param_value

    cfg, run, t = job.cfg, job.run, job.cfg.train
    per_epoch = steps_per_epoch(job.root, cfg.data.batch_size, t.num_workers)
    steps = per_epoch * t.epochs
    assert per_epoch > 0
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert (m["final/step"], m["final/epoch"]) == (steps, t.epochs)
    # checkpoints: the latest is the last epoch's; the best is the one the run is tagged with
    ref = job.artifact_json("checkpoint.json")
    latest, best = load_state(ref["latest"]), load_state(ref["best"])
    assert (latest["step"], latest["epoch"]) == (steps, t.epochs)
    assert run.data.tags["dvsa.checkpoint"] == ref["best"] and best["metrics"] == ref["best_metrics"]
    assert best["epoch"] in checkpoint_epochs(t.epochs, t.checkpoint_every)
    if t.checkpoint_select == "last":    # the run's model is the last checkpoint, not the best by val
        assert ref["best"] == ref["latest"] and ref["metric"] == "step"
    assert {k: m[f"best/{k}"] for k in best["metrics"] if k.startswith("val/")} == \
        {k: v for k, v in best["metrics"].items() if k.startswith("val/")}
    kept = min(len(checkpoint_epochs(t.epochs, t.checkpoint_every)), t.keep_checkpoints)
    assert len([p for p in Path(ref["run_dir"]).glob("checkpoint_*") if p.is_dir()]) == kept
    # MLflow: every config key as a param; the loss every log_every steps; val every val epoch
    assert run.data.params == {k: param_value(v) for k, v in cfg.flat().items()}
    arts = {a.path for a in job.client.list_artifacts(job.run_id)}
    assert {"checkpoint.json", "vocab.json", "config.yaml", "plots"} <= arts
    assert [h.step for h in job.history("train/loss")] == list(range(t.log_every, steps + 1, t.log_every))
    ckpt_epochs = checkpoint_epochs(t.epochs, t.checkpoint_every)
    val_epochs = [e for e in range(1, t.epochs + 1) if e % t.val_every == 0 or e in ckpt_epochs]
    assert [h.step for h in job.history("val/loss")] == [per_epoch * e for e in val_epochs]
    return per_epoch


def _check_captions(job: Job, meteor) -> None:
    """The validation rows are the shards' first val images' captions; the logged metrics are
    pycocoevalcap's on the run's own generated captions (all in the sample table)."""
    from dvsa.text import Vocab

    cfg, m = job.cfg, job.run.data.metrics
    vocab = Vocab.load(str(job.root / "vocab.json"))
    expected = validation_captions(job.root, cfg.caption.mode, cfg.data.max_val_images,
                                   cfg.caption.max_regions_per_image, cfg.data.max_len, vocab)
    assert 0 < len(expected) <= 16, "the sample table keeps 16 rows: keep data.max_val_images small"
    assert m["val/captions"] == len(expected)
    assert len(job.history("val/METEOR")) == cfg.train.epochs
    table = job.artifact_json("samples/val_captions.json")
    assert table["columns"] == ["image_id", "generated", "reference"]
    assert [(row[0], row[2]) for row in table["data"]] == expected
    refs = {i: [row[2]] for i, row in enumerate(table["data"])}
    hyps = {i: row[1] for i, row in enumerate(table["data"])}
    theirs = coco_caption_scores(refs, hyps, meteor)
    for k in CAPTION_METRICS:
        assert close(m[f"val/{k}"], theirs[k]), (k, m[f"val/{k}"], theirs[k])


@pytest.fixture(scope="module")
def coco_meteor():
    """pycocoevalcap's own METEOR (one JVM for the module)."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    yield meteor
    del meteor


def test_region_captioner_end_to_end(demo_run, coco_meteor):
    job = _job(demo_run, "region")
    _check_run(job)
    tags = job.run.data.tags
    assert (tags["task"], tags["mode"], tags["cell"], tags["dataset"]) == ("caption", "region", "lstm", "vg")
    _check_captions(job, coco_meteor)
    pics = [a.path for a in job.client.list_artifacts(job.run_id, "pictures")]
    assert len(pics) == 1 and pics[0].endswith(".png")
    # the checkpoint loads back by MLflow run id, as a CaptioningModel with its vocabulary
    model, vocab, cfg2 = load_trained(job.run_id, tracking_uri=job.uri)
    assert type(model).__name__ == "CaptioningModel" and cfg2 == job.cfg
    assert len(vocab) == model.captioner.vocab_size


def test_fullframe_captioner_end_to_end(demo_run, coco_meteor):
    job = _job(demo_run, "fullframe")
    _check_run(job)
    tags = job.run.data.tags
    assert (tags["task"], tags["mode"], tags["cell"], tags["dataset"]) == ("caption", "fullframe", "lstm", "karpathy")
    assert job.run.data.metrics["val/captions"] == min(job.cfg.data.max_val_images, split_count(job.root, "val"))
    _check_captions(job, coco_meteor)


def test_alignment_end_to_end(demo_run, ray_local):
    """The logged retrieval metrics are those of the saved checkpoint on the first val images,
    rebuilt here (same dataset builder) and ranked by hand."""
    from dvsa.ingest import build_dataset, iter_eval_batches, normalize_images
    from dvsa.models.alignment import ranking_loss

    job = _job(demo_run, "align")
    _check_run(job)
    cfg, m = job.cfg, job.run.data.metrics
    assert job.run.data.tags["task"] == "align"
    for k in ("val/i2t_r1", "val/i2t_r10", "val/t2i_r5", "val/t2i_medr", "val/rsum"):
        assert len(job.history(k)) == cfg.train.epochs
    n = min(cfg.data.max_val_images, split_count(job.root, "val"))
    assert m["val/images"] == n
    ckpt = job.run.data.tags["dvsa.checkpoint"]
    model, vocab, cfg2 = load_trained(ckpt)
    assert type(model).__name__ == "AlignmentModel" and cfg2 == cfg
    assert load_state(ckpt)["epoch"] == cfg.train.epochs       # 1 epoch: its metrics are the last logged
    ds = build_dataset(str(job.root), "val", "align", cfg, vocab, seed=cfg.train.seed, shuffle=False,
                       preserve_order=True).limit(cfg.data.max_val_images)
    batches = list(iter_eval_batches(ds, 64))
    assert len(batches) == 1 and len(batches[0]["box_mask"]) == n
    b = batches[0]
    with torch.no_grad():
        emb, emb_mask = model.embed_regions(normalize_images(b["images"]), b["boxes"], b["box_mask"].bool())
        s, s_mask = model.embed_words(b["tokens"], b["lengths"])
        S = model.scores(emb, emb_mask, s, s_mask).float()
        loss = float(ranking_loss(S, margin=cfg.align.margin, hardest=cfg.align.loss == "hardest"))
    by_hand = retrieval_by_hand(S.tolist())
    for k, v in by_hand.items():
        assert close(m[f"val/{k}"], v), (k, m[f"val/{k}"], v)
    assert close(m["val/loss"], loss, 1e-5)
