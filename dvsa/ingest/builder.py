"""The ``map_batches`` callable: raw shard members -> fixed-shape numpy columns.

Input columns (``read_webdataset(decoder=None)``): ``jpg`` (or ``npy`` for feature shards) and
``json`` as raw bytes, plus ``__key__``. Output columns (docs/architecture.md):

- caption: ``images uint8[B,3,S,S]``, ``boxes float32[B,R,4]``, ``box_mask bool[B,R]``,
  ``inputs int64[B,R,T]``, ``targets int64[B,R,T]``, ``image_id int64[B]``;
- align: ``images``, ``boxes float32[B,M,4]``, ``box_mask bool[B,M]``, ``tokens int64[B,T]``,
  ``lengths int64[B]``, ``image_id int64[B]``;
- feature shards: ``feats float32[B,R|M,D]`` in place of ``images``;
- ``data.jpeg_decoder=gpu``: ``jpeg`` (an object column of the stored JPEG bytes, checked and
  sized from the header only) in place of ``images``: the train worker decodes the batch.

Seeded draws (which regions, which sentence) are seeded by ``(seed, epoch + pass, key)``
(:class:`dvsa.ingest.samples.SampleDraws`), where ``pass`` is Ray Data's execution index of the
dataset, so one Dataset object iterated once per epoch draws differently every epoch yet
reproducibly.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from dvsa.data.shards import BAD_JSON, RawSample, parse_row
from dvsa.ingest.counter import SkipCounter
from dvsa.ingest.decode import CorruptImage, decode_resize, jpeg_size, scale_boxes
from dvsa.ingest.samples import (
    BAD_FIELDS,
    ERROR_COLUMN,
    LOST_COLUMN,
    TRUNCATED_SHARD,
    RowLayout,
    SampleDraws,
    Selection,
    Skip,
    box_of,
    check_boxes,
    encode_captions,
    encode_words,
    feature_row,
    select,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSpec:
    layout: RowLayout
    image_size: int
    rows: int                 # R (caption) or M (align) boxes per row
    max_len: int              # data.max_len (START/END included)
    seed: int = 0
    epoch: int = 0
    randomize: bool = True    # seeded random draws (training); first ones otherwise
    decoder: str = "pil"
    features: bool = False    # rows come from feature shards (KEY.npy) instead of JPEGs
    feat_dim: int = 0         # feature mode: D
    whole_image: bool = True  # align: the whole image is a candidate box (align.whole_image)

    @property
    def token_len(self) -> int:
        """T of the token columns: max_len - 1 for caption inputs/targets, max_len words for align."""
        return self.max_len if self.layout == "align" else self.max_len - 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one output row (every column), to size Ray Data blocks in rows (the ``gpu``
        decoder's JPEG bytes are counted as the decoded image: a stored JPEG is of that order)."""
        n, t = self.rows, self.token_len
        payload = n * self.feat_dim * 4 if self.features else 3 * self.image_size ** 2
        tokens = (t + 1) * 8 if self.layout == "align" else 2 * n * t * 8
        return payload + n * 4 * 4 + n + tokens + 8


def _pass_index() -> int:
    """How many times Ray Data has executed this dataset before (0 on the first epoch)."""
    try:
        from ray.data.context import DataContext

        return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)
    except Exception:  # outside Ray Data (unit use): a fixed pass
        return 0


def _image_id(meta: dict, key: str) -> int:
    """The sample's integer image id (a non-integer id is mapped to crc32 of its text)."""
    value = meta.get("image_id", key)
    try:
        return int(value)
    except (TypeError, ValueError):
        return zlib.crc32(str(value).encode())


class BatchBuilder:
    """``map_batches`` callable (a task function via ``__call__`` or an actor-pool class)."""

    def __init__(self, spec: IngestSpec, vocab, counter: Optional[SkipCounter] = None):
        self.spec = spec
        self.vocab = vocab
        self.counter = counter

    # ----------------------------------------------------------------- per batch
    def __call__(self, batch: dict) -> dict:
        spec = self.spec
        urls = batch.get("__url__")
        payload = "npy" if spec.features else "jpg"
        rows, skipped, examples = [], Counter(), {}
        pass_idx = _pass_index() if spec.randomize else 0
        errors, lost = batch.get(ERROR_COLUMN), batch.get(LOST_COLUMN)
        n = len(batch["__key__"])
        # decoded images go straight into the batch's array (row k for the k-th kept sample; a
        # skipped sample's row is overwritten by the next one): no np.stack copy of the images
        images = (np.empty((n, 3, spec.image_size, spec.image_size), np.uint8)
                  if n and not spec.features and spec.decoder != "gpu" else None)
        for i in range(n):
            if errors is not None and isinstance(errors[i], str):     # a broken shard's marker row
                where = str(urls[i]) if urls is not None else "a shard"
                n_lost = int(lost[i]) if lost is not None else 1
                skipped[TRUNCATED_SHARD] += n_lost
                examples.setdefault(TRUNCATED_SHARD, f"{where}: {errors[i]}")
                log.warning("ingest: shard %s is broken: %s; %d sample(s) not read", where, errors[i], n_lost)
                continue
            sample = parse_row(batch, i, payload)
            try:
                rows.append(self._checked_row(sample, pass_idx, None if images is None else images[len(rows)]))
            except Skip as s:
                skipped[s.reason] += 1
                where = f"{sample.key} ({urls[i]})" if urls is not None else sample.key
                examples.setdefault(s.reason, f"{where}: {s}")
                log.warning("ingest: skipped sample %s: %s", where, s)
        if skipped and self.counter is not None:
            self.counter.add(skipped, examples)
        return self._stack(rows, None if images is None else images[:len(rows)])

    # ----------------------------------------------------------------- per sample
    def _checked_row(self, sample: RawSample, pass_idx: int, image_out: Optional[np.ndarray] = None) -> dict:
        """:meth:`_row`, with a json whose fields have the wrong types or are missing (a
        hand-edited or foreign shard) skipped as :data:`BAD_FIELDS` instead of failing the task."""
        try:
            return self._row(sample, pass_idx, image_out)
        except Skip:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise Skip(BAD_FIELDS, f"{type(e).__name__}: {e}") from None

    def _row(self, sample: RawSample, pass_idx: int, image_out: Optional[np.ndarray] = None) -> dict:
        """One sample's arrays; ``image_out``: where the decoded image goes (a row of the batch)."""
        spec = self.spec
        key, payload, meta = sample.key, sample.data, sample.meta
        if not payload:
            raise Skip("missing_features" if spec.features else "missing_image", "no member in the shard")
        if meta is None:
            raise Skip(BAD_JSON, sample.error)
        check_boxes(meta)
        draws = SampleDraws(spec.seed, spec.epoch + pass_idx, key) if spec.randomize else None
        sel = select(spec.layout, meta, spec.rows, draws, whole_image=spec.whole_image)
        row: dict = {"image_id": _image_id(meta, key)}
        if spec.features:
            feats = _load_npy(payload)
            width, height = int(meta["width"]), int(meta["height"])
            picked = np.zeros((spec.rows, spec.feat_dim), dtype=np.float32)
            for r, (kind, idx) in enumerate(sel.boxes):
                fr = feature_row(meta, kind, idx)
                if fr >= feats.shape[0] or feats.shape[1] != spec.feat_dim:
                    raise Skip("bad_features", f"row {fr} of a {tuple(feats.shape)} feature matrix")
                picked[r] = feats[fr]
            row["feats"] = picked
        elif spec.decoder == "gpu":         # the train worker decodes: pass the bytes on
            try:
                width, height = jpeg_size(payload)
            except CorruptImage as e:
                raise Skip("corrupt_image", str(e)) from None
            row["jpeg"] = payload
        else:
            try:
                row["images"], (width, height) = self._decode(payload, image_out)
            except CorruptImage as e:
                raise Skip("corrupt_image", str(e)) from None
        row.update(self._boxes(meta, sel, width, height))
        row.update(self._tokens(sel))
        return row

    def _decode(self, jpg: bytes, out: Optional[np.ndarray]) -> tuple[np.ndarray, tuple[int, int]]:
        """``(uint8[3, S, S], (width, height))`` of one JPEG with the spec's decoder
        (:func:`dvsa.ingest.decode.decode_resize`, into ``out`` when given)."""
        return decode_resize(jpg, self.spec.image_size, self.spec.decoder, out=out)

    def _boxes(self, meta: dict, sel: Selection, width: int, height: int) -> dict:
        spec = self.spec
        boxes = np.zeros((spec.rows, 4), dtype=np.float32)
        mask = np.zeros(spec.rows, dtype=bool)
        raw = [box_of(meta, kind, idx, width, height) for kind, idx in sel.boxes]
        if raw:
            boxes[: len(raw)] = scale_boxes(raw, width, height, spec.image_size)
            mask[: len(raw)] = True
        return {"boxes": boxes, "box_mask": mask}

    def _tokens(self, sel: Selection) -> dict:
        spec = self.spec
        if spec.layout == "align":
            tokens, length = encode_words(self.vocab, sel.captions[0], spec.token_len)
            return {"tokens": tokens, "lengths": np.int64(length)}
        inputs, targets = encode_captions(self.vocab, sel.captions, spec.rows, spec.max_len)
        return {"inputs": inputs, "targets": targets}

    # ----------------------------------------------------------------- stacking
    def _stack(self, rows: list[dict], images: Optional[np.ndarray] = None) -> dict:
        """The rows as columns; ``images``: the batch's image array the rows were decoded into."""
        if not rows:
            return self.empty()
        columns = {}
        for k in rows[0]:
            if k == "images" and images is not None:
                columns[k] = images                  # decoded in place: no stacking copy
            elif k == "jpeg":
                columns[k] = _bytes_column([r[k] for r in rows])
            else:
                columns[k] = np.stack([r[k] for r in rows])
        return columns

    def empty(self) -> dict:
        """The output columns with zero rows (every sample of the batch was skipped)."""
        spec = self.spec
        s, n, t = spec.image_size, spec.rows, spec.token_len
        out = {"image_id": np.zeros(0, np.int64)}
        if spec.features:
            out["feats"] = np.zeros((0, n, spec.feat_dim), np.float32)
        elif spec.decoder == "gpu":
            out["jpeg"] = _bytes_column([])
        else:
            out["images"] = np.zeros((0, 3, s, s), np.uint8)
        out["boxes"] = np.zeros((0, n, 4), np.float32)
        out["box_mask"] = np.zeros((0, n), bool)
        if spec.layout == "align":
            out["tokens"] = np.zeros((0, t), np.int64)
            out["lengths"] = np.zeros(0, np.int64)
        else:
            out["inputs"] = np.zeros((0, n, t), np.int64)
            out["targets"] = np.zeros((0, n, t), np.int64)
        return out


class ChunkedBatchBuilder(BatchBuilder):
    """The ``map_batches`` callable of :func:`dvsa.ingest.build_dataset`: takes a whole read
    block (up to 512 samples of a shard, read in the same task when Read and MapBatches fuse)
    and yields it as
    output batches of at most ``chunk`` rows, each built as soon as its rows are decoded, so
    that Ray Data can hand every chunk on as its own block (the dataset's
    ``target_max_block_size`` is set just under one chunk) instead of holding the whole
    shard. Skips are counted per chunk, as in :class:`BatchBuilder`."""

    def __init__(self, spec: IngestSpec, vocab, counter: Optional[SkipCounter] = None, chunk: int = 32):
        super().__init__(spec, vocab, counter)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)

    def __call__(self, batch: dict):
        yield from build_in_chunks([batch], super().__call__, self.empty, self.chunk)


def build_in_chunks(blocks: Iterable[dict], build: Callable[[dict], dict], empty: Callable[[], dict],
                    chunk: int) -> Iterator[dict]:
    """Raw sample blocks (column dicts, in read order) -> ``build``'s batches of ``chunk``
    samples each, in order: a block's rows left over after its last full chunk start the next
    block's first one; the last batch takes what is left. Batches whose samples were all
    skipped are dropped; if nothing is left, one ``empty()`` batch keeps the schema."""
    pending: list[dict] = []
    have, yielded = 0, False
    for block in blocks:
        n = len(block["__key__"])
        if not n:
            continue
        pending.append(block)
        have += n
        while have >= chunk:
            batch, pending = _take(pending, chunk)
            have -= chunk
            out = build(batch)
            if len(out["image_id"]):
                yielded = True
                yield out
    if have:
        out = build(_take(pending, have)[0])
        if len(out["image_id"]):
            yielded = True
            yield out
    if not yielded:
        yield empty()


def _take(pieces: list[dict], rows: int) -> tuple[dict, list[dict]]:
    """The first ``rows`` rows of a list of column dicts (columns missing from a piece are
    None there) and the rest. Object columns: only the references are copied."""
    taken, rest, need = [], [], rows
    for piece in pieces:
        n = len(piece["__key__"])
        if need >= n:
            taken.append(piece)
            need -= n
        elif need > 0:
            taken.append({k: v[:need] for k, v in piece.items()})
            rest.append({k: v[need:] for k, v in piece.items()})
            need = 0
        else:
            rest.append(piece)
    if len(taken) == 1:
        return taken[0], rest
    batch = {}
    for k in dict.fromkeys(k for piece in taken for k in piece):
        parts = [piece[k] if k in piece else np.full(len(piece["__key__"]), None, dtype=object)
                 for piece in taken]
        if len({p.dtype for p in parts}) > 1:
            parts = [p.astype(object) for p in parts]
        batch[k] = np.concatenate(parts)
    return batch, rest


def _bytes_column(values: list) -> np.ndarray:
    """An object array of ``bytes`` (``np.stack`` would make a fixed-width ``S`` array, which
    drops trailing NUL bytes when read back)."""
    col = np.empty(len(values), dtype=object)
    col[:] = values
    return col


def _load_npy(data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise Skip("bad_features", f"unreadable .npy ({e})") from None
    if arr.ndim != 2:
        raise Skip("bad_features", f"feature matrix must be 2-D, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)

