"""The validation passes of the train loops on hand-set models, against answers derived by hand:
``dvsa.train.align.validate_alignment`` (retrieval R@K / median rank and the eq. 9 loss) with
the colour aligner, and ``dvsa.train.caption.validate_captions`` (token-weighted loss, the
captions it generates, the references it scores them against, coco-caption metrics) with the
chain captioner; plus the batch losses of both tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eval_fixtures import chain_captioner, colour_aligner

from dvsa.config import Config
from dvsa.text import Vocab
from dvsa.train.loop import ValidationContext

SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]
PAD, START, END = 0, 1, 2


def _ctx(model, batches, cfg, vocab, state=None) -> ValidationContext:
    return ValidationContext(model=model, batches=iter(batches), cfg=cfg, vocab=vocab,
                             device=torch.device("cpu"), state={} if state is None else state)


@pytest.fixture(autouse=True)
def _no_grad():
    """The train loop validates under torch.no_grad(); so do these tests."""
    with torch.no_grad():
        yield


# =========================================================================== alignment
# Six validation images, one sentence each. The colour aligner scores the sentence "red"
# against image k as 2 x (the largest mean redness of k's boxes), "blue" likewise:
#
#   image  content      sentence   S[k, red]  S[k, blue]
#   0      bright red   "red"      2 r0       0
#   1      bright blue  "blue"     0          2 b1
#   2      dark red     "red"      2 r2       0
#   3      gray         "blue"     0          0
#   4      dark blue    "red"      0          2 b4        (a sentence of the wrong colour)
#   5      gray         "red"      0          0
#
# with r0 > r2 > 0 and b1 > b4 > 0. A rank counts the wrong candidates scoring at least as
# high as the truth (ties count against), so:
#   image -> sentence: image 0 ties with the red sentences 2, 4, 5 (rank 3), image 1 with
#     sentence 3 (1), image 2 with 0, 4, 5 (3), images 3, 4, 5 score 0 everywhere (5):
#     ranks 3 1 3 5 5 5 -> R@1 0, R@5 50, R@10 100, median 1-based rank (lower middle) 4;
#   sentence -> image: sentences 0 and 1 find their image first (0), sentence 2 sees image
#     0 above its own (1), sentences 3, 4, 5 score 0 on every image (5): R@1 33.3, R@5 50,
#     R@10 100, median 2.
EXPECTED_RETRIEVAL = {"i2t_r1": 0.0, "i2t_r5": 50.0, "i2t_r10": 100.0, "i2t_medr": 4.0,
                      "t2i_r1": 100 / 3, "t2i_r5": 50.0, "t2i_r10": 100.0, "t2i_medr": 2.0}
SENTENCES = ["red", "blue", "red", "blue", "red", "red"]
# redness / blueness of each image's best box, fed as CNN features in the features-path test
REDNESS = [0.8, 0.0, 0.3, 0.0, 0.0, 0.0]
BLUENESS = [0.0, 0.7, 0.0, 0.0, 0.2, 0.0]
COLOURS = {"bright red": (230, 20, 20), "bright blue": (20, 20, 230), "dark red": (150, 20, 20),
           "gray": (128, 128, 128), "dark blue": (20, 20, 150)}
CONTENT = ["bright red", "bright blue", "dark red", "gray", "dark blue", "gray"]


def _align_setup(**overrides):
    vocab = Vocab(SPECIALS + ["red", "blue"], [0, 6, 6, 0, 4, 2], 1, 6)
    cfg = Config().replace(**{"task": "align", "model.backbone": "tiny", "model.roi_size": 2,
                              "data.image_size": 32, "model.embed_dim": 4, "model.word_dim": 4,
                              "model.hidden_dim": 4, **overrides})
    return colour_aligner(cfg, vocab), vocab, cfg


def _hand_scores(red, blue) -> list[list[float]]:
    """S[k][l] as in the table above, from the best boxes' redness and blueness."""
    return [[2 * (red[k] if SENTENCES[l] == "red" else blue[k]) for l in range(6)] for k in range(6)]


def _hand_loss(S, rows, margin: float, hardest: bool) -> float:
    """Eq. 9 (sum or hardest negative) over the batch ``rows``, divided by the batch size."""
    total = 0.0
    for k in rows:
        sent = [max(0.0, S[k][l] - S[k][k] + margin) for l in rows if l != k]
        img = [max(0.0, S[l][k] - S[k][k] + margin) for l in rows if l != k]
        total += (max(sent) + max(img)) if hardest else (sum(sent) + sum(img))
    return total / len(rows)


def _token_batch(vocab, rows):
    words = [vocab.stoi[SENTENCES[k]] for k in rows]
    return {"tokens": torch.tensor(words)[:, None], "lengths": torch.ones(len(rows), dtype=torch.long)}


BATCHES = ([0, 1, 2], [3, 4], [5])   # the last batch has no negative: left out of the loss


@pytest.mark.parametrize("loss", ["sum", "hardest"])
def test_validate_alignment_on_features_equals_hand_derived_metrics(loss):
    from dvsa.train.align import validate_alignment

    model, vocab, cfg = _align_setup(**{"align.loss": loss, "align.margin": 0.5})
    batches = []
    for rows in BATCHES:
        feats = torch.zeros(len(rows), 3, 128)               # whole image, the object, padding
        feats[:, 0, 0] = torch.tensor([REDNESS[k] / 2 for k in rows])    # the whole image: diluted
        feats[:, 0, 1] = torch.tensor([BLUENESS[k] / 2 for k in rows])
        feats[:, 1, 0] = torch.tensor([REDNESS[k] for k in rows])
        feats[:, 1, 1] = torch.tensor([BLUENESS[k] for k in rows])
        feats[:, 2, :2] = 5.0                                # a padded box must not count
        mask = torch.tensor([[True, True, False]] * len(rows))
        batches.append({"feats": feats, "box_mask": mask, **_token_batch(vocab, rows)})
    metrics, samples = validate_alignment(_ctx(model, batches, cfg, vocab))
    assert samples == []
    S = _hand_scores(REDNESS, BLUENESS)
    want_loss = (_hand_loss(S, BATCHES[0], 0.5, loss == "hardest")
                 + _hand_loss(S, BATCHES[1], 0.5, loss == "hardest")) / 2
    assert metrics["val/loss"] == pytest.approx(want_loss, rel=1e-6)
    assert metrics["val/images"] == 6.0
    for k, v in EXPECTED_RETRIEVAL.items():
        assert metrics[f"val/{k}"] == pytest.approx(v), k
    assert metrics["val/rsum"] == pytest.approx(0 + 50 + 100 + 100 / 3 + 50 + 100)
    assert set(metrics) == {"val/loss", "val/images", "val/rsum"} | {f"val/{k}" for k in EXPECTED_RETRIEVAL}


def _solid_images(rows, size=32) -> torch.Tensor:
    """uint8 [B, 3, S, S]: a gray image with a 16 x 16 square of the row's colour at (8, 8)."""
    out = np.full((len(rows), size, size, 3), 128, dtype=np.uint8)
    for i, k in enumerate(rows):
        out[i, 8:24, 8:24] = COLOURS[CONTENT[k]]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def test_validate_alignment_on_images_ranks_as_derived_by_hand():
    """The image path (uint8 images + boxes, as ingest delivers them): the CNN measures the
    redness; the ranks follow the table whatever its exact values, and the loss is eq. 9 on the
    scores of the same boxes embedded image by image."""
    from dvsa.ingest import normalize_images
    from dvsa.train.align import validate_alignment

    model, vocab, cfg = _align_setup()
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0]])
    batches = [{"images": _solid_images(rows), "boxes": boxes.expand(len(rows), 2, 4).clone(),
                "box_mask": torch.ones(len(rows), 2, dtype=torch.bool), **_token_batch(vocab, rows)}
               for rows in BATCHES]
    metrics, _ = validate_alignment(_ctx(model, batches, cfg, vocab))
    # each image alone: the best box's redness and blueness (v = W_m CNN = the two colour features)
    red, blue = [], []
    for k in range(6):
        with torch.no_grad():
            v, _ = model.embed_regions(normalize_images(_solid_images([k])), [boxes])
        red.append(float(v[0, :, 0].max()))
        blue.append(float(v[0, :, 1].max()))
    assert red[0] > red[2] > 0.05 and blue[1] > blue[4] > 0.05            # the table's premise
    assert red[1] == red[3] == red[4] == red[5] == 0.0 and blue[0] == blue[2] == blue[3] == blue[5] == 0.0
    for k, v in EXPECTED_RETRIEVAL.items():
        assert metrics[f"val/{k}"] == pytest.approx(v), k
    S = _hand_scores(red, blue)
    want = (_hand_loss(S, BATCHES[0], 1.0, False) + _hand_loss(S, BATCHES[1], 1.0, False)) / 2
    assert metrics["val/loss"] == pytest.approx(want, rel=1e-5)


def test_validate_alignment_without_batches():
    from dvsa.train.align import validate_alignment

    model, vocab, cfg = _align_setup()
    assert validate_alignment(_ctx(model, [], cfg, vocab)) == ({"val/loss": 0.0, "val/rsum": 0.0}, [])


def test_align_batch_loss_is_eq9_on_the_batch_scores():
    from dvsa.train.align import align_batch_loss

    model, vocab, cfg = _align_setup(**{"align.margin": 0.5})
    rows = [0, 1, 2]
    feats = torch.zeros(3, 1, 128)
    feats[:, 0, 0] = torch.tensor([REDNESS[k] for k in rows])
    feats[:, 0, 1] = torch.tensor([BLUENESS[k] for k in rows])
    batch = {"feats": feats, "box_mask": torch.ones(3, 1, dtype=torch.bool), **_token_batch(vocab, rows)}
    S = _hand_scores(REDNESS, BLUENESS)
    assert float(align_batch_loss(model, batch, cfg)) == pytest.approx(_hand_loss(S, rows, 0.5, False))
    cfg_h = cfg.replace(**{"align.loss": "hardest"})
    assert float(align_batch_loss(model, batch, cfg_h)) == pytest.approx(_hand_loss(S, rows, 0.5, True))


# =========================================================================== captions
# The chain captioner always says "red circle" (START -> red -> circle -> END, logit 10 for the
# next word of the chain, 0 for the rest; a word outside the chain leads to h = 0, all logits 0).
# Per target token, under teacher forcing (V words):
#   A = log(e^10 + V - 1) - 10   the input's chain successor is the target
#   B = log(e^10 + V - 1)        the input is START or a chain word, the target another word
#   C = log(V)                   the input is outside the chain
# "red circle": 3A; "blue square": B + 2C; "a red circle": B + C + 2A; "red square": A + B + C;
# 13 target tokens in all (an empty reference row has none).
CAP_WORDS = ["red", "circle", "blue", "square", "a"]
ROWS = [  # (batch, image row, box row, image id, reference)
    (0, 0, 0, 10, "red circle"), (0, 0, 1, 10, "blue square"), (0, 1, 0, 11, "a red circle"),
    (1, 0, 0, 12, "red square"), (1, 0, 1, 12, ""),
]


def _cap_setup(**overrides):
    vocab = Vocab(SPECIALS + CAP_WORDS, [0, 4, 4, 0, 3, 2, 1, 1, 1], 1, 4)
    cfg = Config().replace(**{"task": "caption", "caption.cell": "rnn", "caption.decode": "greedy",
                              "model.backbone": "tiny", "model.roi_size": 2, "data.image_size": 32,
                              "data.max_len": 6, "model.word_dim": 16, "model.hidden_dim": 16, **overrides})
    return chain_captioner(cfg, vocab, ["red", "circle"]), vocab, cfg


def _cap_batches(vocab, T: int = 5):
    """Two region-mode batches as ingest builds them (box_mask selects the caption rows)."""
    out = []
    for b, n_img in ((0, 2), (1, 1)):
        rows = [r for r in ROWS if r[0] == b]
        images = torch.from_numpy(np.random.default_rng(b).integers(0, 256, (n_img, 3, 32, 32), dtype=np.uint8))
        boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0], [10.0, 8.0, 30.0, 31.0]]).expand(n_img, 2, 4).clone()
        mask = torch.zeros(n_img, 2, dtype=torch.bool)
        inputs = torch.zeros(n_img, 2, T, dtype=torch.long)
        targets = torch.zeros(n_img, 2, T, dtype=torch.long)
        image_id = torch.zeros(n_img, dtype=torch.long)
        for _, i, r, img, text in rows:
            mask[i, r] = True
            image_id[i] = img
            ids = [vocab.stoi[w] for w in text.split()]
            if ids:
                inputs[i, r, :len(ids) + 1] = torch.tensor([START] + ids)
                targets[i, r, :len(ids) + 1] = torch.tensor(ids + [END])
        out.append({"images": images, "boxes": boxes, "box_mask": mask, "inputs": inputs, "targets": targets,
                    "image_id": image_id})
    return out


class _RecordingScorer:
    """Stands in for CaptionScorer (no JVM): keeps what it was asked to score."""

    def __init__(self):
        self.calls = []

    def score(self, refs, hyps):
        self.calls.append((dict(refs), dict(hyps)))
        return {"METEOR": 0.25, "CIDEr": 1.5}


def _hand_caption_loss(V: int) -> float:
    A = math.log(math.exp(10) + V - 1) - 10
    B = math.log(math.exp(10) + V - 1)
    C = math.log(V)
    return (3 * A + (B + 2 * C) + (B + C + 2 * A) + (A + B + C)) / 13


def test_validate_captions_loss_captions_and_references_by_hand():
    from dvsa.train.caption import validate_captions

    model, vocab, cfg = _cap_setup()
    batches = _cap_batches(vocab)
    scorer = _RecordingScorer()
    state = {"scorer": scorer}
    metrics, samples = validate_captions(_ctx(model, batches, cfg, vocab, state))
    assert metrics == {"val/loss": pytest.approx(_hand_caption_loss(len(vocab)), rel=1e-5),
                       "val/captions": 4.0, "val/METEOR": 0.25, "val/CIDEr": 1.5}
    # one scorer call for the whole set: each non-empty reference row against "red circle"
    (refs, hyps), = scorer.calls
    assert sorted(refs.values()) == sorted([[text] for *_, text in ROWS if text])
    assert set(hyps) == set(refs) and set(hyps.values()) == {"red circle"}
    assert samples == [{"image_id": img, "generated": "red circle", "reference": text}
                       for _, _, _, img, text in ROWS if text]
    # the picture of the first image: its two boxes, both captioned, with the caption's log prob
    pic = state["picture"]
    V = len(vocab)
    assert pic["image_id"] == 10 and pic["captions"] == ["red circle", "red circle"]
    assert pic["boxes"] == [[2.0, 2.0, 20.0, 20.0], [10.0, 8.0, 30.0, 31.0]]
    assert pic["scores"] == pytest.approx([-3 * (math.log(math.exp(10) + V - 1) - 10)] * 2, abs=2e-6)
    assert np.asarray(pic["image"], dtype=np.uint8).shape == (32, 32, 3)
    assert np.array_equal(np.asarray(pic["image"], dtype=np.uint8), batches[0]["images"][0].permute(1, 2, 0).numpy())
    # the scorer is kept in the worker's state across epochs
    assert state["scorer"] is scorer


def test_validate_captions_with_nothing_to_score():
    from dvsa.train.caption import validate_captions

    model, vocab, cfg = _cap_setup()
    empty = _cap_batches(vocab)[1]
    empty["targets"][:] = PAD
    empty["inputs"][:] = PAD
    metrics, samples = validate_captions(_ctx(model, [empty], cfg, vocab, {"scorer": _RecordingScorer()}))
    assert metrics == {"val/loss": 0.0, "val/captions": 0.0, "val/METEOR": 0.0} and samples == []


def test_caption_batch_loss_is_the_hand_derived_cross_entropy():
    from dvsa.train.caption import caption_batch_loss

    model, vocab, cfg = _cap_setup()
    b0, b1 = _cap_batches(vocab)
    V = len(vocab)
    A = math.log(math.exp(10) + V - 1) - 10
    B = math.log(math.exp(10) + V - 1)
    C = math.log(V)
    # batch 0: "red circle", "blue square", "a red circle": 3A + (B + 2C) + (B + C + 2A) over 10 tokens
    assert float(caption_batch_loss(model, b0, cfg)) == pytest.approx((5 * A + 2 * B + 3 * C) / 10, rel=1e-5)
    assert float(caption_batch_loss(model, b1, cfg)) == pytest.approx((A + B + C) / 3, rel=1e-5)


@pytest.fixture(scope="module")
def scorer():
    from dvsa.evaluation.captions import CaptionScorer

    with CaptionScorer() as s:
        yield s


@pytest.mark.slow
def test_validate_captions_metrics_equal_the_scorer(scorer):
    """With the real coco-caption scorer (one JVM): the metrics are the scorer's on the hand
    references against "red circle", and the worker's scorer is created once and kept."""
    from dvsa.evaluation.captions import CaptionScorer
    from dvsa.train.caption import validate_captions

    model, vocab, cfg = _cap_setup()
    state: dict = {}
    metrics, _ = validate_captions(_ctx(model, _cap_batches(vocab), cfg, vocab, state))
    try:
        assert isinstance(state["scorer"], CaptionScorer)
        refs = {i: [text] for i, (*_, text) in enumerate(ROWS) if text}
        expected = scorer.score(refs, {i: "red circle" for i in refs})
        assert set(expected) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
        for name, value in expected.items():
            assert metrics[f"val/{name}"] == pytest.approx(value, abs=1e-12), name
        # "red circle" against its own reference and three others: BLEU-1 is the clipped
        # unigram precision over the corpus: red 4 of 4 hyps' "red" match? per hypothesis: 2 words,
        # matched: "red circle" 2, "blue square" 0, "a red circle" 2, "red square" 1 -> 5 / 8;
        # brevity penalty exp(1 - 9/8) (references 9 words in all, hypotheses 8)
        assert metrics["val/Bleu_1"] == pytest.approx(5 / 8 * math.exp(1 - 9 / 8), rel=1e-6)
        again, _ = validate_captions(_ctx(model, _cap_batches(vocab), cfg, vocab, state))
        assert again == metrics
    finally:
        state["scorer"].close()
