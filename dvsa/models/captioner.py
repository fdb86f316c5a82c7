"""The multimodal RNN of section 3.2 (eq. 13-15) and the LSTM variant of section 4.4.

``caption.cell=rnn``::
    b_v = W_hi CNN(I)                                                    (13)
    h_t = f(W_hx x_t + W_hh h_{t-1} + b_h + 1(t=1) b_v),  h_0 = 0,  f = ReLU   (14)
    y_t = W_oh h_t + b_o                                                 (15)
  (``caption.rnn_input_relu``: W_hx x_t passes through f first, as the paper suggests.)

``caption.cell=lstm``: the image projection W_hi CNN(I) is the LSTM's first input (its output
is not scored), then x_1 = START, x_2 = w_1, ...; y_t = W_oh h_t + b_o.

x_1 is START, the target of y_t is word t (END last); b_o starts at the log frequency of each
word. Dropout acts on the inputs and on h_t before W_oh, never on the recurrent connection.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvsa.config import CaptionConfig, ModelConfig
from dvsa.models.encoder import ImageEncoder, boxes_from_padded, slot_mask
from dvsa.models.word_vectors import init_embedding

PAD, START, END = 0, 1, 2

State = tuple[Tensor, ...]  # batch-first tensors: decoding reorders them with index_select


def caption_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy averaged over occupied (non-pad) target positions; 0 if there are none."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    # summed over occupied positions and divided by their count (1 when there are none): the
    # mean without a host read of how many there are (no sync on the GPU)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum")
    return total / (targets != PAD).sum().clamp(min=1)


class Captioner(nn.Module):
    """``forward(feats float[N,feat_dim], inputs long[N,T]) -> logits float[N,T,V]``,
    ``inputs = [START, w_1, ...]``; step API ``init_state(feats)``, ``step(tokens, state)``."""

    def __init__(self, model_cfg: ModelConfig, caption_cfg: CaptionConfig, vocab_size: int, feat_dim: int,
                 word_log_freq: Optional[Sequence[float]] = None, words: Optional[Sequence[str]] = None):
        super().__init__()
        if caption_cfg.cell not in ("rnn", "lstm"):
            raise ValueError(f"caption.cell: {caption_cfg.cell!r} is not one of 'rnn', 'lstm'")
        self.cell = caption_cfg.cell
        self.input_relu = bool(getattr(caption_cfg, "rnn_input_relu", False))
        self.vocab_size = int(vocab_size)
        H, D = model_cfg.hidden_dim, model_cfg.word_dim
        self.hidden_dim = H
        self.W_w = nn.Embedding(vocab_size, D, padding_idx=PAD)       # x_t
        if self.cell == "rnn":
            self.W_hi = nn.Linear(feat_dim, H, bias=False)            # eq. 13
            self.W_hx = nn.Linear(D, H, bias=False)
            self.W_hh = nn.Linear(H, H)                               # eq. 14 (bias = b_h)
        else:
            self.W_hi = nn.Linear(feat_dim, D)                        # image -> first input
            self.lstm = nn.LSTM(D, H, batch_first=True)
        self.W_oh = nn.Linear(H, vocab_size)                          # eq. 15 (bias = b_o)
        self.drop = nn.Dropout(model_cfg.dropout)
        if word_log_freq is not None:
            self.init_output_bias(word_log_freq)
        if model_cfg.word_vectors:
            if words is None:
                raise ValueError("model.word_vectors is set: pass the vocabulary words "
                                 "(Captioner(..., words=vocab.itos))")
            init_embedding(self.W_w, model_cfg.word_vectors, words, freeze=model_cfg.freeze_word_vectors)
        elif model_cfg.freeze_word_vectors:
            self.W_w.weight.requires_grad_(False)

    def init_output_bias(self, word_log_freq: Sequence[float]) -> None:
        """b_o <- log frequency of each word (section 3.3): the untrained model predicts words
        at their chance rate."""
        lf = torch.as_tensor(list(word_log_freq), dtype=torch.float32)
        if lf.shape != (self.vocab_size,):
            raise ValueError(f"word_log_freq has {lf.numel()} entries for a vocabulary of {self.vocab_size}")
        lf = torch.nan_to_num(lf, neginf=-30.0).clamp(min=-30.0)
        with torch.no_grad():
            self.W_oh.bias.copy_(lf)

    # ----------------------------------------------------------------- step API
    def init_state(self, feats: Tensor) -> State:
        """State before x_1 = START. rnn: (h_0 = 0, b_v); lstm: (h, c) after the image input."""
        if self.cell == "rnn":
            b_v = self.W_hi(self.drop(feats))                         # [N, H]  eq. 13
            return (feats.new_zeros(feats.shape[0], self.hidden_dim), b_v)
        x0 = self.W_hi(self.drop(feats))[:, None, :]                  # [N, 1, D]
        _, (h, c) = self.lstm(x0)
        return (h[0], c[0])                                           # [N, H] each

    def _advance(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One recurrence step on input vectors x [N, D] -> (h_t [N, H], next state)."""
        if self.cell == "rnn":
            h_prev, b_v = state
            wx = self.W_hx(x)
            if self.input_relu:
                wx = F.relu(wx)
            h = F.relu(wx + self.W_hh(h_prev) + b_v)                  # eq. 14; b_v only at t=1
            return h, (h, torch.zeros_like(b_v))
        h_prev, c_prev = state
        _, (h, c) = self.lstm(x[:, None, :], (h_prev[None].contiguous(), c_prev[None].contiguous()))
        return h[0], (h[0], c[0])

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens long[N] -> (log-probabilities float[N, V] of the next word, new state)."""
        h, state = self._advance(self.drop(self.W_w(tokens)), state)
        return F.log_softmax(self.W_oh(self.drop(h)), dim=-1), state   # eq. 15

    # ----------------------------------------------------------------- training
    caption_loss = staticmethod(caption_loss)

    def forward(self, feats: Tensor, inputs: Tensor) -> Tensor:
        """feats float[N, feat_dim], inputs long[N, T] = [START, w_1, ...] -> logits float[N, T, V]."""
        if feats.shape[0] != inputs.shape[0]:
            raise ValueError(f"{feats.shape[0]} feature rows for {inputs.shape[0]} captions")
        x = self.drop(self.W_w(inputs))                               # [N, T, D]
        state = self.init_state(feats)
        if self.cell == "lstm":
            hs, _ = self.lstm(x, (state[0][None].contiguous(), state[1][None].contiguous()))  # [N, T, H]
        else:
            out = []
            for t in range(inputs.shape[1]):
                h, state = self._advance(x[:, t], state)
                out.append(h)
            hs = torch.stack(out, dim=1)                              # [N, T, H]
        return self.W_oh(self.drop(hs))                               # [N, T, V]  eq. 15


class CaptioningModel(nn.Module):
    """Encoder + captioner: ``forward(images, boxes, inputs, box_mask=None) -> logits [N,T,V]``.

    ``boxes`` is a list of float[K_b,4] with ``inputs`` long[sum K_b, T], or the ingest batch's
    padded float[B,R,4] with ``inputs`` long[B,R,T] and ``box_mask`` bool[B,R]; then the rows are
    the masked-in regions in order (select the targets with ``targets[box_mask]``)."""

    def __init__(self, encoder: ImageEncoder, captioner: Captioner):
        super().__init__()
        self.encoder = encoder
        self.captioner = captioner

    def region_features(self, images: Tensor, boxes: Sequence[Tensor] | Tensor,
                        box_mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(boxes, Tensor):
            boxes = boxes_from_padded(boxes, slot_mask(box_mask, boxes))
        return self.encoder(images, boxes)                            # [N, feat_dim]

    def forward(self, images: Tensor, boxes: Sequence[Tensor] | Tensor, inputs: Tensor,
                box_mask: Optional[Tensor] = None, every_slot: bool = False) -> Tensor:
        if every_slot:   # train.static_shapes: padded [B,R,4] boxes and [B,R,T] inputs, every slot
            if not isinstance(boxes, Tensor):
                raise ValueError("every_slot: needs padded boxes float[B,R,4]")
            feats = self.encoder.every_slot(images, boxes)            # [B, R, feat_dim]
            return self.captioner(feats.flatten(0, 1), inputs.flatten(0, 1))   # [B*R, T, V]
        feats = self.region_features(images, boxes, box_mask)
        if inputs.dim() == 3:
            inputs = inputs[slot_mask(box_mask, inputs)]              # [N, T]
        return self.captioner(feats, inputs)


def build_captioner(model_cfg: ModelConfig, caption_cfg: CaptionConfig, vocab_size: int, feat_dim: int,
                    word_log_freq: Optional[Sequence[float]] = None,
                    words: Optional[Sequence[str]] = None) -> Captioner:
    return Captioner(model_cfg, caption_cfg, vocab_size, feat_dim, word_log_freq, words)
