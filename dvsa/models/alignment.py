"""The alignment model of section 3.1: regions and words in one h-dimensional space.

Regions (eq. 1)::   v_i = W_m CNN(I_b) + b_m
                    (``model.box_geometry``: + W_g g(b), g = (x1, y1, x2, y2, area) of box b over the image side)
Words (eq. 2-6)::   x_t = W_w I_t
                    e_t = f(W_e x_t + b_e)
                    h^f_t = f(e_t + W_f h^f_{t-1} + b_f)
                    h^b_t = f(e_t + W_b h^b_{t+1} + b_b)
                    s_t = f(W_d (h^f_t + h^b_t) + b_d),       f = ReLU
                    (``align.sentence_encoder=bow``: s_t = f(W_d e_t + b_d), no context)
Score (eq. 8)::     S_kl = sum_t max_i v_i^T s_t
      (eq. 7)::     S_kl = sum_t sum_i max(0, v_i^T s_t)
                    (``align.word_pool=mean``: either divided by the sentence's length |l|)
Loss (eq. 9)::      sum_k [ sum_l max(0, S_kl - S_kk + margin) + sum_l max(0, S_lk - S_kk + margin) ]
                    (``align.loss=hardest``: only the hardest negative of each row/column, VSE++)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvsa.config import AlignConfig, ModelConfig
from dvsa.models.encoder import FEAT_DIMS, ImageEncoder, boxes_from_padded, build_encoder, slot_mask
from dvsa.models.word_vectors import init_embedding

BoxesArg = Union[Sequence[Tensor], Tensor]


def ranking_loss(S: Tensor, margin: float = 1.0, hardest: bool = False, reduction: str = "mean") -> Tensor:
    """Eq. 9 on a square score matrix ``S float[B,B]`` (rows images, columns sentences;
    the diagonal holds the true pairs).

    ``hardest=False``: the sum over every violating pair, both directions (the paper).
    ``hardest=True``: per image and per sentence only the hardest negative (VSE++).
    ``reduction="mean"`` divides that sum by B (the paper normalises gradients across a
    batch, section 3.3); ``"sum"`` returns eq. 9 as written.
    """
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"ranking_loss needs a square [B,B] score matrix, got {tuple(S.shape)}")
    b = S.shape[0]
    diag = S.diagonal()                                          # S_kk [B]
    off = ~torch.eye(b, dtype=torch.bool, device=S.device)
    cost_sent = (S - diag[:, None] + margin).clamp(min=0) * off  # image k vs sentences l: S_kl - S_kk
    cost_img = (S - diag[None, :] + margin).clamp(min=0) * off   # sentence k vs images l: S_lk - S_kk
    if hardest:
        total = cost_sent.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
    else:
        total = cost_sent.sum() + cost_img.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / b
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def pair_dots(v: Tensor, v_mask: Tensor, s: Tensor, s_mask: Tensor) -> tuple[Tensor, Tensor]:
    """v_i^T s_t for every image k and sentence l: (float[B, L, T, M] with masked entries 0,
    the mask bool[B, L, T, M])."""
    dots = torch.einsum("bmh,lth->bltm", v, s)                   # [B, L, T, M]
    mask = s_mask[None, :, :, None] & v_mask[:, None, None, :]   # [B, L, T, M]
    return dots.masked_fill(~mask, 0.0), mask


def score_eq8(v: Tensor, v_mask: Tensor, s: Tensor, s_mask: Tensor) -> Tensor:
    """S_kl = sum_t max_i v_i^T s_t (eq. 8): float[B, L]."""
    dots = torch.einsum("bmh,lth->bltm", v, s)                   # [B, L, T, M]
    dots = dots.masked_fill(~v_mask[:, None, None, :], float("-inf"))
    best = dots.max(dim=-1).values                               # [B, L, T]: max over regions
    has_region = v_mask.any(dim=1)[:, None, None]                # images without regions score 0
    best = torch.where(has_region & s_mask[None], best, torch.zeros_like(best))
    return best.sum(dim=-1)                                      # [B, L]: sum over words


def score_eq7(v: Tensor, v_mask: Tensor, s: Tensor, s_mask: Tensor) -> Tensor:
    """S_kl = sum_t sum_i max(0, v_i^T s_t) (eq. 7, Karpathy et al. 2014): float[B, L]."""
    dots, _ = pair_dots(v, v_mask, s, s_mask)
    return dots.clamp(min=0).sum(dim=(2, 3))


class SentenceEncoder(nn.Module):
    """Words -> s_t: the BRNN of eq. 2-6, or the bag of words ``s_t = f(W_d e_t + b_d)``."""

    def __init__(self, vocab_size: int, word_dim: int, hidden_dim: int, embed_dim: int,
                 kind: str = "brnn", dropout: float = 0.0):
        super().__init__()
        if kind not in ("brnn", "bow"):
            raise ValueError(f"align.sentence_encoder: {kind!r} is not one of 'brnn', 'bow'")
        self.kind = kind
        self.W_w = nn.Embedding(vocab_size, word_dim, padding_idx=0)  # eq. 2
        self.W_e = nn.Linear(word_dim, hidden_dim)                    # eq. 3 (with b_e)
        if kind == "brnn":
            self.W_f = nn.Linear(hidden_dim, hidden_dim)              # eq. 4 (with b_f)
            self.W_b = nn.Linear(hidden_dim, hidden_dim)              # eq. 5 (with b_b)
        self.W_d = nn.Linear(hidden_dim, embed_dim)                   # eq. 6 (with b_d)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """tokens long[L,T] (word ids, no START/END), lengths long[L] -> (s [L,T,h], mask [L,T])."""
        L, T = tokens.shape
        steps = torch.arange(T, device=tokens.device)
        s_mask = steps[None, :] < lengths[:, None]                    # [L, T]
        x = self.drop(self.W_w(tokens))                               # [L, T, word_dim]   eq. 2
        e = F.relu(self.W_e(x))                                       # [L, T, hidden]     eq. 3
        if self.kind == "bow":
            s = F.relu(self.W_d(self.drop(e)))                        # [L, T, h]
        else:
            h_f = self._recur(e, self.W_f)                            # [L, T, hidden]     eq. 4
            # eq. 5 runs right to left from each sentence's last real word: reverse the first
            # length_l positions of every row, run the same recurrence, reverse back.
            rev = _reverse_within_length(lengths, T)                  # [L, T] gather index
            e_rev = e.gather(1, rev[:, :, None].expand_as(e))
            h_b_rev = self._recur(e_rev, self.W_b)
            h_b = h_b_rev.gather(1, rev[:, :, None].expand_as(h_b_rev))  # eq. 5
            s = F.relu(self.W_d(self.drop(h_f + h_b)))                # [L, T, h]          eq. 6
        return s * s_mask[:, :, None], s_mask

    @staticmethod
    def _recur(e: Tensor, W: nn.Linear) -> Tensor:
        """h_t = f(e_t + W h_{t-1} + b), h_0 = 0, over dim 1."""
        h = e.new_zeros(e.shape[0], e.shape[2])
        out = []
        for t in range(e.shape[1]):
            h = F.relu(e[:, t] + W(h))
            out.append(h)
        return torch.stack(out, dim=1)


GEOMETRY_DIM = 5


def box_geometry(boxes: Tensor, width: int, height: int) -> Tensor:
    """g(b) = (x1/W, y1/H, x2/W, y2/H, area/(W H)) for boxes float[K, 4] (x1, y1, x2, y2) -> float[K, 5]:
    where a region is, which RoI-pooled appearance barely encodes ("on the left")."""
    scale = boxes.new_tensor([width, height, width, height])
    g = boxes / scale
    area = ((g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]))[:, None]
    return torch.cat([g, area], dim=1)


def _reverse_within_length(lengths: Tensor, T: int) -> Tensor:
    """Index [L, T]: position t -> length-1-t for t < length, else t (an involution)."""
    t = torch.arange(T, device=lengths.device)[None, :]
    n = lengths[:, None]
    return torch.where(t < n, n - 1 - t, t)


class AlignmentModel(nn.Module):
    """Regions and words embedded in one space, scored by eq. 8 (or 7), trained by eq. 9.

    ``forward(images, boxes, box_mask, tokens, lengths) -> S float[B, L]`` is the training entry
    (call the model itself so DistributedDataParallel sees the forward). ``feats`` instead of
    images uses precomputed CNN features ``float[B,M,feat_dim]`` (then boxes are not needed).
    ``words`` (the vocabulary, by id) is needed only when ``model.word_vectors`` is set;
    ``with_encoder=False`` builds no CNN (training on precomputed features, of size
    ``feat_dim``: by default the backbone's).
    """

    def __init__(self, model_cfg: ModelConfig, align_cfg: AlignConfig, vocab_size: int,
                 words: Optional[Sequence[str]] = None, with_encoder: bool = True, feat_dim: Optional[int] = None):
        super().__init__()
        self.align_cfg = align_cfg
        self.encoder: Optional[ImageEncoder] = build_encoder(model_cfg) if with_encoder else None
        self.feat_dim = FEAT_DIMS[model_cfg.backbone] if feat_dim is None else int(feat_dim)
        if self.encoder is not None and self.feat_dim != self.encoder.feat_dim:
            raise ValueError(f"feat_dim={feat_dim} differs from the {model_cfg.backbone} encoder's "
                             f"{self.encoder.feat_dim}")
        self.W_m = nn.Linear(self.feat_dim, model_cfg.embed_dim)     # eq. 1 (with b_m)
        self.W_g: Optional[nn.Linear] = (nn.Linear(GEOMETRY_DIM, model_cfg.embed_dim, bias=False)
                                         if model_cfg.box_geometry else None)
        self.feat_drop = nn.Dropout(model_cfg.dropout)
        self.sentence = SentenceEncoder(vocab_size, model_cfg.word_dim, model_cfg.hidden_dim,
                                        model_cfg.embed_dim, align_cfg.sentence_encoder,
                                        model_cfg.dropout)
        if model_cfg.word_vectors:
            if words is None:
                raise ValueError("model.word_vectors is set: pass the vocabulary words "
                                 "(AlignmentModel(..., words=vocab.itos))")
            init_embedding(self.sentence.W_w, model_cfg.word_vectors, words,
                           freeze=model_cfg.freeze_word_vectors)
        elif model_cfg.freeze_word_vectors:
            self.sentence.W_w.weight.requires_grad_(False)

    # ----------------------------------------------------------------- images
    def embed_regions(self, images: Tensor, boxes: BoxesArg,
                      box_mask: Optional[Tensor] = None, every_slot: bool = False) -> tuple[Tensor, Tensor]:
        """Images + boxes (a list of [K_b,4], or padded [B,M,4] with ``box_mask``) ->
        (v float[B,M,h], v_mask bool[B,M]). ``every_slot`` (``train.static_shapes``, padded boxes
        only): every slot goes through the CNN, the box mask masks the empty ones; the list path
        packs each image's regions first and pads after the longest."""
        if self.encoder is None:
            raise RuntimeError("this AlignmentModel was built with_encoder=False: use embed_region_features")
        if every_slot:
            if not isinstance(boxes, Tensor):
                raise ValueError("every_slot: needs padded boxes float[B,M,4]")
            B, M, _ = boxes.shape
            feats = self.encoder.every_slot(images, boxes)            # [B, M, feat_dim]
            geometry = None
            if self.W_g is not None:
                geometry = box_geometry(boxes.reshape(B * M, 4).to(feats), images.shape[-1],
                                        images.shape[-2]).view(B, M, GEOMETRY_DIM)
            return self.embed_region_features(feats, slot_mask(box_mask, boxes), geometry)
        if isinstance(boxes, Tensor):
            box_list = boxes_from_padded(boxes, slot_mask(box_mask, boxes))
        else:
            box_list = list(boxes)
        counts = [len(bx) for bx in box_list]
        feats = self.encoder(images, box_list)                        # [sum K_b, feat_dim]
        B, M = len(counts), max(counts, default=0)
        v_mask = torch.arange(M, device=feats.device)[None, :] < torch.tensor(counts, device=feats.device)[:, None]
        padded = feats.new_zeros(B, M, feats.shape[-1])
        padded[v_mask] = feats
        geometry = None
        if self.W_g is not None:
            geometry = feats.new_zeros(B, M, GEOMETRY_DIM)
            geometry[v_mask] = box_geometry(torch.cat(box_list).to(feats), images.shape[-1], images.shape[-2])
        return self.embed_region_features(padded, v_mask, geometry)

    def embed_region_features(self, feats: Tensor, v_mask: Tensor,
                              geometry: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Eq. 1 on CNN features float[B,M,feat_dim] (+ ``W_g g(b)`` from ``geometry float[B,M,5]``
        with ``model.box_geometry``) -> (v float[B,M,h], v_mask bool[B,M])."""
        v = self.W_m(self.feat_drop(feats))                           # [B, M, h]
        if self.W_g is not None:
            if geometry is None:
                raise ValueError("model.box_geometry: the region embedding needs the boxes (not features alone)")
            v = v + self.W_g(geometry)
        return v * v_mask[:, :, None], v_mask.bool()

    # ----------------------------------------------------------------- sentences
    def embed_words(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """tokens long[L,T] (word ids only), lengths long[L] -> (s float[L,T,h], s_mask bool[L,T])."""
        return self.sentence(tokens, lengths)

    # ----------------------------------------------------------------- scores
    def scores(self, v: Tensor, v_mask: Tensor, s: Tensor, s_mask: Tensor) -> Tensor:
        """S float[B, L] for every image x sentence, by ``align.score`` (eq. 8 or eq. 7),
        summed over each sentence's words or (``align.word_pool=mean``) averaged."""
        fn = score_eq8 if self.align_cfg.score == "eq8" else score_eq7
        S = fn(v, v_mask, s, s_mask)
        if self.align_cfg.word_pool == "mean":
            S = S / s_mask.sum(dim=1).clamp(min=1)[None, :]         # 1/|l| sum_t ...
        return S

    @staticmethod
    def word_region_scores(v: Tensor, v_mask: Tensor, s: Tensor, s_mask: Tensor) -> Tensor:
        """v_i^T s_t for matched pairs (image l with sentence l): float[L, T, M].

        Padded regions score -inf (no word may align there), padded words 0: the MRF unary."""
        dots = torch.einsum("lmh,lth->ltm", v, s)                     # [L, T, M]
        dots = dots.masked_fill(~v_mask[:, None, :], float("-inf"))
        return dots.masked_fill(~s_mask[:, :, None], 0.0)

    ranking_loss = staticmethod(ranking_loss)

    def loss(self, S: Tensor) -> Tensor:
        """Eq. 9 with ``align.margin`` and ``align.loss`` (sum | hardest)."""
        return ranking_loss(S, margin=self.align_cfg.margin, hardest=self.align_cfg.loss == "hardest")

    def forward(self, images: Optional[Tensor], boxes: Optional[BoxesArg], box_mask: Optional[Tensor],
                tokens: Tensor, lengths: Tensor, feats: Optional[Tensor] = None,
                every_slot: bool = False) -> Tensor:
        """One align batch (image b with sentence b) -> S float[B, B]; ``every_slot``: see
        :meth:`embed_regions` (features are always every slot)."""
        if feats is not None:
            if box_mask is None:
                raise ValueError("AlignmentModel: feats needs box_mask (which of the M rows are regions)")
            v, v_mask = self.embed_region_features(feats, box_mask.bool())
        else:
            if images is None or boxes is None:
                raise ValueError("AlignmentModel: pass feats, or images with boxes")
            v, v_mask = self.embed_regions(images, boxes, box_mask, every_slot=every_slot)
        s, s_mask = self.embed_words(tokens, lengths)
        return self.scores(v, v_mask, s, s_mask)
