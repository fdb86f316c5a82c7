"""On a train worker: Ray Data batches -> dicts of torch tensors on the worker's device.

``dataset_shard`` is what ``ray.train.get_dataset_shard(name)`` returns (a DataIterator) or a
Dataset. On CUDA the host tensors are pinned and copied with ``non_blocking=True``; on the CPU
they are used as they are. Images stay uint8 until :func:`normalize_images` runs on the device
(4x less to copy than float32). With ``jpeg_size`` (``data.jpeg_decoder=gpu``) the batches
carry JPEG bytes (``jpeg``) instead of ``images``: they are decoded and resized on the device
(:func:`dvsa.ingest.decode.decode_jpeg_batch`), after the other columns' copy is queued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

from dvsa.ingest.dataset import mix_seed
from dvsa.ingest.row_shuffle import shuffled_batches

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


def _tensors(batch: dict, pin: bool) -> dict:
    """A numpy batch -> torch tensors sharing its memory (pinned copies when ``pin``); a ``jpeg``
    bytes column -> a list of bytes."""
    import warnings

    import torch

    def tensor(v):
        t = torch.from_numpy(v)
        return t.pin_memory() if pin else t

    with warnings.catch_warnings():   # Arrow-backed arrays are read-only; the loop never writes to them
        warnings.simplefilter("ignore", UserWarning)
        return {k: list(v) if k == "jpeg" else tensor(v) for k, v in batch.items()}


def _iterate(dataset_shard, batch_size: int, device, prefetch_batches: int, drop_last: bool,
             shuffle_buffer: Optional[int], shuffle_seed: Optional[int], jpeg_size: int) -> Iterator[dict]:
    import torch

    from dvsa.ingest.decode import decode_jpeg_batch

    device = torch.device(device)
    cuda = device.type == "cuda"
    # numpy batches made tensors here (torch.from_numpy: no copy), not iter_torch_batches, whose
    # per-batch, per-column conversion (a thread pool's map) costs the consuming process ~0.5 ms
    # a batch more (docs/ingest.md, "Consumer"), and which cannot carry the ``jpeg`` bytes column
    if shuffle_buffer:
        # whole blocks, shuffled by dvsa's buffer (one copy per row; Ray Data's local shuffle
        # buffer copies each row several times: dvsa.ingest.row_shuffle)
        blocks = dataset_shard.iter_batches(batch_size=None, batch_format="numpy",
                                            prefetch_batches=prefetch_batches)
        numpy_batches = shuffled_batches(blocks, shuffle_buffer, batch_size, shuffle_seed, drop_last)
    else:
        numpy_batches = dataset_shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                                   prefetch_batches=prefetch_batches, drop_last=drop_last)
    for numpy_batch in numpy_batches:
        batch = _tensors(numpy_batch, cuda)
        jpegs = batch.pop("jpeg", None)
        batch = _to_device(batch, device)
        if jpegs is not None:
            batch["images"] = decode_jpeg_batch(jpegs, jpeg_size, device)
        yield batch


def iter_train_batches(dataset_shard, batch_size: int, device="cpu", prefetch_batches: int = 2,
                       epoch: int = 0, seed: int = 0, *, shuffle_buffer: int = 256,
                       drop_last: bool = False, jpeg_size: int = 0) -> Iterator[dict]:
    """Training batches: rows drawn through a local shuffle buffer of ``shuffle_buffer`` rows
    seeded by ``(seed, epoch)`` (0 turns it off), prefetched, on ``device``; ``jpeg_size`` > 0:
    the rows carry JPEG bytes, decoded on ``device`` to that size."""
    return _iterate(dataset_shard, batch_size, device, prefetch_batches, drop_last,
                    shuffle_buffer, mix_seed(seed, epoch), jpeg_size)


def iter_eval_batches(dataset_shard, batch_size: int, device="cpu", prefetch_batches: int = 2, *,
                      jpeg_size: int = 0) -> Iterator[dict]:
    """Validation/test batches: in order, every row (no shuffle, last partial batch kept)."""
    return _iterate(dataset_shard, batch_size, device, prefetch_batches, False, None, None, jpeg_size)


def device_decode_size(cfg) -> int:
    """``jpeg_size`` for the iterators: ``data.image_size`` when ``data.jpeg_decoder=gpu`` (and
    the rows are not precomputed features), else 0 (the rows carry decoded images)."""
    return cfg.data.image_size if cfg.data.jpeg_decoder == "gpu" and not cfg.data.features else 0
