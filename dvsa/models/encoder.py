"""Image encoder: a CNN backbone and region features for a set of boxes per image.

Eq. 1 of the paper, ``v = W_m [CNN(I_b)] + b_m``, needs ``CNN(I_b)`` for every box ``b``. This
module computes it two ways (``model.region_features``):

- ``roi_align`` (default): one CNN pass per image up to its last convolutional map, then
  ``torchvision.ops.roi_align`` pools a ``roi_size x roi_size`` window for every box from that
  shared map (Fast R-CNN style; the paper's section 4.5 names per-region passes as its cost).
- ``crop`` (the paper's eq. 1): crop every box out of the image, resize it to
  ``crop_size x crop_size`` and run the CNN on each crop.

Both end in the same head (spatial mean for ResNets and ``tiny``, fc6/fc7 for VGG-16) and
return ``float[sum K_b, feat_dim]``. A crop's whole conv map goes through the backbone's own
pooling (``head.whole_map``: ResNet's global average pool; VGG-16's pool5, a max pool, to 7x7),
so at ``crop_size`` 224 a crop's feature is exactly the torchvision model's penultimate layer.
``W_m`` is not here: the alignment model and the captioner own their projections of these features.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence, cast

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from dvsa.config import ModelConfig
from dvsa.errors import DvsaError
from dvsa.models.weights import check_hash_in_name, load_into, read_state_dict

log = logging.getLogger(__name__)

#: feature size of each backbone's head (what ``ImageEncoder.feat_dim`` will be)
FEAT_DIMS = {"tiny": 128, "resnet18": 512, "resnet50": 2048, "resnet101": 2048, "vgg16": 4096}
BACKBONES = tuple(FEAT_DIMS)


# --------------------------------------------------------------------------- backbones


class TinyCNN(nn.Module):
    """Four conv+BN+ReLU layers, total stride 8: CPU tests and the 2-core demo."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        strides = [2, 2, 2, 1]
        layers: list[nn.Module] = []
        for cin, cout, s in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class _MeanHead(nn.Module):
    """[K, C, r, r] -> [K, C]: spatial mean (ResNet's global average pool)."""

    def forward(self, pooled: Tensor) -> Tensor:
        return pooled.mean(dim=(2, 3))

    def whole_map(self, fmap: Tensor) -> Tensor:
        """A crop's whole conv map [K, C, h, w] -> [K, C] (global average pool, as ResNet)."""
        return fmap.mean(dim=(2, 3))


class _VggHead(nn.Module):
    """[K, 512, r, r] -> [K, 4096]: fc6, fc7 (after ReLU), as the paper's CNN(I_b)."""

    def __init__(self, classifier: nn.Sequential):
        super().__init__()
        self.fc = nn.Sequential(*list(classifier.children())[:-1])  # drop the 1000-way layer

    def forward(self, pooled: Tensor) -> Tensor:
        pooled = F.adaptive_max_pool2d(pooled, 7) if pooled.shape[-1] != 7 else pooled
        return self.fc(pooled.flatten(1))

    def whole_map(self, fmap: Tensor) -> Tensor:
        """A crop's conv5_3 map [K, 512, h, w] -> [K, 4096]: pool5 (a 2x2 max pool, 14 -> 7 at
        224 px; adaptive for other crop sizes), then fc6, fc7."""
        return self.fc(F.adaptive_max_pool2d(fmap, 7).flatten(1))


#: the 1000-way ImageNet layer each torchvision backbone ends in: the encoder never uses it, so a
#: weights file may leave it out (a trunk saved without its classifier)
CLASSIFIER_KEYS = {"resnet18": ("fc.",), "resnet50": ("fc.",), "resnet101": ("fc.",), "vgg16": ("classifier.6.",)}


def _torchvision_model(name: str, weights: Optional[str]) -> nn.Module:
    ctor = getattr(torchvision.models, name)
    model = ctor(weights=None)
    if weights is None:
        log.warning("model.backbone=%s: no model.weights given, initialising the CNN randomly", name)
        return model
    load_into(model, _load_weights(weights), f"model.weights={weights}", name, optional=CLASSIFIER_KEYS.get(name, ()))
    log.info("model.backbone=%s: loaded weights %s", name, weights)
    return model


def _load_weights(weights: str) -> dict[str, Tensor]:
    """A state dict from a file path, or from a torchvision weights name in the local hub cache
    (its sha256 checked against the hash in its file name)."""
    if os.path.exists(weights):
        return read_state_dict(weights, "model.weights")
    try:
        enum_value = torchvision.models.get_weight(weights)
    except (ValueError, KeyError, AttributeError):
        raise DvsaError(
            f"model.weights={weights!r}: neither an existing file nor a torchvision weights name "
            f"(e.g. ResNet50_Weights.IMAGENET1K_V2)") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum_value.url))
    if not os.path.isfile(path):
        raise DvsaError(
            f"model.weights={weights}: not in the local torch cache (expected {path}); "
            f"download {enum_value.url} there (or set TORCH_HOME), or pass a file path")
    check_hash_in_name(path, f"model.weights={weights}", enum_value.url)
    return read_state_dict(path, "model.weights")


def _build_backbone(name: str, weights: Optional[str]) -> tuple[nn.Module, _MeanHead | _VggHead]:
    """(trunk: images -> conv map, head: pooled [K,C,r,r] -> [K, feat_dim])."""
    trunk: nn.Module
    if name == "tiny":
        trunk = TinyCNN()
        if weights is not None:
            if not os.path.exists(weights):
                raise DvsaError(f"model.weights={weights!r}: the tiny backbone takes only a file path")
            load_into(trunk, read_state_dict(weights, "model.weights"), f"model.weights={weights}", "tiny")
        else:
            log.warning("model.backbone=tiny: no model.weights given, initialising the CNN randomly")
        return trunk, _MeanHead()
    if name.startswith("resnet"):
        m = cast(torchvision.models.ResNet, _torchvision_model(name, weights))
        trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        return trunk, _MeanHead()
    if name == "vgg16":
        vgg = cast(torchvision.models.VGG, _torchvision_model(name, weights))
        trunk = nn.Sequential(*list(vgg.features.children())[:-1])  # conv5_3 + ReLU, stride 16
        return trunk, _VggHead(vgg.classifier)
    raise DvsaError(f"model.backbone: {name!r} is not one of {', '.join(BACKBONES)}")


# --------------------------------------------------------------------------- encoder


def full_image_boxes(images: Tensor) -> list[Tensor]:
    """One box ``[0, 0, W, H]`` per image: the whole image as a region."""
    b, _, h, w = images.shape
    box = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=images.device)
    return [box.clone() for _ in range(b)]


def slot_mask(box_mask: Optional[Tensor], padded: Tensor) -> Tensor:
    """``bool[B,M]``: ``box_mask``, or every slot of ``padded`` (``[B,M,...]``) when it is None."""
    if box_mask is None:
        return torch.ones(padded.shape[:2], dtype=torch.bool, device=padded.device)
    return box_mask.bool()


def boxes_from_padded(boxes: Tensor, box_mask: Tensor) -> list[Tensor]:
    """``float[B,M,4]`` + ``bool[B,M]`` -> list of ``float[K_b,4]`` (the masked-in rows, in order)."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or box_mask.shape != boxes.shape[:2]:
        raise ValueError(f"boxes must be [B,M,4] with box_mask [B,M], got {tuple(boxes.shape)} "
                         f"and {tuple(box_mask.shape)}")
    # two host reads in all (the masked-in rows, the count per image), not one per image
    rows = boxes[box_mask]                                             # [sum K_b, 4], image by image
    return list(rows.split(box_mask.sum(dim=1).tolist()))


class ImageEncoder(nn.Module):
    """CNN(I_b) for every box of every image: ``forward(images, boxes) -> float[sum K_b, feat_dim]``.

    ``images``: float[B,3,H,W], normalised. ``boxes``: list of B float[K_b,4] tensors
    (x1, y1, x2, y2 in pixels of ``images``). Rows come out image by image, box by box.
    """

    def __init__(self, backbone: str = "resnet18", weights: Optional[str] = None,
                 trainable: bool = True, region_features: str = "roi_align", roi_size: int = 7,
                 crop_size: int = 224, crop_batch: int = 64):
        super().__init__()
        if region_features not in ("roi_align", "crop"):
            raise DvsaError(f"model.region_features: {region_features!r} is not one of 'roi_align', 'crop'")
        self.backbone = backbone
        self.region_features = region_features
        self.roi_size = int(roi_size)
        self.crop_size = int(crop_size)
        self.crop_batch = int(crop_batch)
        self.trunk, self.head = _build_backbone(backbone, weights)
        self.feat_dim = FEAT_DIMS[backbone]
        self.trainable = bool(trainable)
        self.memory_format = torch.contiguous_format   # of the CNN's input (see use_channels_last)
        if not self.trainable:
            for p in self.parameters():
                p.requires_grad_(False)

    def use_channels_last(self) -> "ImageEncoder":
        """Channels-last (NHWC) weights and inputs for the CNN (``train.channels_last``): cuDNN's
        fastest convolutions under bf16 autocast take NHWC; values are unchanged."""
        self.memory_format = torch.channels_last
        self.trunk.to(memory_format=torch.channels_last)
        return self

    def train(self, mode: bool = True) -> "ImageEncoder":
        # A frozen CNN keeps its BatchNorm statistics and dropout in inference mode.
        return super().train(mode and self.trainable)

    def forward(self, images: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be float[B,3,H,W], got {tuple(images.shape)}")
        if len(boxes) != images.shape[0]:
            raise ValueError(f"got {len(boxes)} box lists for {images.shape[0]} images")
        for i, bx in enumerate(boxes):
            if bx.dim() != 2 or bx.shape[-1] != 4:
                raise ValueError(f"boxes[{i}] must be float[K,4], got {tuple(bx.shape)}")
        boxes = [bx.to(dtype=images.dtype, device=images.device) for bx in boxes]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            if self.region_features == "roi_align":
                return self._roi_align_features(images, boxes)
            return self._crop_features(images, boxes)

    def every_slot(self, images: Tensor, boxes: Tensor) -> Tensor:
        """``float[B,3,H,W]`` + padded ``float[B,M,4]`` -> ``float[B,M,feat_dim]``: every slot,
        padded ones too (``train.static_shapes``). RoIAlign takes the B*M boxes as one
        ``[B*M, 5]`` tensor (image index, box), so no shape depends on which slots are occupied."""
        if images.dim() != 4 or boxes.dim() != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[-1] != 4:
            raise ValueError(f"every_slot needs images [B,3,H,W] and boxes [B,M,4], got "
                             f"{tuple(images.shape)} and {tuple(boxes.shape)}")
        if self.region_features != "roi_align":
            raise DvsaError("train.static_shapes: needs model.region_features=roi_align")
        B, M, _ = boxes.shape
        image_of = torch.arange(B, device=images.device, dtype=images.dtype)[:, None].expand(B, M)
        rois = torch.cat([image_of.reshape(B * M, 1), boxes.reshape(B * M, 4).to(images)], dim=1)   # [B*M, 5]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self._roi_align_features(images, rois).view(B, M, -1)

    # ours: one pass per image, RoIAlign on the shared map
    def _roi_align_features(self, images: Tensor, boxes: list[Tensor] | Tensor) -> Tensor:
        """``boxes``: a list of B float[K_b,4], or float[K,5] rows of (image index, box)."""
        fmap = self.trunk(images.contiguous(memory_format=self.memory_format))   # [B, C, H/s, W/s]
        scale = 2.0 ** round(math.log2(fmap.shape[-1] / images.shape[-1]))
        pooled = roi_align(fmap, boxes, output_size=self.roi_size, spatial_scale=scale,
                           sampling_ratio=2, aligned=True)            # [sum K, C, r, r]
        return self.head(pooled)                                       # [sum K, feat_dim]

    # the paper's eq. 1: crop, resize, CNN per box
    def _crop_features(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        _, _, h, w = images.shape
        crops = []
        for b, bx in enumerate(boxes):
            for x1, y1, x2, y2 in bx.tolist():
                left, top = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
                right, bottom = min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2)))
                right, bottom = max(right, left + 1), max(bottom, top + 1)
                crops.append(TF.resized_crop(images[b], top, left, bottom - top, right - left,
                                             [self.crop_size, self.crop_size], antialias=True))
        if not crops:
            return images.new_zeros(0, self.feat_dim)
        out = []
        for i in range(0, len(crops), self.crop_batch):
            batch = torch.stack(crops[i:i + self.crop_batch])          # [k, 3, crop, crop]
            fmap = self.trunk(batch.contiguous(memory_format=self.memory_format))   # [k, C, crop/s, crop/s]
            out.append(self.head.whole_map(fmap))                      # [k, feat_dim]
        return torch.cat(out)                                          # [sum K, feat_dim]


def build_encoder(model_cfg: ModelConfig) -> ImageEncoder:
    """The encoder ``model.*`` describes (backbone, weights, trainable, region_features, sizes)."""
    return ImageEncoder(backbone=model_cfg.backbone, weights=model_cfg.weights,
                        trainable=model_cfg.trainable, region_features=model_cfg.region_features,
                        roi_size=model_cfg.roi_size, crop_size=model_cfg.crop_size)
