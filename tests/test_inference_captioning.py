"""dvsa.inference.captioning.BoxCaptioner on a captioner whose decode is set by hand: every box
is "red circle", with a log probability derived from the weights."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from eval_fixtures import ROOT, chain_captioner, save
from PIL import Image

from dvsa.config import load_config
from dvsa.errors import DvsaError
from dvsa.inference.captioning import BoxCaptioner
from dvsa.ingest.decode import CorruptImage
from dvsa.text import Vocab

WORDS = ["a", "red", "circle", "blue", "square"]


@pytest.fixture(scope="module")
def model_vocab_cfg(tmp_path_factory):
    vocab = Vocab.build({w: 10 - i for i, w in enumerate(WORDS)}, 1, 20)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["task=caption", "caption.cell=rnn", "model.word_dim=16",
                                                       "model.hidden_dim=16", "data.image_size=32",
                                                       f"out={tmp_path_factory.mktemp('bc')}"])
    return chain_captioner(cfg, vocab, ["red", "circle"]), vocab, cfg


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 90, 90)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("decode", ["beam", "greedy"])
def test_describe_every_box_of_every_image(model_vocab_cfg, decode):
    model, vocab, cfg = model_vocab_cfg
    bc = BoxCaptioner(model, vocab, cfg, device="cpu", decode=decode, beam_size=2)
    img, (w, h) = bc.prepare_image(_jpeg(64, 48))
    assert img.shape == (3, 32, 32) and img.dtype == np.uint8 and (w, h) == (64, 48)
    frame = bc.to_frame([[0, 0, 64, 48], [32, 24, 64, 48]], w, h)
    np.testing.assert_allclose(frame, [[0, 0, 32, 32], [16, 16, 32, 32]])
    out = bc.describe([img, img], [frame, frame[:1]])
    # each step's log-softmax: logit 10 for the chain's next word, 0 for the other V - 1 words;
    # three steps ("red", "circle", END)
    step = 10.0 - math.log(math.exp(10.0) + len(vocab) - 1)
    assert [[c for c, _ in per_image] for per_image in out] == [["red circle", "red circle"], ["red circle"]]
    for per_image in out:
        for _, lp in per_image:
            assert lp == pytest.approx(3 * step, abs=1e-6)   # float32 log-softmax
    assert bc.describe([img], [bc.to_frame([], w, h)]) == [[]]


def test_from_checkpoint_and_refusals(model_vocab_cfg, tmp_path):
    model, vocab, cfg = model_vocab_cfg
    ckpt = save(model, vocab, cfg, tmp_path / "ckpt")
    bc = BoxCaptioner.from_checkpoint(str(ckpt), device="cpu", decode="greedy")
    img, (w, h) = bc.prepare_image(_jpeg(40, 40))
    assert bc.describe([img], [bc.to_frame([[0, 0, 40, 40]], w, h)])[0][0][0] == "red circle"
    with pytest.raises(CorruptImage):
        bc.prepare_image(b"\xff\xd8 not a jpeg")
    with pytest.raises(DvsaError, match="decode must be one of"):
        BoxCaptioner(model, vocab, cfg, decode="nucleus")
    with pytest.raises(DvsaError, match="not a captioner"):
        BoxCaptioner(model, vocab, cfg.replace(task="align"))
