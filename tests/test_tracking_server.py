"""MLflow models through a tracking server over PostgreSQL (tests/tracking_server.py), the
artifacts on a directory standing for the shared volume: a model goes up through the server's
artifact proxy and is registered; ``runs:/`` and ``models:/`` URIs load it back over HTTP, in a
fresh process too. (Training jobs logging into such a server through an outage, on a two-node
cluster: tests/test_cluster_rehearsal.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tracking_server import TrackingServer, have_postgres

from dvsa.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    if not have_postgres():
        pytest.fail("PostgreSQL 15 (initdb, pg_ctl, postgres) is needed: apt-get install postgresql (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="dvsa-ts-", dir="/tmp"))
    os.chmod(root, 0o755)                 # the postgres user (PostgreSQL refuses root) must reach pg/
    srv = TrackingServer(root)
    try:
        yield srv.start()
    finally:
        srv.stop()


_PYFUNC_SCORE = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": [sys.argv[2]], "sentence": [sys.argv[3]]}))
print(json.dumps(out["score"].tolist()))
"""


@pytest.mark.slow
def test_models_through_the_server(server, shards, tmp_path, monkeypatch, capsys):
    """A model logged through the server's artifact proxy (files on the shared artifact root,
    nothing local) and registered: a fresh process loads ``models:/<name>/latest`` over HTTP
    and scores a pair as the in-process model does; ``dvsa evaluate --checkpoint runs:/<id>/model``
    logs into its run in PostgreSQL; an unknown name is one line naming the server."""
    import torch

    from dvsa import tracking
    from dvsa.cli import main
    from dvsa.data.shards import iter_samples, load_vocab
    from dvsa.inference.alignment import embed_images
    from dvsa.inference.mlflow_model import log_model
    from dvsa.ingest.samples import encode_words
    from dvsa.models.build import build_model
    from dvsa.models.checkpoint import save_checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVSA_MODEL_CACHE", str(tmp_path / "cache"))
    kp = shards / "kp"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["task=align", f"out={tmp_path}", f"data.fullframe_shards={kp}"])
    vocab = load_vocab(str(kp))
    torch.manual_seed(0)
    model = build_model(cfg, vocab).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, step=3, epoch=1, vocab=vocab, cfg=cfg)
    run, _ = tracking.start_run(server.uri, "served-models", "hand-made", {"task": "align"})
    logged = log_model(ckpt, server.uri, run.run_id, registered_name="served-align", step=3)
    run.end("FINISHED")
    assert logged.registered == "models:/served-align/1"
    assert [p.parent.parent.parent.name for p in server.artifacts.rglob("state.pt")].count(logged.model_id) == 1

    key, jpg, meta = next(iter_samples(str(kp), "test"))
    image = tmp_path / f"{key}.jpg"
    image.write_bytes(jpg)
    sentence = " ".join(meta["sentences"][0]["tokens"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    done = subprocess.run([sys.executable, "-c", _PYFUNC_SCORE, "models:/served-align/latest", str(image), sentence],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (score,) = json.loads(done.stdout.strip().splitlines()[-1])
    w, h = meta["width"], meta["height"]
    v, v_mask = embed_images(model, [jpg], [[[0, 0, w, h]]], cfg.data.image_size)
    ids, n = encode_words(vocab, sentence.split(), cfg.data.max_len)   # its first data.max_len words, as evaluated
    with torch.no_grad():
        s, s_mask = model.embed_words(torch.from_numpy(ids)[None], torch.tensor([n]))
        assert score == pytest.approx(float(model.scores(v, v_mask, s, s_mask)[0, 0]), rel=1e-5, abs=1e-6)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", logged.uri, "--max-images", "6", f"out={tmp_path}",
                 f"data.fullframe_shards={kp}"]) == 0, capsys.readouterr().err[-3000:]
    c = MlflowClient(server.uri)
    assert c.get_run(run.run_id).data.metrics["retrieval/images"] == 6
    assert not list(tmp_path.rglob("*.db"))
    assert main(["evaluate", "--checkpoint", "models:/nope/latest", f"out={tmp_path}"]) == 1
    assert capsys.readouterr().err == (f"dvsa evaluate: error: --checkpoint models:/nope/latest: no such registered "
                                       f"model 'nope' in {server.uri}\n")
