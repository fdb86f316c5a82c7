"""Ray Data ingest: WebDataset shards -> fixed-shape numpy batches for the train loops.

``ShardDatasource`` (read_webdataset's raw rows, ``decoder=None``: Ray's default decoder would
pickle the json) whose read tasks decode their shards in chunks (task pool; an actor pool gets
``map_batches(ChunkedBatchBuilder)`` fused with the read). The builder decodes each JPEG at
reduced size, resizes it to ``data.image_size``, maps boxes into the resized frame, picks captions and encodes them with
the stored vocabulary -> fixed-shape columns (see docs/architecture.md, "Batches from ingest
to the train loops", and docs/ingest.md).

Modules: :mod:`.decode` (JPEG -> uint8 CHW, box scaling), :mod:`.samples` (one shard sample
-> the arrays of one row, per task), :mod:`.builder` (the ``map_batches`` callable),
:mod:`.counter` (skipped samples, counted by reason), :mod:`.dataset` (``build_dataset``),
:mod:`.torch_batches` (``iter_train_batches`` / ``iter_eval_batches`` on a train worker).
"""

from dvsa.ingest.counter import SkipCounter
from dvsa.ingest.dataset import build_dataset, caption_len, dataset_paths
from dvsa.ingest.decode import decode_resize, scale_boxes
from dvsa.ingest.torch_batches import (
                                       IMAGENET_MEAN,
                                       IMAGENET_STD,
                                       device_decode_size,
                                       iter_eval_batches,
                                       iter_train_batches,
                                       normalize_images,
                                       to_model_inputs,
)

__all__ = [
    "SkipCounter", "build_dataset", "caption_len", "dataset_paths", "decode_resize", "scale_boxes",
    "IMAGENET_MEAN", "IMAGENET_STD", "device_decode_size", "iter_eval_batches", "iter_train_batches",
    "normalize_images", "to_model_inputs",
]
