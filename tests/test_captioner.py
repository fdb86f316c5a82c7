"""Captioner: eq. 13-15 (RNN), the LSTM variant, loss, output-bias init, optimiser helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dvsa.config import Config
from dvsa.models.captioner import Captioner, CaptioningModel, caption_loss
from dvsa.models.decoding import greedy
from dvsa.models.encoder import ImageEncoder
from dvsa.models.optim import build_optimizer, clip_gradients

START, END = 1, 2




def _cfg(**kw):
    base = {"model.backbone": "tiny", "model.hidden_dim": 6, "model.word_dim": 5}
    base.update(kw)
    return Config().replace(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("input_relu", [False, True])
def test_rnn_follows_equations_13_to_15(input_relu):
    cfg = _cfg(**{"caption.cell": "rnn", "caption.rnn_input_relu": input_relu})
    cap = Captioner(cfg.model, cfg.caption, vocab_size=9, feat_dim=4)
    feats = torch.randn(2, 4)
    inputs = torch.tensor([[START, 4, 5, 6], [START, 7, 0, 0]])
    with torch.no_grad():
        logits = cap(feats, inputs)
        for n in range(2):
            b_v = cap.W_hi.weight @ feats[n]                                           # eq. 13
            h = torch.zeros(6)
            for t in range(4):
                wx = cap.W_hx.weight @ cap.W_w.weight[inputs[n, t]]
                wx = torch.relu(wx) if input_relu else wx
                h = torch.relu(wx + cap.W_hh.weight @ h + cap.W_hh.bias + (b_v if t == 0 else 0))  # eq. 14
                y = cap.W_oh.weight @ h + cap.W_oh.bias                                # eq. 15
                torch.testing.assert_close(logits[n, t], y)


def test_lstm_reads_the_image_first_then_start():
    cfg = _cfg(**{"caption.cell": "lstm"})
    cap = Captioner(cfg.model, cfg.caption, vocab_size=9, feat_dim=4)
    feats = torch.randn(1, 4)
    inputs = torch.tensor([[START, 4, 5]])
    cell = torch.nn.LSTMCell(5, 6)
    with torch.no_grad():
        cell.weight_ih.copy_(cap.lstm.weight_ih_l0)
        cell.weight_hh.copy_(cap.lstm.weight_hh_l0)
        cell.bias_ih.copy_(cap.lstm.bias_ih_l0)
        cell.bias_hh.copy_(cap.lstm.bias_hh_l0)
        h, c = cell(cap.W_hi(feats))                          # x_0 = image projection
        expected = []
        for t in range(3):
            h, c = cell(cap.W_w.weight[inputs[:, t]], (h, c))
            expected.append(cap.W_oh(h))
        torch.testing.assert_close(cap(feats, inputs)[0], torch.cat(expected))


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_step_api_matches_forward(cell):
    cfg = _cfg(**{"caption.cell": cell})
    cap = Captioner(cfg.model, cfg.caption, vocab_size=9, feat_dim=4).eval()
    feats = torch.randn(3, 4)
    inputs = torch.randint(3, 9, (3, 5))
    inputs[:, 0] = START
    with torch.no_grad():
        expected = F.log_softmax(cap(feats, inputs), dim=-1)
        state = cap.init_state(feats)
        for t in range(5):
            logp, state = cap.step(inputs[:, t], state)
            torch.testing.assert_close(logp, expected[:, t])


def test_output_bias_starts_at_log_frequencies():
    cfg = _cfg()
    lf = [math.log(p) for p in (1e-9, 1e-9, 0.3, 0.1, 0.4, 0.2)]
    lf[1] = float("-inf")
    cap = Captioner(cfg.model, cfg.caption, vocab_size=6, feat_dim=4, word_log_freq=lf)
    assert cap.W_oh.bias[2:].tolist() == pytest.approx(lf[2:])
    assert cap.W_oh.bias[1].item() == -30.0
    with pytest.raises(ValueError, match="3 entries for a vocabulary of 6"):
        Captioner(cfg.model, cfg.caption, vocab_size=6, feat_dim=4, word_log_freq=[0.0] * 3)


def test_caption_loss_averages_occupied_positions_only():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[4, 2, 0], [3, 0, 0]])
    lp = F.log_softmax(logits, dim=-1)
    expected = -(lp[0, 0, 4] + lp[0, 1, 2] + lp[1, 0, 3]) / 3
    torch.testing.assert_close(caption_loss(logits, targets), expected)
    zero = caption_loss(logits.requires_grad_(), torch.zeros(2, 3, dtype=torch.long))
    assert zero.item() == 0.0
    zero.backward()


class _Halve(torch.nn.Module):
    """Stands in for dropout with a known, deterministic effect: every value it sees halves."""

    def forward(self, x):
        return 0.5 * x


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_dropout_is_on_inputs_and_outputs_never_on_the_recurrence(cell):
    """Section 4: dropout in all layers except the recurrent ones. With dropout replaced by a
    halving, the model must equal eq. 13-15 (or the LSTM) with halved word/image inputs and a
    halved h before W_oh, and an untouched h_{t-1} in the recurrence; forward and the step API
    (decoding) alike."""
    cfg = _cfg(**{"caption.cell": cell, "model.dropout": 0.5})
    cap = Captioner(cfg.model, cfg.caption, vocab_size=9, feat_dim=4)
    cap.drop = _Halve()
    feats = torch.randn(2, 4)
    inputs = torch.tensor([[START, 4, 5, 6], [START, 7, 8, 3]])
    with torch.no_grad():
        expected = torch.zeros(2, 4, 9)
        for n in range(2):
            words = [0.5 * cap.W_w.weight[w] for w in inputs[n]]
            if cell == "rnn":
                b_v = cap.W_hi.weight @ (0.5 * feats[n])                                  # eq. 13
                h = torch.zeros(6)
                for t in range(4):
                    h = torch.relu(cap.W_hx.weight @ words[t] + cap.W_hh.weight @ h + cap.W_hh.bias
                                   + (b_v if t == 0 else 0))                               # eq. 14
                    expected[n, t] = cap.W_oh(0.5 * h)                                     # eq. 15
            else:
                lstm = torch.nn.LSTMCell(5, 6)
                for a, b in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"),
                             ("bias_ih", "bias_ih_l0"), ("bias_hh", "bias_hh_l0")):
                    getattr(lstm, a).copy_(getattr(cap.lstm, b))
                hc = lstm(cap.W_hi(0.5 * feats[n])[None])
                for t in range(4):
                    hc = lstm(words[t][None], hc)
                    expected[n, t] = cap.W_oh(0.5 * hc[0][0])
        torch.testing.assert_close(cap(feats, inputs), expected)
        state = cap.init_state(feats)
        for t in range(4):
            logp, state = cap.step(inputs[:, t], state)
            torch.testing.assert_close(logp, F.log_softmax(expected[:, t], dim=-1))


def test_dropout_is_off_in_eval():
    cfg = _cfg(**{"caption.cell": "lstm", "model.dropout": 0.5})
    cap = Captioner(cfg.model, cfg.caption, vocab_size=9, feat_dim=4)
    feats, inputs = torch.randn(2, 4), torch.tensor([[START, 4, 5], [START, 6, 7]])
    with torch.no_grad():
        train_outs = [cap.train()(feats, inputs) for _ in range(2)]
        assert not torch.equal(*train_outs)               # dropout is live in training
        assert torch.equal(cap.eval()(feats, inputs), cap(feats, inputs))


def test_captioning_model_on_an_ingest_batch():
    cfg = _cfg()
    enc = ImageEncoder("tiny", roi_size=2)
    cap = Captioner(cfg.model, cfg.caption, vocab_size=9, feat_dim=enc.feat_dim)
    model = CaptioningModel(enc, cap)
    images = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[[0.0, 0, 32, 32], [0, 0, 10, 10]], [[4.0, 4, 20, 20], [0, 0, 0, 0]]])
    box_mask = torch.tensor([[True, True], [True, False]])
    inputs = torch.randint(3, 9, (2, 2, 4))
    targets = torch.randint(2, 9, (2, 2, 4))
    logits = model(images, boxes, inputs, box_mask)
    assert logits.shape == (3, 4, 9)
    caption_loss(logits, targets[box_mask]).backward()
    assert enc.trunk.features[0].weight.grad is not None


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_tiny_captioner_overfits_a_handful_of_captions(cell):
    torch.manual_seed(0)
    captions = [[4, 5, 6], [7, 8], [9, 4, 10, 11], [12, 6, 5], [8, 13, 4, 7]]
    V, T, N = 14, 6, len(captions)
    feats = torch.randn(N, 8)
    inputs = torch.zeros(N, T, dtype=torch.long)
    targets = torch.zeros(N, T, dtype=torch.long)
    for i, c in enumerate(captions):
        seq = [START] + c + [END]
        inputs[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        targets[i, :len(seq) - 1] = torch.tensor(seq[1:])
    cfg = _cfg(**{"caption.cell": cell, "model.hidden_dim": 32, "model.word_dim": 16,
                  "train.optimizer": "adam", "train.lr": 0.01, "train.grad_clip": 5.0})
    cap = Captioner(cfg.model, cfg.caption, vocab_size=V, feat_dim=8)
    opt = build_optimizer(cap.parameters(), cfg.train)
    for _ in range(200):
        loss = caption_loss(cap(feats, inputs), targets)
        opt.zero_grad()
        loss.backward()
        clip_gradients(cap, cfg.train.grad_clip)
        opt.step()
    cap.eval()
    tokens, _ = greedy(cap, feats, max_len=T + 1)
    decoded = [row[:row.index(END)] if END in row else row for row in tokens.tolist()]
    assert decoded == captions


def test_build_optimizer_and_elementwise_clipping():
    cfg = _cfg(**{"train.weight_decay": 1e-4, "train.momentum": 0.8})
    lin = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    for name, cls in (("adam", torch.optim.Adam), ("rmsprop", torch.optim.RMSprop), ("sgd", torch.optim.SGD)):
        opt = build_optimizer(list(lin.parameters()) + [frozen], cfg.replace(**{"train.optimizer": name}).train)
        assert isinstance(opt, cls) and len(opt.param_groups[0]["params"]) == 2
        assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["momentum"] == 0.8
    lin.weight.grad = torch.tensor([[10.0, -0.5, 3.0], [-7.0, 0.1, 0.0]])
    lin.bias.grad = torch.tensor([-2.0, 2.0])
    clip_gradients(lin, 1.0)
    assert lin.weight.grad.tolist() == [[1.0, -0.5, 1.0], [-1.0, pytest.approx(0.1), 0.0]]
    assert lin.bias.grad.tolist() == [-1.0, 1.0]
    clip_gradients(lin, 0.0)  # disabled: unchanged
    assert lin.bias.grad.tolist() == [-1.0, 1.0]


def test_norm_clipping_keeps_the_direction():
    """train.grad_clip_mode=norm: grads (3, 4) and (0, 12) have global norm 13; clipped at 6.5
    each element is halved (value clipping would cut 12 to 6.5 and leave 3 and 4)."""
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    clip_gradients([a, b], 6.5, "norm")
    assert a.grad.tolist() == pytest.approx([1.5, 2.0]) and b.grad.tolist() == pytest.approx([0.0, 6.0])
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    clip_gradients([a, b], 6.5, "value")
    assert a.grad.tolist() == [3.0, 4.0] and b.grad.tolist() == [0.0, 6.5]
    with pytest.raises(ValueError, match="grad_clip_mode"):
        clip_gradients([a, b], 1.0, "elementwise")


@pytest.mark.parametrize("features", [False, True])
def test_training_model_starts_at_the_vocabularys_word_frequencies_and_vectors(features, tmp_path):
    """What training builds (dvsa.models.build.build_model), on the image path and the
    precomputed-feature path: b_o = log word frequency of the train split (section 3.3), and
    word vectors from a file where the config names one."""
    from dvsa.models.build import build_model
    from dvsa.text import Vocab

    vocab = Vocab.build({"red": 30, "ball": 10, "box": 5, "rare": 1}, min_count=2, num_captions=10)
    vectors = tmp_path / "vec.txt"
    vectors.write_text("red 1 2 3 4 5\nzebra 9 9 9 9 9\n")
    cfg = _cfg(**{"model.word_vectors": str(vectors), "data.features": "feats/" if features else None})
    model = build_model(cfg, vocab)
    cap = model.captioner
    assert cap.W_oh.bias.tolist() == pytest.approx([max(v, -30.0) for v in vocab.log_frequencies()])
    assert cap.W_w.weight[vocab.stoi["red"]].tolist() == [1, 2, 3, 4, 5]
    probs = torch.softmax(cap.W_oh.bias, 0)
    assert probs[vocab.stoi["red"]] > probs[vocab.stoi["ball"]] > probs[vocab.stoi["box"]]
