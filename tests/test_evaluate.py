"""Region evaluation (section 4.4), retrieval on a split, and `dvsa evaluate` into MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_fixtures import chain_captioner, save, tiny_cfg
from PIL import Image


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


@pytest.mark.slow
@pytest.mark.ray
def test_every_group_is_one_query_and_metrics_equal_the_scorer(shards, vocab, scorer, ray_local, tmp_path):
    from dvsa.data.manifest import Manifest
    from dvsa.evaluation.regions import RegionEvalOptions, evaluate_regions

    cfg = tiny_cfg(shards, tmp_path, "caption.cell=rnn", "model.word_dim=64", "model.hidden_dim=64")
    ckpt = save(chain_captioner(cfg, vocab, ["red", "circle"]), vocab, cfg, tmp_path / "ckpt")
    result = evaluate_regions(str(ckpt), str(shards / "vg"), "test", RegionEvalOptions(batch_size=4))

    groups = _test_groups(shards)
    manifest = Manifest.read(str(shards / "vg"))
    assert result.queries == len(groups) == manifest.split_count("test", "groups") == result.expected
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


@pytest.mark.slow
@pytest.mark.ray
def test_each_query_is_captioned_from_its_own_box(shards, vocab, ray_local, tmp_path):
    """A random LSTM captioner: the pipeline's log probabilities equal a per-group decode of
    the group's box done by hand (decode_resize + scale + RoIAlign + beam search)."""
    from dvsa.data.shards import iter_samples
    from dvsa.evaluation.regions import collect_predictions, prediction_dataset
    from dvsa.ingest import decode_resize, normalize_images, scale_boxes
    from dvsa.models.build import build_model
    from dvsa.models.decoding import beam_search

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
    from dvsa.evaluation.retrieval import retrieval_metrics
    from dvsa.ingest import decode_resize, normalize_images, scale_boxes
    from dvsa.ingest.samples import encode_words
    from dvsa.models.build import build_model

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
    for k, v in full.items():
        assert metrics[f"retrieval/{k}"] == pytest.approx(v), k
    assert not any(k.startswith("retrieval_1k/") for k in metrics)   # fewer than 1,000 test images: no 1K folds


@pytest.mark.slow
@pytest.mark.ray
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
    from dvsa.models.build import build_model

    ckpt = save(build_model(cfg, vocab), vocab, cfg, tmp_path / "ckpt")
    assert main(["evaluate", "--checkpoint", str(ckpt), "model.hidden_dim=8"]) == 2
    assert "model.hidden_dim: cannot be changed at evaluation" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- alignment, by hand
# Six 64 x 64 test images: gray, with a 32 x 32 square of one colour at [16, 16, 48, 48] (also
# its one proposal), one sentence each, and a seventh sample whose JPEG is truncated. The
# colour aligner scores "red" against image k as 2 x the redness of its reddest box (the
# square's own box; the whole image is diluted), "blue" likewise, so (r0 > r2 > 0, b1 > b4 > 0):
#
#   image  content      sentence   S[k, red]  S[k, blue]
#   0      bright red   "red"      2 r0       0
#   1      bright blue  "blue"     0          2 b1
#   2      dark red     "red"      2 r2       0
#   3      gray         "blue"     0          0
#   4      dark blue    "red"      0          2 b4
#   5      gray         "red"      0          0
#
# Ranks count the wrong candidates scoring at least as high as the truth. Image -> sentence:
# 3 1 3 5 5 5 (R@1 0, R@5 50, R@10 100, median rank 4); sentence -> image: 0 0 1 5 5 5
# (R@1 33.3, R@5 50, R@10 100, median 2). Fewer than 1,000 images: no retrieval_1k figures.
HAND_RETRIEVAL = {"i2t_r1": 0.0, "i2t_r5": 50.0, "i2t_r10": 100.0, "i2t_medr": 4.0,
                  "t2i_r1": 100 / 3, "t2i_r5": 50.0, "t2i_r10": 100.0, "t2i_medr": 2.0}
_HAND_IMAGES = [((230, 20, 20), "red"), ((20, 20, 230), "blue"), ((150, 20, 20), "red"),
                ((128, 128, 128), "blue"), ((20, 20, 150), "red"), ((128, 128, 128), "red")]


@pytest.fixture(scope="module")
def colour_world(tmp_path_factory):
    """(Karpathy-style shards of the six images, the colour aligner's checkpoint, its dir)."""
    import io

    from eval_fixtures import colour_aligner
    from PIL import Image

    from dvsa.config import Config
    from dvsa.data.shards import ShardWriter
    from dvsa.text import Vocab

    d = tmp_path_factory.mktemp("colour_world")
    with ShardWriter(str(d / "kp"), "test", 1 << 20) as w:
        for i, (colour, word) in enumerate(_HAND_IMAGES + [((230, 20, 20), "red")]):
            im = Image.new("RGB", (64, 64), (128, 128, 128))
            im.paste(colour, (16, 16, 48, 48))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
            jpg = buf.getvalue() if i < len(_HAND_IMAGES) else buf.getvalue()[:300]   # the 7th: truncated
            w.write(f"{i:04d}", jpg, {"image_id": i, "split": "test", "width": 64, "height": 64,
                                      "proposals": [[16, 16, 48, 48]],
                                      "sentences": [{"raw": word, "tokens": [word]}]})
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", "red", "blue"], [0, 7, 7, 0, 4, 3], 1, 7)
    cfg = Config().replace(**{"task": "align", "model.backbone": "tiny", "model.roi_size": 2,
                              "data.image_size": 32, "data.max_regions": 4, "model.embed_dim": 4,
                              "model.word_dim": 4, "model.hidden_dim": 4, "out": str(d / "train-out"),
                              "mlflow.experiment": "colour"})
    ckpt = save(colour_aligner(cfg, vocab), vocab, cfg, d / "ckpt", step=7)
    return d / "kp", ckpt, d


def test_retrieval_of_the_colour_aligner_equals_the_hand_ranks(colour_world):
    from dvsa.evaluation.alignment_eval import evaluate_retrieval
    from dvsa.inference.checkpoints import load_trained

    kp, ckpt, _ = colour_world
    model, vocab, cfg = load_trained(str(ckpt))
    for batch_size in (1, 4, 16):
        metrics, emb = evaluate_retrieval(model, vocab, cfg, str(kp), "test", batch_size=batch_size)
        assert metrics["retrieval/images"] == 6 and metrics["retrieval/sentences"] == 6
        assert emb.skipped == {"corrupt_image": 1}
        assert emb.sent_img.tolist() == [0, 1, 2, 3, 4, 5]
        for k, v in HAND_RETRIEVAL.items():
            assert metrics[f"retrieval/{k}"] == pytest.approx(v), (batch_size, k)
        assert not any(k.startswith("retrieval_1k/") for k in metrics)
    metrics, _ = evaluate_retrieval(model, vocab, cfg, str(kp), "test", max_images=3)
    # images 0-2 with sentences red, blue, red: i2t 1 0 1 (image 0 ties with sentence 2,
    # image 2 with sentence 0), t2i 0 0 1 (sentence 2 sees image 0 above its own)
    assert metrics["retrieval/images"] == 3
    assert metrics["retrieval/i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["retrieval/t2i_r1"] == pytest.approx(200 / 3)


@pytest.mark.slow
def test_evaluate_command_on_an_alignment_checkpoint_logs_the_hand_ranks(colour_world, tmp_path, capsys):
    """`dvsa evaluate --checkpoint DIR` on an alignment model no MLflow run knows: a new
    evaluation-only run in the configured store holds the retrieval metrics (at the
    checkpoint's step), metrics.json is written, nothing starts Ray."""
    from dvsa import tracking
    from dvsa.cli import main

    kp, ckpt, _ = colour_world
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = tmp_path / "outcome.json"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--outcome-json", str(outcome), f"out={tmp_path}",
               f"mlflow.tracking_uri={uri}", f"data.fullframe_shards={kp}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"note: no MLflow run holds {ckpt}" in printed and "retrieval/i2t_r1" in printed
    # the table says which figures are which: the full split's, and no 1K folds for 6 images
    assert "| full split (6 images) | 0.0 | 50.0 | 100.0 | 4 | 33.3 | 50.0 | 100.0 | 2 |" in printed
    assert "retrieval_1k/*: none: the split has 6 images, fewer than 1,000" in printed
    out = json.loads(outcome.read_text())
    run = tracking.find_run(uri, out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dvsa.evaluation_only"] == "true"
    assert run.data.tags["task"] == "align" and run.info.run_name == "eval-ckpt"
    m = run.data.metrics
    for k, v in HAND_RETRIEVAL.items():
        assert m[f"retrieval/{k}"] == pytest.approx(v) and out["metrics"][f"retrieval/{k}"] == pytest.approx(v)
    assert m["retrieval/images"] == 6 and m["retrieval/skipped_images"] == 1
    assert [h.step for h in tracking.client(uri).get_metric_history(out["run_id"], "retrieval/i2t_r1")] == [7]
    written = json.loads((Path(out["outputs"]) / "metrics.json").read_text())
    assert written == out["metrics"]
    # Fig. 5 of the split's first pair: a picture on disk and in the run
    assert [Path(p).name.startswith("alignment_") for p in out["pictures"]] == [True]
    assert Image.open(out["pictures"][0]).size[0] > 100
    pics = tracking.client(uri).list_artifacts(out["run_id"], "eval/test/pictures")
    assert [Path(f.path).name for f in pics] == [Path(out["pictures"][0]).name]
    assert main(["evaluate", "--checkpoint", str(ckpt), f"out={tmp_path}", f"mlflow.tracking_uri={uri}",
                 f"data.fullframe_shards={tmp_path / 'none'}"]) == 1
    assert "data.fullframe_shards: no such shard directory" in capsys.readouterr().err
