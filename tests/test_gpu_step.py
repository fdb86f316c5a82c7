"""The GPU step switches (``train.channels_last``, ``train.compile``, ``train.optimizer_impl``,
``train.cudnn_benchmark``, ``train.static_shapes``, ``train.lr_scale_batch``), checked on the
CPU: each gives the plain path's losses, and the train loop reads nothing back from the device
per step (with ``train.static_shapes``, neither does the model's step)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dvsa.config import Config, ConfigError
from dvsa.models.build import FeatureCaptioningModel, build_model
from dvsa.models.encoder import boxes_from_padded
from dvsa.models.optim import build_optimizer, optimizer_kernels, update
from dvsa.text import Vocab
from dvsa.train import common
from dvsa.train.align import align_batch_loss
from dvsa.train.caption import caption_batch_loss
from dvsa.train.loop import Objective, Progress, _EpochStats, _train_epoch, _Trainee

WORDS = ["red", "car", "tree", "man", "sign", "dog"]


def _cfg(**kw) -> Config:
    base = {"task": "caption", "caption.mode": "region", "model.backbone": "tiny", "model.roi_size": 2,
            "model.hidden_dim": 16, "model.word_dim": 8, "data.image_size": 32, "train.optimizer": "adam",
            "train.lr": 0.01}
    return Config().replace(**{**base, **kw})


def _vocab() -> Vocab:
    from collections import Counter

    return Vocab.build(Counter(WORDS), 1, len(WORDS))


def _batch(b: int, r: int = 3, t: int = 5, seed: int = 0) -> dict:
    """An ingest-shaped region-captioner batch: uint8 images, padded boxes, inputs/targets."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, r, generator=g) < 0.7
    mask[:, 0] = True
    xy = torch.randint(0, 16, (b, r, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 12], dim=-1) * mask[..., None]
    targets = torch.randint(3, 3 + len(WORDS), (b, r, t), generator=g)
    targets[..., -1] = 0                                                     # some padding
    return {"images": torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g),
            "boxes": boxes, "box_mask": mask, "inputs": targets.roll(1, -1).clamp(min=1), "targets": targets}


def _align_batch(b: int, m: int = 4, t: int = 5, seed: int = 0) -> dict:
    """An ingest-shaped alignment batch: the whole image first, then 0..m-1 boxes per image."""
    g = torch.Generator().manual_seed(seed)
    batch = _batch(b, m, t, seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    tokens = torch.randint(3, 3 + len(WORDS), (b, t), generator=g)
    tokens = tokens * (torch.arange(t)[None, :] < lengths[:, None])
    batch["boxes"][:, 0] = torch.tensor([0.0, 0.0, 32.0, 32.0])
    return {"images": batch["images"], "boxes": batch["boxes"], "box_mask": batch["box_mask"],
            "tokens": tokens, "lengths": lengths}


def _step_loss(cfg: Config):
    return align_batch_loss if cfg.task == "align" else caption_batch_loss


def _losses(cfg: Config, steps: int = 3) -> list[float]:
    """Losses of ``steps`` train steps of the tiny region captioner, or the alignment model
    (same seed, same batches)."""
    common.seed_everything(0)
    model = build_model(cfg, _vocab())
    common.apply_step_switches(model, cfg.train)
    model.train()
    opt = build_optimizer(model.parameters(), cfg.train, lr=common.scaled_lr(cfg))
    out = []
    for i in range(steps):
        batch = _align_batch(4, seed=i) if cfg.task == "align" else _batch(4, seed=i)
        loss = _step_loss(cfg)(model, batch, cfg)
        update(opt, loss, list(model.parameters()), cfg.train)
        out.append(float(loss.detach()))
    return out


# --------------------------------------------------------------------------- each switch = plain path


def test_channels_last_gives_the_plain_losses():
    plain = _losses(_cfg())
    nhwc = _losses(_cfg(**{"train.channels_last": True}))
    assert nhwc == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_channels_last_puts_the_cnn_weights_in_nhwc():
    cfg = _cfg(**{"train.channels_last": True})
    model = common.apply_step_switches(build_model(cfg, _vocab()), cfg.train)
    conv = model.encoder.trunk.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.mark.parametrize("mode", ["cnn", "model"])
def test_torch_compile_gives_the_plain_losses(mode):
    """torch.compile works on this CPU (inductor + the C++ compiler, seconds for the tiny CNN)."""
    plain = _losses(_cfg(), steps=2)
    compiled = _losses(_cfg(**{"train.compile": mode}), steps=2)
    assert compiled == pytest.approx(plain, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("task", ["caption", "fullframe", "align", "align_geometry"])
def test_static_shapes_gives_the_plain_losses(task):
    """Every padded slot computed and masked out: the same losses, step after step (the batches
    have empty slots between occupied ones, and images with one region)."""
    kw = {"caption": {}, "fullframe": {"caption.mode": "fullframe"}, "align": {"task": "align"},
          "align_geometry": {"task": "align", "model.box_geometry": True, "align.score": "eq7"}}[task]
    plain = _losses(_cfg(**kw), steps=3)
    static = _losses(_cfg(**kw, **{"train.static_shapes": True}), steps=3)
    assert static == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_static_shapes_feature_captioner_gives_the_plain_loss():
    cfg = _cfg(**{"data.features": "unused-here"})
    common.seed_everything(0)
    full = build_model(_cfg(), _vocab())
    model = FeatureCaptioningModel(full.captioner)
    batch = _batch(5, r=4)
    batch = {"feats": torch.randn(5, 4, full.encoder.feat_dim) * batch["box_mask"][..., None], **batch}
    del batch["images"], batch["boxes"]
    plain = caption_batch_loss(model, batch, cfg)
    static = caption_batch_loss(model, batch, cfg.replace(**{"train.static_shapes": True}))
    assert float(static) == pytest.approx(float(plain), rel=1e-5)


def test_every_slot_features_are_the_listed_boxes_features_where_occupied():
    model = build_model(_cfg(), _vocab()).eval()
    batch = _batch(3, r=4)
    images = batch["images"].float() / 255
    every = model.encoder.every_slot(images, batch["boxes"])                  # [3, 4, D]
    listed = model.encoder(images, boxes_from_padded(batch["boxes"], batch["box_mask"]))
    torch.testing.assert_close(every[batch["box_mask"]], listed)
    assert every.shape[:2] == batch["box_mask"].shape


def test_static_shapes_needs_roi_align():
    with pytest.raises(ConfigError, match="train.static_shapes: needs model.region_features=roi_align"):
        _cfg(**{"train.static_shapes": True, "model.region_features": "crop"})


def test_compile_keeps_parameter_names_so_checkpoints_load():
    cfg = _cfg(**{"train.compile": "cnn"})
    plain = build_model(cfg, _vocab())
    compiled = common.apply_step_switches(build_model(cfg, _vocab()), cfg.train)
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_fused_and_foreach_optimizers_give_the_for_loop_losses(optimizer, impl):
    reference = _losses(_cfg(**{"train.optimizer": optimizer, "train.optimizer_impl": "for_loop"}), steps=4)
    got = _losses(_cfg(**{"train.optimizer": optimizer, "train.optimizer_impl": impl}), steps=4)
    assert got == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_auto_optimizer_kernels_are_fused_on_cuda_and_foreach_on_the_cpu():
    assert optimizer_kernels("auto", "adam", "cuda") == {"fused": True}
    assert optimizer_kernels("auto", "sgd", "cuda") == {"fused": True}
    assert optimizer_kernels("auto", "rmsprop", "cuda") == {"foreach": True}   # torch has no fused RMSprop
    assert optimizer_kernels("auto", "adam", "cpu") == {"foreach": True}
    assert optimizer_kernels("for_loop", "adam", "cuda") == {"foreach": False}
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), _cfg().train)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    with pytest.raises(ConfigError, match="train.optimizer_impl: 'fused' kernels exist for adam and sgd"):
        _cfg(**{"train.optimizer": "rmsprop", "train.optimizer_impl": "fused"})


def test_cudnn_benchmark_is_set_from_the_config():
    before = torch.backends.cudnn.benchmark
    try:
        common.configure_backends(_cfg(**{"train.cudnn_benchmark": True}).train)
        assert torch.backends.cudnn.benchmark is True
        common.configure_backends(_cfg().train)
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_linear_lr_scaling_rule():
    assert common.scaled_lr(_cfg(**{"train.lr": 1e-4, "data.batch_size": 128})) == 1e-4   # off by default
    cfg = _cfg(**{"train.lr": 1e-4, "train.lr_scale_batch": 100, "data.batch_size": 200, "train.num_workers": 4})
    assert common.scaled_lr(cfg) == pytest.approx(8e-4)             # global batch 800 = 8 x 100
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg.train, lr=common.scaled_lr(cfg))
    assert opt.param_groups[0]["lr"] == pytest.approx(8e-4)
    with pytest.raises(ConfigError, match="train.lr_scale_batch: must be >= 0"):
        _cfg(**{"train.lr_scale_batch": -1})


# --------------------------------------------------------------------------- host reads per step


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to Python (on CUDA each one waits for
    the GPU): ``item``, ``tolist``, ``float``/``int``/``bool`` of a tensor, ``nonzero``, and
    indexing with a boolean mask (its result's size depends on the values)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__bool__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS or (func is torch.Tensor.__getitem__ and _bool_index(args[1])):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class _Shard:
    """Stands for a dataset shard: its batches as Ray Data's numpy batches."""

    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, **_kwargs):
        return ({k: v.numpy() for k, v in b.items()} for b in self.batches)


def test_the_loop_reads_the_loss_once_per_log_window_not_per_step():
    # batches of 8 rows, drawn through the training shuffle buffer as 10 batches of 8
    cfg = Config().replace(**{"train.log_every": 5, "train.optimizer": "sgd", "train.max_steps": 0,
                              "data.batch_size": 8})
    model = torch.nn.Linear(4, 1)
    opt = build_optimizer(model.parameters(), cfg.train)
    trainee = _Trainee(model, model, opt, common.build_scheduler(opt, cfg.train, 10))
    batches = [{"x": torch.randn(8, 4), "y": torch.randn(8, 1), "box_mask": torch.ones(8, 1, dtype=torch.bool)}
               for _ in range(10)]

    def loss(m, batch, _cfg):
        return ((m(batch["x"]) - batch["y"]) ** 2).mean()

    objective = Objective("mse", loss, lambda v: ({}, []))
    with HostReads() as reads:
        stats: _EpochStats = _train_epoch(objective, trainee, cfg, _Shard(batches), torch.device("cpu"), False,
                                          None, Progress(None, 0))
    assert stats.steps == 10 and trainee.step == 10
    assert reads.count == 2                                  # steps 5 and 10: one read per log window


def test_the_region_captioner_loss_reads_back_the_same_few_values_at_any_batch_size():
    cfg = _cfg()
    model = build_model(cfg, _vocab()).train()
    counts = []
    for b in (2, 8):
        with HostReads() as reads:
            caption_batch_loss(model, _batch(b), cfg).backward()
        counts.append(reads.count)
    # the masked-in rows (boxes, inputs, targets) and the boxes per image: not one read per image
    assert counts[0] == counts[1] <= 4


@pytest.mark.parametrize("task", ["caption", "align"])
def test_a_static_shapes_step_reads_nothing_back(task):
    """With train.static_shapes the step (forward, loss, backward) has no host read at all; the
    plain path selects the occupied rows (the control: the counter sees those reads)."""
    kw = {"task": "align"} if task == "align" else {}
    counts = {}
    for static in (False, True):
        cfg = _cfg(**kw, **{"train.static_shapes": static})
        model = build_model(cfg, _vocab()).train()
        batch = _align_batch(6) if task == "align" else _batch(6)
        with HostReads() as reads:
            _step_loss(cfg)(model, batch, cfg).backward()
        counts[static] = reads.count
    assert counts[False] > 0 and counts[True] == 0, counts


def test_boxes_from_padded_splits_the_masked_rows_image_by_image():
    boxes = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    got = boxes_from_padded(boxes, mask)
    assert [g.tolist() for g in got] == [[boxes[0, 0].tolist(), boxes[0, 2].tolist()], [boxes[1, 2].tolist()]]


# --------------------------------------------------------------------------- the prepared GPU script


def test_gpu_step_script_runs_every_stage_on_the_cpu_in_smoke_mode(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "gpu_step.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(out.read_text())
    assert all(res[s]["ok"] for s in ("environment", "shards", "steps", "largest_batch", "align", "feeding",
                                      "compile"))
    arms = res["steps"]["arms"]
    for name in ("plain", "channels_last", "cudnn_benchmark", "foreach_adam", "fused_adam", "static_shapes",
                 "eager_all"):
        assert arms[name]["images_per_s"] > 0, name
    # the same batches and seed: every eager switch starts from the plain path's loss
    firsts = [arms[n]["loss_first"] for n in ("channels_last", "fused_adam", "static_shapes", "eager_all")]
    assert firsts == pytest.approx([arms["plain"]["loss_first"]] * 4, abs=2e-4)   # rounded to 4 places
    assert "compile" in res["compile"]["skipped"]                       # GPU only in the smoke run
    assert res["largest_batch"]["batches"]["8"]["lr"] == pytest.approx(2 * arms["plain"]["lr"])   # linear rule
    feeding = res["feeding"]["arms"]
    assert feeding["gpu_decode_only"]["images"] == feeding["cpu_decode_only"]["images"] > 0
    assert feeding["gpu_decode_step"]["loss_first"] == pytest.approx(feeding["cpu_decode_step"]["loss_first"],
                                                                     abs=0.05)
