"""Box captioning with a trained captioner (section 4.4): the in-process core of region
evaluation's Ray actors and of ``dvsa caption``."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, get_args

import numpy as np
import torch

from dvsa.config import CaptionDecode, Config
from dvsa.errors import DvsaError
from dvsa.inference.checkpoints import load_trained
from dvsa.inference.device import pick_device
from dvsa.ingest.decode import decode_resize, scale_boxes
from dvsa.ingest.torch_batches import normalize_images
from dvsa.models import decoding
from dvsa.models.build import FeatureCaptioningModel
from dvsa.models.captioner import CaptioningModel
from dvsa.models.encoder import ImageEncoder, build_encoder
from dvsa.text import Vocab

DECODERS: tuple[str, ...] = get_args(CaptionDecode)  # ("beam", "greedy", "sample")


class BoxCaptioner:
    """A trained captioner describing boxes: ``describe(images, boxes) -> [[(caption, logprob)]]``.

    ``images``: uint8 ``[3, S, S]`` arrays (resized to ``data.image_size``, as ingest makes
    them); ``boxes``: per image ``float[K, 4]`` in that resized frame. One CNN pass for all
    images, RoIAlign for all boxes, one decode for all rows. A model trained on precomputed
    features (``data.features``) gets its frozen CNN rebuilt exactly as ``dvsa features``
    built it (``model.*`` + ``train.seed``).
    """

    def __init__(self, model: torch.nn.Module, vocab: Vocab, cfg: Config, device: Optional[str] = None,
                 decode: Optional[CaptionDecode] = None, beam_size: Optional[int] = None):
        if cfg.task != "caption" or not isinstance(model, (CaptioningModel, FeatureCaptioningModel)):
            raise DvsaError(f"this checkpoint is a {cfg.task!r} model, not a captioner")
        self.cfg = cfg
        self.vocab = vocab
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        if decode is not None and decode not in DECODERS:
            raise DvsaError(f"decode must be one of {DECODERS}, got {decode!r}")
        self.caption_cfg = cfg.caption
        if decode is not None or beam_size is not None:
            self.caption_cfg = dataclasses.replace(
                cfg.caption, decode=decode or cfg.caption.decode, beam_size=beam_size or cfg.caption.beam_size)
        self.encoder: ImageEncoder
        if isinstance(self.model, CaptioningModel):
            self.encoder = self.model.encoder
        else:  # FeatureCaptioningModel: rebuild the frozen CNN of `dvsa features`
            torch.manual_seed(cfg.train.seed)
            self.encoder = build_encoder(cfg.model).to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str, tracking_uri: Optional[str] = None, device: Optional[str] = None,
                        decode: Optional[CaptionDecode] = None, beam_size: Optional[int] = None
                        ) -> "BoxCaptioner":
        model, vocab, cfg = load_trained(checkpoint, tracking_uri)
        return cls(model, vocab, cfg, device, decode, beam_size)

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    def prepare_image(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """Image file bytes -> (uint8 [3, S, S], (width, height) of the stored image);
        raises :class:`dvsa.ingest.decode.CorruptImage`."""
        return decode_resize(data, self.image_size, self.cfg.data.jpeg_decoder)

    def to_frame(self, boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
        """Boxes in stored-image pixels -> float32 [K, 4] in the resized frame."""
        if len(boxes) == 0:
            return np.zeros((0, 4), np.float32)
        return scale_boxes(boxes, width, height, self.image_size)

    @torch.no_grad()
    def describe(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[list[tuple[str, float]]]:
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        counts = [len(b) for b in boxes]
        if not images or sum(counts) == 0:
            return [[] for _ in images]
        x = normalize_images(torch.from_numpy(np.stack(images)).to(self.device))      # [B, 3, S, S]
        box_list = [torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4), device=self.device)
                    for b in boxes]                                                    # B x [K_b, 4]
        feats = self.encoder(x, box_list)                                              # [sum K_b, D]
        tokens, logprob = decoding.decode(self.model.captioner, feats, self.cfg.data.max_len, self.caption_cfg)
        words = [" ".join(self.vocab.decode(row)) for row in tokens.cpu().tolist()]
        lp = logprob.float().cpu().tolist()
        out, pos = [], 0
        for k in counts:
            out.append(list(zip(words[pos:pos + k], lp[pos:pos + k])))
            pos += k
        return out
