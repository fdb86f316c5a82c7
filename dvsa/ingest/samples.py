"""One shard sample (its json) -> what one batch row holds, per row layout.

A row is a list of *boxes*, each named by ``(kind, index)`` with kind ``"image"`` (the whole
image), ``"region"`` (``meta["regions"][index]``) or ``"proposal"`` (``meta["proposals"][index]``),
plus the token lists to encode. Boxes are later either scaled into the resized image frame
(image mode) or looked up as rows of a precomputed feature matrix (feature mode: row 0 is the
whole image, then every region, then every proposal; see :func:`feature_row`).

Tasks and their shapes (R rows of boxes, T token positions):

- ``caption_region``: up to ``caption.max_regions_per_image`` regions with a non-empty
  caption (a seeded random subset in training when there are more, else the first ones);
  ``inputs``/``targets`` ``[R, T]`` with ``T = data.max_len - 1`` (``[START, w...]`` and
  ``[w..., END]``, zero-padded).
- ``caption_fullframe``: R = 1, the whole image, one full-image sentence (drawn with the
  sample's seeded draws, :class:`SampleDraws`, in training, the first one otherwise).
- ``align``: the whole image first, then up to ``data.max_regions - 1`` detection proposals in
  stored order (the region boxes when a sample has no proposals); with
  ``align.whole_image=false`` up to ``data.max_regions`` proposals and no whole image (unless
  the sample has no other box); one sentence (drawn as
  above; VG samples, which have no full-image sentences, use a region caption) as word ids
  without START/END, ``T = data.max_len`` words at most.

A sample that cannot make a row raises :class:`Skip` with a reason that the caller counts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from dvsa.text import Vocab

# What one batch row holds: a region caption, a full-image caption, or an image-sentence pair.
RowLayout = Literal["caption_region", "caption_fullframe", "align"]
LAYOUTS = ("caption_region", "caption_fullframe", "align")


# Skip reasons of a sample whose json is readable but wrong (a hand-edited or foreign shard):
BAD_BOX = "bad_box"          # a region box or proposal that is not 4 finite numbers (NaN, "abc"...)
BAD_FIELDS = "bad_fields"    # a field missing or of the wrong type (e.g. "regions" not a list)
# ... and of a shard that breaks off (dvsa.ingest.shard_source): its marker row has the shard in
# __url__, what broke in ERROR_COLUMN and the samples not delivered in LOST_COLUMN
TRUNCATED_SHARD = "truncated_shard"
ERROR_COLUMN = "__error__"
LOST_COLUMN = "__lost__"


class Skip(Exception):
    """The sample cannot make a row of this layout; ``reason`` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Selection:
    boxes: list[tuple[str, int]]          # (kind, index) per row
    captions: list[Sequence[str]]          # token lists: one per box (caption) or one (align)


def _has_tokens(entry: dict) -> bool:
    toks = entry.get("tokens")
    return isinstance(toks, list) and len(toks) > 0


class SampleDraws:
    """The seeded random draws of one sample in one pass (which regions, which sentence),
    seeded by ``(seed, pass, key)`` alone: a sample draws the same in any task, process or
    chunk, and anew every pass. A ``random.Random`` seeded with that text (hashed with SHA-512,
    the same in every process): inside the decode loop it costs ~30 us a sample, where numpy's
    ``default_rng`` + ``choice`` cost ~100 us (7% of a decoded sample's CPU; docs/ingest.md)."""

    __slots__ = ("_random",)

    def __init__(self, seed: int, pass_: int, key: str):
        self._random = random.Random(f"{int(seed)}/{int(pass_)}/{key}")

    def subset(self, n: int, k: int) -> list[int]:
        """k distinct indices of range(n), in increasing order (0 < k <= n)."""
        return sorted(self._random.sample(range(n), k))

    def index(self, n: int) -> int:
        """One index of range(n) (n >= 1)."""
        return self._random.randrange(n)


def _pick(n: int, k: int, draws: Optional[SampleDraws]) -> list[int]:
    """k of range(n): a seeded random subset (kept in order) when ``draws`` is given, else the first k."""
    if n <= k:
        return list(range(n))
    if draws is None:
        return list(range(k))
    return draws.subset(n, k)


def _numbers(b) -> bool:
    """Four finite numbers (NaN boxes would reach roi_align, which does not survive them)."""
    return (isinstance(b, (list, tuple)) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b))


def _valid_box(b) -> bool:
    return _numbers(b) and b[2] > b[0] and b[3] > b[1]


def check_boxes(meta: dict) -> None:
    """Skip (:data:`BAD_BOX`) a sample any of whose region boxes is not a box ``[x1, y1, x2,
    y2]`` of finite numbers with x2 > x1 and y2 > y1, or any of whose proposals is not four
    finite numbers (``dvsa prepare`` writes neither; degenerate proposals are passed over as
    before). Naming the first bad one."""
    regions = meta.get("regions") or []
    if not isinstance(regions, list):
        raise Skip(BAD_FIELDS, f"regions is a {type(regions).__name__}, not a list")
    for i, r in enumerate(regions):
        box = r.get("box") if isinstance(r, dict) else None
        if not _valid_box(box):
            raise Skip(BAD_BOX, f"regions[{i}].box = {box!r}")
    proposals = meta.get("proposals") or []
    if not isinstance(proposals, list):
        raise Skip(BAD_FIELDS, f"proposals is a {type(proposals).__name__}, not a list")
    for i, b in enumerate(proposals):
        if not _numbers(b):
            raise Skip(BAD_BOX, f"proposals[{i}] = {b!r}")


def align_boxes(meta: dict, rows: int, whole_image: bool = True) -> list[tuple[str, int]]:
    """The alignment model's boxes for a sample, as ``(kind, index)``: the whole image, then up
    to ``rows - 1`` valid proposals (the region boxes when there are none); with
    ``whole_image=False`` up to ``rows`` of those and no whole image, unless there is none."""
    proposals = meta.get("proposals") or []
    if proposals:
        cands = [("proposal", i) for i, b in enumerate(proposals) if _valid_box(b)]
    else:
        cands = [("region", i) for i, r in enumerate(meta.get("regions") or []) if _valid_box(r.get("box"))]
    if not whole_image and cands:
        return cands[:rows]
    return [("image", 0)] + cands[: rows - 1]


def select(layout: RowLayout, meta: dict, rows: int, draws: Optional[SampleDraws],
           whole_image: bool = True) -> Selection:
    """The boxes and captions of one row; raises Skip when the sample has nothing usable.
    ``draws``: the sample's seeded draws (training), or None for the first ones.

    ``whole_image`` (``align.whole_image``, align only): see :func:`align_boxes`."""
    regions = meta.get("regions") or []
    if layout == "caption_region":
        usable = [i for i, r in enumerate(regions) if _has_tokens(r)]
        if not usable:
            raise Skip("no_region_caption")
        chosen = [usable[j] for j in _pick(len(usable), rows, draws)]
        return Selection([("region", i) for i in chosen], [regions[i]["tokens"] for i in chosen])
    if layout == "caption_fullframe":
        sentences = [s for s in (meta.get("sentences") or []) if _has_tokens(s)]
        if not sentences:
            raise Skip("no_sentence")
        j = 0 if draws is None else draws.index(len(sentences))
        return Selection([("image", 0)], [sentences[j]["tokens"]])
    if layout == "align":
        pool = [s for s in (meta.get("sentences") or []) if _has_tokens(s)]
        if not pool:
            pool = [r for r in regions if _has_tokens(r)]
        if not pool:
            raise Skip("no_sentence")
        j = 0 if draws is None else draws.index(len(pool))
        return Selection(align_boxes(meta, rows, whole_image), [pool[j]["tokens"]])
    raise ValueError(f"unknown row layout {layout!r} (allowed: {', '.join(LAYOUTS)})")


def box_of(meta: dict, kind: str, index: int, width: int, height: int) -> list[float]:
    """The box ``[x1, y1, x2, y2]`` (pixels of the stored image) that ``(kind, index)`` names."""
    if kind == "image":
        return [0.0, 0.0, float(width), float(height)]
    if kind == "region":
        return list(meta["regions"][index]["box"])
    if kind == "proposal":
        return list(meta["proposals"][index])
    raise ValueError(f"unknown box kind {kind!r}")


def feature_row(meta: dict, kind: str, index: int) -> int:
    """Row of ``(kind, index)`` in a feature shard's matrix: image, regions..., proposals..."""
    if kind == "image":
        return 0
    if kind == "region":
        return 1 + index
    return 1 + len(meta.get("regions") or []) + index


def all_feature_boxes(meta: dict, width: int, height: int) -> list[list[float]]:
    """Every box a feature shard stores, in :func:`feature_row` order."""
    boxes = [[0.0, 0.0, float(width), float(height)]]
    boxes += [list(r["box"]) for r in meta.get("regions") or []]
    boxes += [list(b) for b in meta.get("proposals") or []]
    return boxes


def encode_captions(vocab: Vocab, captions: Sequence[Sequence[str]], rows: int, max_len: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``inputs, targets int64[rows, max_len - 1]``: ``[START, w...]`` and ``[w..., END]``, 0-padded."""
    t = max_len - 1
    inputs = np.zeros((rows, t), dtype=np.int64)
    targets = np.zeros((rows, t), dtype=np.int64)
    for r, toks in enumerate(captions[:rows]):
        seq = vocab.encode(list(toks), max_len)          # [START, w..., END], len <= max_len
        inputs[r, : len(seq) - 1] = seq[:-1]
        targets[r, : len(seq) - 1] = seq[1:]
    return inputs, targets


def encode_words(vocab: Vocab, tokens: Sequence[str], max_words: int) -> tuple[np.ndarray, int]:
    """``int64[max_words]`` word ids (no START/END; unknown -> UNK), 0-padded, and the length."""
    ids = vocab.encode(list(tokens), max_words + 2)[1:-1]
    out = np.zeros(max_words, dtype=np.int64)
    out[: len(ids)] = ids
    return out, len(ids)
