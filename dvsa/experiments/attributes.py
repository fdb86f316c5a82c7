"""Region attribute accuracy on a ``dvsa synth`` world: does a generated region caption name
the colour and the shape of the object under its box?

Only a synthetic world can give this number: its ``truth.json`` knows every object's box,
colour and shape. A region query (a merged group of region boxes) is matched to the true
object it overlaps most (IoU in the stored image's frame); its caption is right when its
tokens contain that object's colour word and shape word, and it names no other colour or
shape (a caption listing every object in the scene, as a full-frame model tends to, is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from dvsa.boxes import iou
from dvsa.data.shards import iter_samples
from dvsa.text import clean_caption


@dataclass
class AttributeResult:
    accuracy: float                  # colour and shape right, no other named
    colour_accuracy: float           # the right colour named
    shape_accuracy: float            # the right shape named
    regions: int                     # queries scored
    unmatched: int = 0               # queries whose box overlaps no true object (IoU < min_iou)
    examples: list = field(default_factory=list)  # a few wrong ones: (caption, colour, shape)

    def metrics(self, prefix: str = "region") -> dict[str, float]:
        return {f"{prefix}/attr_acc": self.accuracy, f"{prefix}/colour_acc": self.colour_accuracy,
                f"{prefix}/shape_acc": self.shape_accuracy, f"{prefix}/attr_regions": float(self.regions)}


def caption_attributes(caption: str, colours: Sequence[str], shapes: Sequence[str]) -> tuple[set, set]:
    """The colour words and shape words a caption names."""
    toks = set(clean_caption(caption))
    return toks & set(colours), toks & set(shapes)


def attribute_accuracy(predictions: Sequence[Mapping], truth: Mapping, sizes: Mapping[str, tuple],
                       min_iou: float = 0.5) -> AttributeResult:
    """Score region captions against the world's truth.

    ``predictions``: dicts with ``image_id``, ``box`` (stored-image pixels) and ``caption``
    (as :func:`dvsa.evaluation.regions.evaluate_regions` returns them); ``truth``: the parsed
    ``truth.json`` (with ``colours``, ``shapes``, ``images``); ``sizes``: image_id (str) ->
    (width, height) of the stored JPEG, to map true boxes into that frame.
    """
    colours, shapes = list(truth["colours"]), list(truth["shapes"])
    by_id = {str(im["image_id"]): im for im in truth["images"]}
    right = colour_right = shape_right = scored = unmatched = 0
    wrong: list = []
    for p in predictions:
        im = by_id.get(str(p["image_id"]))
        if im is None:
            raise KeyError(f"image {p['image_id']} is not in truth.json: is this the world the shards came from?")
        w, h = sizes.get(str(p["image_id"]), (im["width"], im["height"]))
        sx, sy = w / float(im["width"]), h / float(im["height"])
        boxes = [[o["box"][0] * sx, o["box"][1] * sy, o["box"][2] * sx, o["box"][3] * sy] for o in im["objects"]]
        overlaps = [iou(p["box"], b) for b in boxes]
        best = max(range(len(boxes)), key=overlaps.__getitem__) if boxes else None
        if best is None or overlaps[best] < min_iou:
            unmatched += 1
            continue
        obj = im["objects"][best]
        named_colours, named_shapes = caption_attributes(p["caption"], colours, shapes)
        c_ok = obj["colour"] in named_colours
        s_ok = obj["shape"] in named_shapes
        colour_right += c_ok
        shape_right += s_ok
        ok = c_ok and s_ok and len(named_colours) == 1 and len(named_shapes) == 1
        right += ok
        scored += 1
        if not ok and len(wrong) < 10:
            wrong.append((p["caption"], obj["colour"], obj["shape"]))
    n = max(scored, 1)
    return AttributeResult(accuracy=right / n, colour_accuracy=colour_right / n, shape_accuracy=shape_right / n,
                           regions=scored, unmatched=unmatched, examples=wrong)


def stored_sizes(shards: str, split: str, image_ids: Optional[set] = None) -> dict[str, tuple]:
    """image_id -> (width, height) of the stored JPEGs of a split (from the shard json only)."""
    out: dict[str, tuple] = {}
    for _key, _jpg, meta in iter_samples(shards, split):
        iid = str(meta["image_id"])
        if image_ids is None or iid in image_ids:
            out[iid] = (float(meta["width"]), float(meta["height"]))
    return out

