"""On a train worker: Ray Data batches -> dicts of torch tensors on the worker's device.

``dataset_shard`` is what ``ray.train.get_dataset_shard(name)`` returns (a DataIterator) or a
Dataset. On CUDA the host tensors are pinned and copied with ``non_blocking=True``; on the CPU
they are used as they are. Images stay uint8 until :func:`normalize_images` runs on the device
(4x less to copy than float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

from dvsa.ingest.dataset import mix_seed

if TYPE_CHECKING:  # torch is imported lazily: Ray Data decode workers never need it
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: "torch.Tensor") -> "torch.Tensor":
    """uint8 ``[B,3,S,S]`` -> float32 ``[B,3,S,S]``, ``(x/255 - mean) / std`` (ImageNet stats)."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def to_model_inputs(batch: dict) -> dict:
    """The batch with ``images`` normalised to float (other columns unchanged)."""
    out = dict(batch)
    if "images" in out:
        out["images"] = normalize_images(out["images"])
    return out


def _to_device(batch: dict, device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _iterate(dataset_shard, batch_size: int, device, prefetch_batches: int, drop_last: bool,
             shuffle_buffer: Optional[int], shuffle_seed: Optional[int]) -> Iterator[dict]:
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    it = dataset_shard.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=prefetch_batches, device="cpu",
        drop_last=drop_last, pin_memory=cuda,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed if shuffle_buffer else None,
    )
    for batch in it:
        yield _to_device(batch, device)


def iter_train_batches(dataset_shard, batch_size: int, device="cpu", prefetch_batches: int = 2,
                       epoch: int = 0, seed: int = 0, *, shuffle_buffer: int = 256,
                       drop_last: bool = False) -> Iterator[dict]:
    """Training batches: rows drawn through a local shuffle buffer of ``shuffle_buffer`` rows
    seeded by ``(seed, epoch)`` (0 turns it off), prefetched, on ``device``."""
    return _iterate(dataset_shard, batch_size, device, prefetch_batches, drop_last,
                    shuffle_buffer, mix_seed(seed, epoch))


def iter_eval_batches(dataset_shard, batch_size: int, device="cpu", prefetch_batches: int = 2) -> Iterator[dict]:
    """Validation/test batches: in order, every row (no shuffle, last partial batch kept)."""
    return _iterate(dataset_shard, batch_size, device, prefetch_batches, False, None, None)
