"""Alignment-model inference: the boxes an image is scored on, sentence encoding, region
embeddings (eq. 1) for stored JPEGs, and MRF word-to-box alignment (eq. 10-12).

One corrupt-image policy for every caller (snippets, word alignment, baselines, retrieval,
search): images are decoded one by one; an image that does not decode is left out and
reported by index, and the rest go through the CNN in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dvsa.config import Config
from dvsa.ingest.decode import CorruptImage, JpegDecoder, decode_resize, scale_boxes
from dvsa.ingest.samples import align_boxes, box_of
from dvsa.ingest.torch_batches import normalize_images
from dvsa.models.alignment import AlignmentModel
from dvsa.models.encoder import ImageEncoder, build_encoder
from dvsa.models.mrf import viterbi_align
from dvsa.text import Vocab


def alignment_boxes(meta: dict, max_regions: int, whole_image: bool = True,
                    width: Optional[int] = None, height: Optional[int] = None) -> list[list[float]]:
    """The boxes the alignment model scores for this sample, in pixels of the stored JPEG
    (``width x height``, by default the sample's own): the same choice as training ingest
    (:func:`dvsa.ingest.samples.align_boxes`, ``align.whole_image``)."""
    width = int(meta["width"] if width is None else width)
    height = int(meta["height"] if height is None else height)
    return [[float(v) for v in box_of(meta, kind, idx, width, height)]
            for kind, idx in align_boxes(meta, max_regions, whole_image)]


def encode_sentences(vocab: Vocab, token_lists: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
    """Word ids of every sentence, untruncated: ``(tokens long[L, N], lengths long[L])``
    (no START/END; unknown words -> UNK; 0-padded)."""
    n = max((len(t) for t in token_lists), default=0)
    tokens = torch.zeros(len(token_lists), max(n, 1), dtype=torch.long)
    lengths = torch.zeros(len(token_lists), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        ids = vocab.ids(list(toks))
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths[i] = len(ids)
    return tokens, lengths


@dataclass
class DecodedImages:
    """Images decoded and resized as training ingest does, with their boxes in that frame."""

    images: list[np.ndarray]          # uint8 [3, S, S] each
    boxes: list[np.ndarray]           # float32 [K, 4] each, in the resized frame
    kept: list[int]                   # index (in the input) of each decoded image
    corrupt: list[int]                # index of each image that did not decode


def decode_images(jpgs: Sequence[bytes], boxes: Sequence[Sequence[Sequence[float]]], image_size: int,
                  decoder: JpegDecoder = "pil") -> DecodedImages:
    """Decode every image (boxes in pixels of the stored JPEG); corrupt ones are left out."""
    out = DecodedImages([], [], [], [])
    for i, (jpg, bx) in enumerate(zip(jpgs, boxes)):
        try:
            img, (w, h) = decode_resize(jpg, image_size, decoder)
        except CorruptImage:
            out.corrupt.append(i)
            continue
        out.images.append(img)
        out.boxes.append(scale_boxes(bx, w, h, image_size))
        out.kept.append(i)
    return out


def embed_decoded(model: AlignmentModel, decoded: DecodedImages, device: str | torch.device = "cpu"
                  ) -> tuple[Tensor, Tensor]:
    """v_i of eq. 1 for the decoded images' boxes: ``(v float[B, M, h], v_mask bool[B, M])``
    (B = decoded images; M = the largest box count)."""
    x = normalize_images(torch.from_numpy(np.stack(decoded.images)).to(device))     # [B, 3, S, S]
    with torch.no_grad():
        return model.embed_regions(x, [torch.from_numpy(b).to(device) for b in decoded.boxes])


def embed_images(model: AlignmentModel, jpgs: Sequence[bytes], boxes: Sequence[Sequence[Sequence[float]]],
                 image_size: int, decoder: JpegDecoder = "pil", device: str | torch.device = "cpu"
                 ) -> tuple[Tensor, Tensor]:
    """v_i of eq. 1 for the given boxes of every image: ``(v float[B, M, h], v_mask bool[B, M])``.
    Raises :class:`dvsa.ingest.decode.CorruptImage` when any image does not decode (callers that
    skip such images use :func:`decode_images` + :func:`embed_decoded`)."""
    decoded = decode_images(jpgs, boxes, image_size, decoder)
    if decoded.corrupt:
        decode_resize(jpgs[decoded.corrupt[0]], image_size, decoder)   # raises with the decoder's reason
    return embed_decoded(model, decoded, device)


def align_sentences(model: AlignmentModel, v: Tensor, v_mask: Tensor, sent_img: Tensor, tokens: Tensor,
                    lengths: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """MRF alignment of each sentence l to the boxes of its image ``sent_img[l]``.

    v float[B,M,h], v_mask bool[B,M], sent_img long[L], tokens long[L,N], lengths long[L] ->
    ``(assign long[L, N] (box index per word, -1 on padding), unary float[L, N, M])``.
    """
    with torch.no_grad():
        s, s_mask = model.embed_words(tokens, lengths)                       # [L, N, h], [L, N]
        v_l, vm_l = v[sent_img], v_mask[sent_img]                            # [L, M, h], [L, M]
        unary = model.word_region_scores(v_l, vm_l, s, s_mask).float()      # [L, N, M]
        assign = viterbi_align(unary, lengths, vm_l, beta)                  # [L, N]
    return assign, unary


class Embedder:
    """Batched eq. 1 for resized images (one CNN pass per batch) and eq. 2-6 for sentences.

    A model trained on precomputed features (``data.features``) gets its frozen CNN rebuilt
    exactly as ``dvsa features`` built it (``model.*`` + ``train.seed``)."""

    def __init__(self, model: AlignmentModel, cfg: Config, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.encoder: Optional[ImageEncoder] = None
        if getattr(model, "encoder", None) is None:   # trained on precomputed features
            torch.manual_seed(cfg.train.seed)
            self.encoder = build_encoder(cfg.model).to(device).eval()

    @torch.no_grad()
    def regions(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
                max_boxes: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """(v float[B, M, h], v_mask bool[B, M]) with M = ``max_boxes`` or ``data.max_regions``."""
        M = max_boxes or self.cfg.data.max_regions
        x = normalize_images(torch.from_numpy(np.stack(images)).to(self.device))        # [B, 3, S, S]
        padded = torch.zeros(len(images), M, 4, device=self.device)
        mask = torch.zeros(len(images), M, dtype=torch.bool, device=self.device)
        for b, bx in enumerate(boxes):
            padded[b, :len(bx)] = torch.from_numpy(bx)
            mask[b, :len(bx)] = True
        if self.encoder is None:
            v, v_mask = self.model.embed_regions(x, padded, mask)                       # [B, M', h]
        else:
            feats = self.encoder(x, [padded[b][mask[b]] for b in range(len(images))])  # [sum K, D]
            full = feats.new_zeros(len(images), M, feats.shape[-1])
            full[mask] = feats
            v, v_mask = self.model.embed_region_features(full, mask)
        if v.shape[1] < M:  # embed_regions pads to the batch's largest count
            v = torch.cat([v, v.new_zeros(v.shape[0], M - v.shape[1], v.shape[2])], dim=1)
            v_mask = torch.cat([v_mask, v_mask.new_zeros(v_mask.shape[0], M - v_mask.shape[1])], dim=1)
        return v.float().cpu(), v_mask.cpu()

    @torch.no_grad()
    def words(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[Tensor, Tensor]:
        """(s float[L, T, h], s_mask bool[L, T]) of eq. 2-6 for word ids ``tokens long[L, T]``."""
        s, s_mask = self.model.embed_words(torch.from_numpy(tokens).to(self.device),
                                           torch.from_numpy(lengths).to(self.device))   # [L, T, h]
        return s.float().cpu(), s_mask.cpu()
