"""Image encoder: RoIAlign and per-crop region features, backbones, weights, freezing."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

from dvsa.config import Config
from dvsa.errors import DvsaError
from dvsa.models.encoder import ImageEncoder, boxes_from_padded, build_encoder, full_image_boxes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_roi_align_full_box_is_mean_of_feature_map():
    # 64 px, stride 8 -> an 8x8 map; 4x4 bins of 2x2 cells with 2 samples each land on cell
    # centres, so the pooled full-image box is exactly the map's mean.
    enc = ImageEncoder("tiny", roi_size=4).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = enc(images, full_image_boxes(images))
        expected = enc.trunk(images).mean(dim=(2, 3))
    assert feats.shape == (2, enc.feat_dim) == (2, 128)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


def test_crop_and_roi_align_agree_on_the_whole_image():
    enc = ImageEncoder("tiny", roi_size=4, crop_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = enc(images, full_image_boxes(images))
        enc.region_features = "crop"
        b = enc(images, full_image_boxes(images))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_crop_features_are_the_cnn_of_the_resized_crop():
    enc = ImageEncoder("tiny", region_features="crop", roi_size=2, crop_size=32).eval()
    images = torch.randn(2, 3, 48, 64)
    boxes = [torch.tensor([[8.0, 4.0, 40.0, 30.0], [0.0, 0.0, 64.0, 48.0]]), torch.tensor([[10.2, 5.7, 20.1, 47.9]])]
    with torch.no_grad():
        feats = enc(images, boxes)
        crop0 = TF.resized_crop(images[0], 4, 8, 26, 32, [32, 32], antialias=True)
        crop2 = TF.resized_crop(images[1], 5, 10, 43, 11, [32, 32], antialias=True)  # floor/ceil to pixels
        exp0 = enc.trunk(crop0[None]).mean(dim=(2, 3))           # the crop's global average pool
        exp2 = enc.trunk(crop2[None]).mean(dim=(2, 3))
    assert feats.shape == (3, 128)
    torch.testing.assert_close(feats[0], exp0[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[2], exp2[0], atol=1e-5, rtol=1e-5)


def test_rows_follow_images_and_boxes_and_empty_images_are_fine():
    enc = ImageEncoder("tiny", roi_size=2).eval()
    images = torch.randn(3, 3, 32, 32)
    boxes = [torch.tensor([[0.0, 0, 16, 16], [8, 8, 32, 32]]), torch.zeros(0, 4), torch.tensor([[0.0, 0, 32, 32]])]
    with torch.no_grad():
        all_feats = enc(images, boxes)
        alone = enc(images[2:], [boxes[2]])
    assert all_feats.shape == (3, 128)
    torch.testing.assert_close(all_feats[2], alone[0], atol=1e-5, rtol=1e-5)


def test_boxes_from_padded_keeps_masked_rows():
    boxes = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = boxes_from_padded(boxes, mask)
    assert torch.equal(out[0], boxes[0, [0, 2]]) and out[1].shape == (0, 4)


def test_bad_boxes_raise():
    enc = ImageEncoder("tiny")
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="2 images"):
        enc(images, [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        enc(images, [torch.zeros(1, 4), torch.zeros(3)])


def test_frozen_encoder_has_no_gradients_and_keeps_bn_in_eval():
    enc = ImageEncoder("tiny", trainable=False)
    enc.train()
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    images = torch.randn(2, 3, 32, 32)
    out = enc(images, full_image_boxes(images))
    assert not out.requires_grad
    trainable = ImageEncoder("tiny", trainable=True).train()
    assert trainable.training and trainable(images, full_image_boxes(images)).requires_grad


def test_weights_from_a_file(tmp_path):
    src = ImageEncoder("tiny")
    path = tmp_path / "tiny.pt"
    torch.save(src.trunk.state_dict(), path)
    enc = ImageEncoder("tiny", weights=str(path))
    for a, b in zip(src.trunk.state_dict().values(), enc.trunk.state_dict().values()):
        assert torch.equal(a, b)


def test_torchvision_weights_name_from_the_local_cache(tmp_path, monkeypatch):
    """A weights name is read from $TORCH_HOME/hub/checkpoints/<file of its URL>, whose name ends
    in the first hex digits of its sha256: a file whose digest does not match is refused, one
    that matches loads."""
    import hashlib
    from types import SimpleNamespace

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(DvsaError, match="not in the local torch cache"):
        ImageEncoder("resnet18", weights=name)
    ref = torchvision.models.resnet18(weights=None)
    url = torchvision.models.get_weight(name).url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / os.path.basename(url))        # resnet18-f37072fd.pth, other bytes
    with pytest.raises(DvsaError, match=r"resnet18-f37072fd.pth is damaged or not the published file \(its "
                                        r"sha256 starts [0-9a-f]{8}, its name says f37072fd\); delete it and "
                                        r"download https://download.pytorch.org/models/resnet18-f37072fd.pth again"):
        ImageEncoder("resnet18", weights=name)
    # the same bytes under a name that carries their own sha256 prefix: accepted and loaded
    data = (cache / os.path.basename(url)).read_bytes()
    ours = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (cache / ours).write_bytes(data)
    monkeypatch.setattr(torchvision.models, "get_weight",
                        lambda n: SimpleNamespace(url=f"https://download.pytorch.org/models/{ours}"))
    enc = ImageEncoder("resnet18", weights=name)
    assert torch.equal(enc.trunk[0].weight, ref.conv1.weight)
    assert torch.equal(enc.trunk[7][1].conv2.weight, ref.layer4[1].conv2.weight)


def test_unknown_weights_and_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(DvsaError, match="neither an existing file nor a torchvision weights name"):
        ImageEncoder("resnet18", weights="no_such_weights")
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(DvsaError, match="does not fit resnet18"):
        ImageEncoder("resnet18", weights=str(bad))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DvsaError, match="cannot read"):
        ImageEncoder("tiny", weights=str(garbage))


def test_random_init_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="dvsa.models.encoder"):
        ImageEncoder("resnet18")
    lines = [r.getMessage() for r in caplog.records if "randomly" in r.getMessage()]
    assert lines == ["model.backbone=resnet18: no model.weights given, initialising the CNN randomly"]


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16"])
def test_crop_feature_is_the_torchvision_models_penultimate_layer(backbone, tmp_path):
    """Eq. 1's CNN(I_b) at 224 px: ResNet's pooled features, VGG-16's fc7 after pool5 (a max
    pool): the same numbers as torchvision's own model with the same weights, saved without the
    1000-way classifier the encoder never uses (ResNet's fc, VGG-16's classifier.6)."""
    from dvsa.models.encoder import CLASSIFIER_KEYS

    torch.manual_seed(0)
    ref = getattr(torchvision.models, backbone)(weights=None).eval()
    path = tmp_path / f"{backbone}.pt"
    trunk = {k: v for k, v in ref.state_dict().items() if not k.startswith(CLASSIFIER_KEYS[backbone])}
    assert len(trunk) == len(ref.state_dict()) - 2
    torch.save(trunk, path)
    enc = ImageEncoder(backbone, weights=str(path), region_features="crop", crop_size=224).eval()
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = enc(image, [torch.tensor([[0.0, 0.0, 224.0, 224.0]])])
        if backbone == "vgg16":
            expected = ref.classifier[:-1](torch.flatten(ref.avgpool(ref.features(image)), 1))
        else:
            expected = torch.nn.Sequential(*list(ref.children())[:-1])(image).flatten(1)
    torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone,dim", [("resnet18", 512), ("resnet50", 2048), ("resnet101", 2048),
                                          ("vgg16", 4096)])
def test_torchvision_backbones_give_their_feature_size(backbone, dim):
    cfg = Config().replace(**{"model.backbone": backbone, "model.trainable": False})
    enc = build_encoder(cfg.model).eval()
    images = torch.randn(1, 3, 64, 64)
    boxes = [torch.tensor([[0.0, 0, 64, 64], [10, 10, 30, 50]])]
    with torch.no_grad():
        feats = enc(images, boxes)
    assert enc.feat_dim == dim and feats.shape == (2, dim) and torch.isfinite(feats).all()
