"""The model a config describes, built the same way for training, resuming and loading.

With ``data.features`` set (precomputed frozen-CNN feature shards, ``dvsa features``) no CNN
is built: the alignment model takes ``feats`` directly, and the captioner is wrapped in
:class:`FeatureCaptioningModel`, which has the ``CaptioningModel`` call shape minus images.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from dvsa.config import Config
from dvsa.models.captioner import Captioner, CaptioningModel, build_captioner
from dvsa.models.encoder import FEAT_DIMS, build_encoder, slot_mask
from dvsa.text import Vocab


class FeatureCaptioningModel(nn.Module):
    """Captioner over precomputed CNN features: ``forward(feats float[B,R,D], inputs long[B,R,T],
    box_mask bool[B,R]) -> logits float[N,T,V]`` (N = masked-in rows)."""

    def __init__(self, captioner: Captioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, feats: Tensor, inputs: Tensor, box_mask: Optional[Tensor] = None,
                every_slot: bool = False) -> Tensor:
        if every_slot:   # train.static_shapes: logits of every slot, float[B*R,T,V]
            return self.captioner(feats.flatten(0, 1), inputs.flatten(0, 1))
        mask = slot_mask(box_mask, feats)
        return self.captioner(feats[mask], inputs[mask])


def build_model(cfg: Config, vocab: Vocab) -> nn.Module:
    """``AlignmentModel`` for ``task=align``; ``CaptioningModel(encoder, captioner)`` otherwise
    (the captioner's output biases start at the vocabulary's log word frequencies)."""
    words = list(vocab.itos)
    features = bool(cfg.data.features)
    if cfg.task == "align":
        from dvsa.models.alignment import AlignmentModel

        return AlignmentModel(cfg.model, cfg.align, len(vocab), words=words, with_encoder=not features)

    if features:
        captioner = build_captioner(cfg.model, cfg.caption, len(vocab), FEAT_DIMS[cfg.model.backbone],
                                    word_log_freq=vocab.log_frequencies(), words=words)
        return FeatureCaptioningModel(captioner)
    encoder = build_encoder(cfg.model)
    captioner = build_captioner(cfg.model, cfg.caption, len(vocab), encoder.feat_dim,
                                word_log_freq=vocab.log_frequencies(), words=words)
    return CaptioningModel(encoder, captioner)
