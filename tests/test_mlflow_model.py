"""Trained models through the tracking server: a checkpoint logged as an MLflow model
(``runs:/<run id>/model``, registered: ``models:/<name>/latest``), loaded with
``mlflow.pyfunc.load_model`` (in a fresh process for the trained captioner), and ``--checkpoint``
URIs in ``dvsa evaluate`` / ``caption`` (resolved, cached, logged into the model's run; a URI
that does not resolve is one line). The HTTP case (the cluster's tracking server proxying the
artifacts, over PostgreSQL) is in tests/test_cluster_rehearsal.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_fixtures import ROOT, chain_captioner, save, tiny_cfg
from PIL import Image
from test_evaluate import HAND_RETRIEVAL
from test_evaluate import colour_world as colour_world  # noqa: F401  (a fixture, used by name)

from dvsa import tracking
from dvsa.cli import main
from dvsa.config import ConfigError, load_config
from dvsa.text import Vocab

WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left"]


@pytest.fixture(autouse=True)
def _model_cache(tmp_path, monkeypatch):
    """Each test downloads models into its own cache; no MLFLOW_TRACKING_URI from outside."""
    monkeypatch.setenv("DVSA_MODEL_CACHE", str(tmp_path / "model-cache"))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _logged(ckpt: Path, uri: str, experiment: str, registered: str | None):
    """A run holding ``ckpt`` as its MLflow model (registered as ``registered``): (run id, LoggedModel)."""
    from dvsa.inference.mlflow_model import log_model

    run, _ = tracking.start_run(uri, experiment, experiment, {"task": "test"})
    run.set_tags({tracking.CHECKPOINT_TAG: str(ckpt)})
    logged = log_model(ckpt, uri, run.run_id, registered_name=registered, step=7)
    run.end("FINISHED")
    return run.run_id, logged


def _square_jpeg(path: Path, colour) -> Path:
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    im.paste(colour, (16, 16, 48, 48))
    im.save(path, format="JPEG", quality=95)
    return path


@pytest.fixture(scope="module")
def colour_store(colour_world, tmp_path_factory):
    """The colour aligner of tests/test_evaluate.py logged into a SQLite store, registered as
    ``colour``: (uri, run id, LoggedModel, checkpoint, Karpathy shards)."""
    kp, ckpt, _ = colour_world
    d = tmp_path_factory.mktemp("colour_store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    rid, logged = _logged(ckpt, uri, "colour", "colour")
    return uri, rid, logged, ckpt, kp


# --------------------------------------------------------------------------- logging


def test_the_logged_model_holds_the_checkpoint_and_is_registered(colour_store):
    from mlflow.entities import LoggedModelStatus

    from dvsa.inference.checkpoints import resolve_checkpoint
    from dvsa.models.checkpoint import load_state

    uri, rid, logged, ckpt, _ = colour_store
    assert logged.uri == f"runs:/{rid}/model" and logged.registered == "models:/colour/1"
    c = tracking.client(uri)
    run = c.get_run(rid)
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    lm = c.get_logged_model(logged.model_id)
    assert lm.name == "model" and lm.source_run_id == rid and lm.status == LoggedModelStatus.READY
    files = resolve_checkpoint(logged.uri, uri)
    assert sorted(p.name for p in files.iterdir()) == ["checkpoint.json", "config.yaml", "state.pt", "vocab.json"]
    state, original = load_state(files), load_state(ckpt)
    assert state["optimizer"] is None and state["step"] == original["step"] == 7
    assert all(torch.equal(state["model"][k], v) for k, v in original["model"].items())
    # both URI forms resolve to the same logged model and its run, and to one cached download
    for form in (logged.uri, "models:/colour/latest", "models:/colour/1"):
        assert tracking.model_source(uri, form).run_id == rid
        assert resolve_checkpoint(form, uri) == files
    requirements = (Path(tracking.download_model_files(uri, tracking.model_source(uri, logged.uri), "requirements.txt",
                                                       files.parent / "req"))).read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "torchvision", "pillow"}
    assert logged.seconds < 30


def test_registered_model_names(tmp_path):
    from dvsa.train.launch import registered_model_name

    def cfg(*overrides):
        return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))

    assert registered_model_name(cfg("train.name=region-lstm")) == "region-lstm"
    assert registered_model_name(cfg("task=caption", "caption.mode=region", "caption.cell=rnn")) == \
        "tiny-caption-region-rnn"
    assert registered_model_name(cfg("train.name=my run/2", "task=align")) == "my-run-2"
    assert registered_model_name(cfg("train.name=x", "mlflow.registered_model=vg.region_v2")) == "vg.region_v2"
    assert registered_model_name(cfg("mlflow.register_model=false")) is None
    assert registered_model_name(cfg("mlflow.log_model=false")) is None
    for bad in ("a/b", "x@y", "-x", "a b", "v" * 201):
        with pytest.raises(ConfigError, match="mlflow.registered_model: .* is not a registered-model name"):
            cfg(f"mlflow.registered_model={bad}")


# --------------------------------------------------------------------------- the pyfunc models


def test_alignment_pyfunc_scores_a_pair_as_the_model_does(colour_store, tmp_path, monkeypatch):
    """S_kl from ``mlflow.pyfunc.load_model("runs:/<id>/model")`` equals the in-process model's
    (eq. 8 over the whole image + the given box, as training scores an image), for a path and
    for the file's bytes; the colour aligner says "red" only of the red image."""
    import mlflow.pyfunc
    import pandas as pd

    from dvsa.inference.alignment import embed_images, encode_sentences
    from dvsa.inference.checkpoints import load_trained

    uri, rid, logged, ckpt, _ = colour_store
    red, blue = _square_jpeg(tmp_path / "red.jpg", (230, 20, 20)), _square_jpeg(tmp_path / "blue.jpg", (20, 20, 230))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "path", list(sys.path))          # the model puts its code/ first
    pyfunc = mlflow.pyfunc.load_model(logged.uri)
    box = [16, 16, 48, 48]
    rows = pd.DataFrame({"image": [str(red), red.read_bytes(), str(red), str(blue)],
                         "sentence": ["red", "red", "blue", "blue square"], "boxes": [[box], [box], [box], [box]]})
    got = pyfunc.predict(rows)["score"].tolist()

    model, vocab, cfg = load_trained(str(ckpt))
    expected = []
    for path, sentence in zip((red, red, red, blue), ("red", "red", "blue", "blue square")):
        v, v_mask = embed_images(model, [path.read_bytes()], [[[0, 0, 64, 64], box]], cfg.data.image_size)
        s, s_mask = model.embed_words(*encode_sentences(vocab, [sentence.split()]))
        with torch.no_grad():
            expected.append(float(model.scores(v, v_mask, s, s_mask)[0, 0]))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got[0] == got[1] > 0 and got[2] == 0 and got[3] > 0
    # the signature's params and a box format of its own
    xywh = pyfunc.predict(rows.assign(boxes=[[[16, 16, 32, 32]]] * 4), params={"box_format": "xywh"})
    assert xywh["score"].tolist() == pytest.approx(got)


def test_captioner_pyfunc_captions_boxes_and_whole_images(tmp_path, monkeypatch):
    """A captioner's pyfunc: one row per box (clipped), the whole image without boxes; the
    decode params of its signature."""
    import mlflow.pyfunc
    import pandas as pd

    vocab = Vocab.build({w: 10 - i for i, w in enumerate(WORDS)}, 1, 20)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["task=caption", "caption.cell=rnn", "model.word_dim=16",
                                                       "model.hidden_dim=16", f"out={tmp_path}"])
    ckpt = save(chain_captioner(cfg, vocab, ["blue", "square"]), vocab, cfg, tmp_path / "ckpt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, logged = _logged(ckpt, uri, "chain", "chain")
    image = tmp_path / "scene.png"
    Image.new("RGB", (120, 90), (40, 40, 200)).save(image)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "path", list(sys.path))
    pyfunc = mlflow.pyfunc.load_model("models:/chain/latest")
    out = pyfunc.predict(pd.DataFrame({"image": [str(image), image.read_bytes()],
                                       "boxes": [[[10, 10, 50, 50], [60, 20, 200, 80]], None]}))
    assert out["row"].tolist() == [0, 0, 1] and set(out["caption"]) == {"blue square"}
    assert [list(b) for b in out["box"]] == [[10, 10, 50, 50], [60, 20, 120, 80], [0, 0, 120, 90]]
    assert (out["logprob"] < 0).all()
    greedy = pyfunc.predict(pd.DataFrame({"image": [str(image)]}), params={"decode": "greedy"})
    assert greedy["caption"].tolist() == ["blue square"]


# --------------------------------------------------------------------------- --checkpoint URIs


@pytest.mark.parametrize("form", ["runs", "models_latest"])
def test_evaluate_a_model_uri_logs_into_the_models_run(colour_store, tmp_path, capsys, form):
    """``dvsa evaluate --checkpoint runs:/<id>/model`` and ``models:/colour/latest``: the
    retrieval metrics land in the run that logged the model (no new run), at its step."""
    uri, rid, logged, _, kp = colour_store
    ref = logged.uri if form == "runs" else "models:/colour/latest"
    c = tracking.client(uri)
    runs_before = len(c.search_runs([c.get_experiment_by_name("colour").experiment_id]))
    out = tmp_path / "outcome.json"
    rc = main(["evaluate", "--checkpoint", ref, "--outcome-json", str(out), f"out={tmp_path}",
               f"mlflow.tracking_uri={uri}", f"data.fullframe_shards={kp}"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["run_id"] == rid
    run = c.get_run(rid)
    for k, v in HAND_RETRIEVAL.items():
        assert run.data.metrics[f"retrieval/{k}"] == pytest.approx(v)
    assert [h.step for h in c.get_metric_history(rid, "retrieval/i2t_r1")][-1] == 7
    assert run.data.tags["dvsa.eval.checkpoint"] == ref
    assert len(c.search_runs([run.info.experiment_id])) == runs_before


@pytest.mark.parametrize("ref, says", [
    ("models:/nope/latest", "no such registered model 'nope' in {uri}"),
    ("models:/colour/9", "registered model 'colour' has no version 9 in {uri}"),
    ("models:/colour@champion", "registered model 'colour' has no alias 'champion' in {uri}"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "no MLflow run 0123456789abcdef0123456789abcdef in {uri}"),
    ("runs:/{rid}/other", "MLflow run {rid} has no model 'other' (a dvsa training run logs 'model') in {uri}"),
    ("models:/colour/Production", "'Production' is not a version number or 'latest' (runs:/<run id>/model, "
                                  "models:/<name>/<version|latest>, models:/<name>@<alias>)"),
])
def test_a_uri_that_does_not_resolve_is_one_line(colour_store, tmp_path, capsys, ref, says):
    uri, rid, _, _, kp = colour_store
    ref = ref.format(rid=rid)
    rc = main(["evaluate", "--checkpoint", ref, f"out={tmp_path}", f"mlflow.tracking_uri={uri}",
               f"data.fullframe_shards={kp}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == f"dvsa evaluate: error: --checkpoint {ref}: {says.format(uri=uri, rid=rid)}\n"


def test_caption_and_search_take_model_uris(colour_store, tmp_path, capsys):
    """``dvsa search`` with ``models:/colour@best`` (an alias set by hand) finds the red regions;
    ``dvsa caption`` refuses an alignment model in one line."""
    uri, rid, logged, _, kp = colour_store
    tracking.client(uri).set_registered_model_alias("colour", "best", "1")
    assert main(["search", "red", "--checkpoint", "models:/colour@best", "--shards", str(kp), "--top", "2",
                 "--out", str(tmp_path / "s"), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "query 'red': top 2" in printed
    image = _square_jpeg(tmp_path / "red.jpg", (230, 20, 20))
    assert main(["caption", "--checkpoint", logged.uri, str(image), "--out", str(tmp_path / "c"),
                 "--tracking-uri", uri]) == 1
    assert capsys.readouterr().err == "dvsa caption: error: this checkpoint is a 'align' model, not a captioner\n"


@pytest.fixture()
def chain_eval(shards, tmp_path):
    """A captioner that says "blue square" of every box, logged and registered as ``chain-eval``:
    (uri, run id, LoggedModel)."""
    from dvsa.data.shards import load_vocab

    vocab = load_vocab(str(shards / "vg"))
    cfg = tiny_cfg(shards, tmp_path, "caption.mode=fullframe", "caption.cell=rnn", "model.word_dim=64",
                   "model.hidden_dim=64")
    ckpt = save(chain_captioner(cfg, vocab, ["blue", "square"]), vocab, cfg, tmp_path / "ckpt", step=9)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rid, logged = _logged(ckpt, uri, "chain-eval", "chain-eval")
    return uri, rid, logged


def test_a_captioning_actor_resolves_a_model_uri_itself(chain_eval, shards, tmp_path, monkeypatch):
    """Region evaluation hands a model URI to its Ray actors as it is: an actor (here called
    in-process on a raw shard batch) downloads the model into its own node's cache."""
    import numpy as np

    from dvsa.data.shards import iter_samples
    from dvsa.evaluation.regions import RegionCaptionActor

    uri, _, logged = chain_eval
    cache = tmp_path / "actor-cache"
    monkeypatch.setenv("DVSA_MODEL_CACHE", str(cache))
    samples = [s for _, s in zip(range(2), iter_samples(str(shards / "vg"), "test"))]
    batch = {"__key__": np.array([k for k, _, _ in samples], dtype=object),
             "jpg": np.array([j for _, j, _ in samples], dtype=object),
             "json": np.array([json.dumps(m).encode() for _, _, m in samples], dtype=object)}
    out = RegionCaptionActor("models:/chain-eval/latest", "groups", "cpu", tracking_uri=uri)(batch)
    assert len(out["caption"]) == sum(len(m["groups"]) for _, _, m in samples)
    assert set(out["caption"]) == {"blue square"}
    assert [p.name for p in cache.iterdir()] == [logged.model_id]


def test_evaluate_a_captioner_by_model_uri(chain_eval, shards, tmp_path, monkeypatch, capsys):
    """``dvsa evaluate --checkpoint models:/<name>/latest`` on a captioner passes the URI and its
    store to region evaluation (the Ray job, replaced here) and logs into the model's run."""
    from dvsa.evaluation import job
    from dvsa.evaluation.regions import RegionEvalResult

    uri, rid, _ = chain_eval
    seen = {}

    def fake_evaluate_regions(checkpoint, shards_root, split, options, tracking_uri=None):
        seen.update(checkpoint=checkpoint, tracking_uri=tracking_uri)
        return RegionEvalResult(metrics={"region/METEOR": 0.25, "region/queries": 3.0}, images=1)

    monkeypatch.setattr(job, "evaluate_regions", fake_evaluate_regions)
    monkeypatch.setattr(job.runtime, "ray_session", lambda *a, **k: contextlib.nullcontext())
    rc = main(["evaluate", "--checkpoint", "models:/chain-eval/latest", "--examples", "0", f"out={tmp_path}",
               f"mlflow.tracking_uri={uri}", f"data.shards={shards / 'vg'}"])
    assert rc == 0, capsys.readouterr().err
    assert seen == {"checkpoint": "models:/chain-eval/latest", "tracking_uri": uri}
    run = tracking.client(uri).get_run(rid)
    assert run.data.metrics["region/METEOR"] == 0.25
    assert [h.step for h in tracking.client(uri).get_metric_history(rid, "region/METEOR")] == [9]


# --------------------------------------------------------------------------- trained models (the demo's)


def _demo_store(demo_run) -> str:
    opts, _ = demo_run
    return f"sqlite:///{opts.out / 'mlflow.db'}"


def test_training_logs_and_registers_each_model(demo_run):
    """Every training job of the session's demo logged its best checkpoint as its run's model
    and registered it under its train name."""
    from dvsa.demo import RUN_NAMES
    from dvsa.inference.checkpoints import resolve_checkpoint
    from dvsa.models.checkpoint import load_state

    _, res = demo_run
    uri = _demo_store(demo_run)
    c = tracking.client(uri)
    for key, rid in res.runs.items():
        tags = c.get_run(rid).data.tags
        assert tags[tracking.MODEL_URI_TAG] == f"runs:/{rid}/model"
        assert tags[tracking.REGISTERED_MODEL_TAG].startswith(f"models:/{RUN_NAMES[key]}/")
        assert tracking.model_source(uri, f"models:/{RUN_NAMES[key]}/latest").run_id == rid
        # what dvsa evaluate logs into
        assert tracking.find_checkpoint_run(uri, f"models:/{RUN_NAMES[key]}/latest", Path("/nowhere")) == rid
        files = resolve_checkpoint(f"runs:/{rid}/model", uri)
        best = load_state(tags[tracking.CHECKPOINT_TAG])
        assert load_state(files)["step"] == best["step"]
        assert all(torch.equal(load_state(files)["model"][k], v) for k, v in best["model"].items())


_PYFUNC_CAPTION = """
import json, sys
import mlflow.pyfunc, pandas as pd
assert "dvsa" not in sys.modules
model = mlflow.pyfunc.load_model(sys.argv[1])
rows = json.loads(sys.argv[2])
out = model.predict(pd.DataFrame({"image": [r["image"] for r in rows], "boxes": [r["boxes"] for r in rows]}))
print(json.dumps({"rows": out["row"].tolist(), "boxes": [list(map(float, b)) for b in out["box"]],
                  "captions": out["caption"].tolist(), "logprobs": out["logprob"].tolist(),
                  "code": sys.modules["dvsa"].__file__}))
"""


def test_trained_captioner_from_runs_uri_in_a_fresh_process_captions_like_dvsa_caption(demo_run, tmp_path,
                                                                                      capsys):
    """The demo's region captioner: ``mlflow.pyfunc.load_model("runs:/<id>/model")`` in a new
    Python process (nothing of this process's state; dvsa imported from the model's own code)
    gives the captions and log probs ``dvsa caption --checkpoint <path>`` gives, box for box."""
    from dvsa.data.shards import iter_samples
    from dvsa.train.launch import shards_root

    opts, res = demo_run
    uri = _demo_store(demo_run)
    rid = res.runs["region"]
    run = tracking.client(uri).get_run(rid)
    cfg = load_config(tracking.client(uri).download_artifacts(rid, "config.yaml", str(tmp_path)))
    rows, boxes_file = [], {}
    for key, jpg, meta in iter_samples(shards_root(cfg), "test"):
        path = tmp_path / f"{key}.jpg"
        path.write_bytes(jpg)
        boxes = [r["box"] for r in meta["regions"][:3]]
        rows.append({"image": str(path), "boxes": boxes})
        boxes_file[path.name] = boxes
        if len(rows) == 3:
            break
    (tmp_path / "boxes.json").write_text(json.dumps(boxes_file))
    assert main(["caption", "--checkpoint", run.data.tags[tracking.CHECKPOINT_TAG], *[r["image"] for r in rows],
                 "--boxes", str(tmp_path / "boxes.json"), "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    theirs = json.loads((tmp_path / "c" / "captions.json").read_text())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", _PYFUNC_CAPTION, f"runs:/{rid}/model", json.dumps(rows)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/dvsa/" in ours["code"]          # the model's own copy of the package
    regions = [g for r in theirs for g in r["regions"]]
    assert ours["rows"] == [i for i, r in enumerate(theirs) for _ in r["regions"]]
    assert ours["boxes"] == [g["box"] for g in regions]
    assert ours["captions"] == [g["caption"] for g in regions]
    assert ours["logprobs"] == pytest.approx([g["logprob"] for g in regions], abs=1e-5)
