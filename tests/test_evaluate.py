"""Region evaluation (section 4.4), retrieval on a split, and `dvsa evaluate` into MLflow."""

from __future__ import annotations

import json

import pytest
import torch

from eval_fixtures import chain_captioner, save, tiny_cfg


@pytest.fixture(scope="module")
def scorer():
    """One single-process scorer (one JVM) for the module: the known answers."""
    from dvsa.evaluation.captions import CaptionScorer

    with CaptionScorer() as s:
        yield s


@pytest.fixture(scope="module")
def vocab(shards):
    from dvsa.data.shards import load_vocab

    return load_vocab(str(shards / "vg"))


def _test_groups(shards):
    """Every (query id, box, refs) of the test split, read straight from the shards."""
    from dvsa.data.shards import iter_samples

    out = []
    for _, _, meta in iter_samples(str(shards / "vg"), "test"):
        for i, g in enumerate(meta["groups"]):
            out.append((f"{meta['image_id']}:{i}", g["box"], g["refs"]))
    return out


def test_every_group_is_one_query_and_metrics_equal_the_scorer(shards, vocab, scorer, ray_local, tmp_path):
    from dvsa.data.shards import load_manifest
    from dvsa.evaluation.regions import evaluate_regions

    cfg = tiny_cfg(shards, tmp_path, "caption.cell=rnn", "model.word_dim=64", "model.hidden_dim=64")
    ckpt = save(chain_captioner(cfg, vocab, ["red", "circle"]), vocab, cfg, tmp_path / "ckpt")
    result = evaluate_regions(str(ckpt), str(shards / "vg"), "test", num_meteor_actors=2, batch_size=4)

    groups = _test_groups(shards)
    manifest = load_manifest(str(shards / "vg"))
    assert result.queries == len(groups) == manifest["splits"]["test"]["groups"] == result.expected
    assert [p["qid"] for p in result.predictions] == [q for q, _, _ in groups]     # shard order
    assert [p["box"] for p in result.predictions] == [b for _, b, _ in groups]
    assert [p["refs"] for p in result.predictions] == [r for _, _, r in groups]
    assert {p["caption"] for p in result.predictions} == {"red circle"}
    assert not result.skipped and not result.capped

    refs = {q: r for q, _, r in groups}
    expected = scorer.score(refs, {q: "red circle" for q in refs})
    assert result.metrics["region/queries"] == len(groups)
    for name, value in expected.items():
        assert result.metrics[f"region/{name}"] == pytest.approx(value, abs=1e-12), name
    assert 0.0 < result.metrics["region/METEOR"] < 1.0


def test_each_query_is_captioned_from_its_own_box(shards, vocab, ray_local, tmp_path):
    """A random LSTM captioner: the pipeline's log probabilities equal a per-group decode of
    the group's box done by hand (decode_resize + scale + RoIAlign + beam search)."""
    from dvsa.data.shards import iter_samples
    from dvsa.evaluation.regions import collect_predictions, prediction_dataset
    from dvsa.ingest import decode_resize, normalize_images, scale_boxes
    from dvsa.models.decoding import beam_search
    from dvsa.train.build import build_model

    cfg = tiny_cfg(shards, tmp_path, "caption.cell=lstm")
    torch.manual_seed(3)
    model = build_model(cfg, vocab).eval()
    ckpt = save(model, vocab, cfg, tmp_path / "ckpt")
    ds = prediction_dataset(str(ckpt), str(shards / "vg"), "test", decode="beam", beam_size=2, batch_size=3)
    preds, skipped, capped = collect_predictions(ds, max_queries=5)
    assert capped and len(preds) == 5 and not skipped
    assert [p["qid"] for p in preds] == [q for q, _, _ in _test_groups(shards)[:5]]

    want = {}
    for _, jpg, meta in iter_samples(str(shards / "vg"), "test"):
        img, (w, h) = decode_resize(jpg, cfg.data.image_size)
        x = normalize_images(torch.from_numpy(img)[None])
        for i, g in enumerate(meta["groups"]):
            box = torch.from_numpy(scale_boxes([g["box"]], w, h, cfg.data.image_size))
            with torch.no_grad():
                feats = model.region_features(x, [box])
                toks, lp = beam_search(model.captioner, feats, cfg.data.max_len, beam_size=2)
            want[f"{meta['image_id']}:{i}"] = (" ".join(vocab.decode(toks[0].tolist())), float(lp[0]))
    for p in preds:
        caption, lp = want[p["qid"]]
        assert p["caption"] == caption
        assert p["logprob"] == pytest.approx(lp, abs=1e-4)


def test_retrieval_equals_brute_force_scores(shards, tmp_path):
    from dvsa.data.shards import iter_samples, load_vocab
    from dvsa.evaluation.alignment_eval import evaluate_retrieval
    from dvsa.evaluation.retrieval import fold_metrics, retrieval_metrics
    from dvsa.ingest import decode_resize, normalize_images, scale_boxes
    from dvsa.ingest.samples import encode_words
    from dvsa.train.build import build_model

    kp = shards / "kp"
    vocab = load_vocab(str(kp))
    cfg = tiny_cfg(shards, tmp_path, "task=align")
    torch.manual_seed(1)
    model = build_model(cfg, vocab).eval()
    metrics, emb = evaluate_retrieval(model, vocab, cfg, str(kp), "test", batch_size=3)

    # by hand: image by image, all five sentences, the full score matrix at once
    vs, vms, ss, sms, sent_img = [], [], [], [], []
    n_img = 0
    for _, jpg, meta in iter_samples(str(kp), "test"):
        img, (w, h) = decode_resize(jpg, cfg.data.image_size)
        boxes = [[0, 0, w, h]] + meta["proposals"][: cfg.data.max_regions - 1]
        b = torch.from_numpy(scale_boxes(boxes, w, h, cfg.data.image_size))
        with torch.no_grad():
            v, vm = model.embed_regions(normalize_images(torch.from_numpy(img)[None]), [b])
        pad = cfg.data.max_regions - v.shape[1]
        vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
        vms.append(torch.nn.functional.pad(vm, (0, pad)))
        for s in meta["sentences"][:5]:
            ids, n = encode_words(vocab, s["tokens"], cfg.data.max_len)
            with torch.no_grad():
                e, em = model.embed_words(torch.from_numpy(ids)[None], torch.tensor([n]))
            ss.append(e)
            sms.append(em)
            sent_img.append(n_img)
        n_img += 1
    with torch.no_grad():
        S = model.scores(torch.cat(vs), torch.cat(vms), torch.cat(ss), torch.cat(sms))
    sent_img = torch.tensor(sent_img)
    assert metrics["retrieval/images"] == n_img and metrics["retrieval/sentences"] == len(sent_img)
    assert torch.equal(emb.sent_img, sent_img)
    full = retrieval_metrics(S, sent_img)
    folds = fold_metrics(S, sent_img, fold_size=1000)
    for k, v in full.items():
        assert metrics[f"retrieval/{k}"] == pytest.approx(v), k
        assert metrics[f"retrieval_1k/{k}"] == pytest.approx(folds[k]), k


def test_evaluate_command_logs_into_the_checkpoints_run(shards, vocab, scorer, ray_local, tmp_path, capsys):
    """`dvsa evaluate --checkpoint RUN_ID` on a full-frame captioner fed region boxes (Table 5):
    metrics land in that run, equal to the scorer's on the first N groups, with the pictures."""
    from dvsa import tracking
    from dvsa.cli import main

    cfg = tiny_cfg(shards, tmp_path, "caption.mode=fullframe", "caption.cell=rnn", "model.word_dim=64",
                   "model.hidden_dim=64")
    ckpt = save(chain_captioner(cfg, vocab, ["blue", "square"]), vocab, cfg, tmp_path / "ckpt", step=9)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger, _ = tracking.start_run(uri, "table5", "fullframe-rnn", {"task": "caption", "mode": "fullframe",
                                                                      "cell": "rnn"})
    logger.set_tags({tracking.CHECKPOINT_TAG: str(ckpt)})
    logger.end("FINISHED")
    outcome = tmp_path / "outcome.json"
    rc = main(["evaluate", "--checkpoint", logger.run_id, "--max-groups", "6", "--meteor-actors", "1",
               "--examples", "2", "--outcome-json", str(outcome), f"out={tmp_path}",
               f"mlflow.tracking_uri={uri}", f"data.shards={shards / 'vg'}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "region/METEOR" in printed and logger.run_id in printed

    refs = {q: r for q, _, r in _test_groups(shards)[:6]}
    expected = scorer.score(refs, {q: "blue square" for q in refs})
    run = tracking.find_run(uri, logger.run_id)
    assert run.info.status == "FINISHED"          # the training run, not a new one
    for name, value in expected.items():
        assert run.data.metrics[f"region/{name}"] == pytest.approx(value, abs=1e-12), name
    assert run.data.metrics["region/queries"] == 6
    hist = tracking.client(uri).get_metric_history(logger.run_id, "region/METEOR")
    assert [m.step for m in hist] == [9]
    arts = {a.path for a in tracking.client(uri).list_artifacts(logger.run_id, "eval/test")}
    assert {"eval/test/metrics.json", "eval/test/predictions.jsonl", "eval/test/sample_captions.json",
            "eval/test/pictures"} <= arts
    pics = tracking.client(uri).list_artifacts(logger.run_id, "eval/test/pictures")
    assert len(pics) == 2 and all(p.path.endswith(".png") for p in pics)
    out = json.loads(outcome.read_text())
    assert out["run_id"] == logger.run_id and len(out["pictures"]) == 2


def test_evaluate_refuses_changing_the_model(shards, vocab, tmp_path, capsys):
    from dvsa.cli import main

    cfg = tiny_cfg(shards, tmp_path)
    from dvsa.train.build import build_model

    ckpt = save(build_model(cfg, vocab), vocab, cfg, tmp_path / "ckpt")
    assert main(["evaluate", "--checkpoint", str(ckpt), "model.hidden_dim=8"]) == 2
    assert "model.hidden_dim: cannot be changed at evaluation" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
