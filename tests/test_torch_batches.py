"""dvsa.ingest.torch_batches: normalisation with known values, and what the train and eval
iterators ask of a Ray Data iterator (seeded shuffle per epoch, order kept for evaluation)."""

from __future__ import annotations

import numpy as np
import torch

from dvsa.ingest.dataset import mix_seed
from dvsa.ingest.row_shuffle import shuffled_batches
from dvsa.ingest.torch_batches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    iter_eval_batches,
    iter_train_batches,
    normalize_images,
    to_model_inputs,
)


class _Shard:
    """Stands for ``ray.train.get_dataset_shard``: records the call, yields two numpy batches."""

    def __init__(self):
        self.kwargs = None
        self.batches = [{"x": np.arange(3), "images": np.zeros((3, 3, 2, 2), np.uint8)},
                        {"x": np.arange(3, 5), "images": np.ones((2, 3, 2, 2), np.uint8)}]

    def iter_batches(self, **kwargs):
        self.kwargs = kwargs
        yield from self.batches


def test_normalize_images_is_imagenet_standardisation():
    img = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    out = normalize_images(img)
    want = [(0.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
            (0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    assert out.dtype == torch.float32 and out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(want), atol=1e-6)
    assert img.dtype == torch.uint8 and int(img[0, 1, 0, 0]) == 255     # the input is left as it was
    batch = {"images": img, "tokens": torch.ones(1, 4, dtype=torch.long)}
    converted = to_model_inputs(batch)
    assert torch.equal(converted["images"], out) and converted["tokens"] is batch["tokens"]


def test_train_batches_shuffle_with_the_epochs_seed():
    """Training takes whole blocks and draws its batches through dvsa's row shuffle buffer
    (dvsa.ingest.row_shuffle), seeded by (seed, epoch)."""
    shard = _Shard()
    batches = list(iter_train_batches(shard, 3, "cpu", prefetch_batches=4, epoch=2, seed=7, shuffle_buffer=64,
                                      drop_last=True))
    assert shard.kwargs == {"batch_format": "numpy", "batch_size": None, "prefetch_batches": 4}
    want = list(shuffled_batches(iter(_Shard().batches), 64, 3, mix_seed(7, 2), drop_last=True))
    assert len(batches) == len(want) == 1                  # 5 rows: one batch of 3, the short one dropped
    x = batches[0]["x"].tolist()
    assert x == want[0]["x"].tolist() and len(set(x)) == 3 and set(x) <= set(range(5))
    assert [int(batches[0]["images"][i].max()) for i in range(3)] == [int(v >= 3) for v in x]   # whole rows
    draws = {tuple(next(iter(iter_train_batches(_Shard(), 5, "cpu", epoch=e, seed=7, shuffle_buffer=64)))["x"].tolist())
             for e in range(8)}
    assert len(draws) > 1 and all(sorted(d) == list(range(5)) for d in draws)   # each epoch its own order
    assert mix_seed(7, 2) != mix_seed(7, 3)


def test_cpu_batches_are_tensors_over_the_numpy_batches_memory():
    """On the CPU the numpy batches become tensors without a copy (torch.from_numpy), with
    their dtypes (dvsa.ingest.torch_batches: cheaper per batch than iter_torch_batches)."""
    shard = _Shard()
    batches = list(iter_train_batches(shard, 3, "cpu", shuffle_buffer=0))
    for got, src in zip(batches, shard.batches):
        assert set(got) == set(src)
        for k, t in got.items():
            assert isinstance(t, torch.Tensor) and t.dtype == torch.from_numpy(src[k]).dtype
            assert t.data_ptr() == src[k].ctypes.data          # the same memory
            assert np.array_equal(t.numpy(), src[k])


def test_eval_batches_keep_order_and_every_row():
    shard = _Shard()
    list(iter_eval_batches(shard, 5, "cpu", prefetch_batches=1))
    assert shard.kwargs == {"batch_format": "numpy", "batch_size": 5, "prefetch_batches": 1, "drop_last": False}
