"""A synthetic world in the raw formats of Visual Genome v1.2 and of a Karpathy split file.

Each image shows 2-4 non-overlapping objects on a noisy plain background. An object has a
colour (6, well separated), a shape (circle, square, triangle, diamond), a size (small, large)
and a position (left / right / top / bottom / middle, from its centre), all drawn into the
pixels. Region phrases name one object ("a large red circle", "blue square on the left");
every object gets several phrases with jittered boxes, so the IoU >= 0.7 grouping has work to
do. Five full-image sentences per image describe the whole scene ("a red circle and a small
blue square on a gray background"): longer, several objects each, as in the paper's contrast
of region and full-image captions.

``false_proposals=N`` (``dvsa synth --false-proposals N``) adds N detector-like false positives
to each image's proposals after the true objects' ones: boxes on the background and boxes
straddling two objects, as a real detector's top-19 would hold.

``truth.json`` keeps the true objects, which object each region phrase names, and for every
full sentence the token list with the object each token names (-1 for none) plus its role
(colour / shape / size / position / other), so word-to-region alignment is scored exactly.

Layout written under ``out``::

    vg/image_data.json  vg/region_descriptions.json  vg/densecap_splits.json
    vg/VG_100K/*.jpg    vg/VG_100K_2/*.jpg
    karpathy/dataset_synth.json  karpathy/proposals.json
    truth.json
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dvsa.boxes import iou
from dvsa.errors import DvsaError
from dvsa.text import clean_caption

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "cyan": (30, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.20, "large": 0.34}  # side of the object's box / min(image side)
PREPOSITION = {"left": "on", "right": "on", "top": "at", "bottom": "at", "middle": "in"}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (235, 235, 235), "black": (25, 25, 25)}

REGION_TEMPLATES = (
    "{colour} {shape}",
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "the {colour} {shape} {prep} the {position}",
    "{size} {colour} {shape}",
    "a {colour} {shape} {prep} the {position}",
)


@dataclass
class SynthOptions:
    images: int = 200
    image_size: int = 128
    seed: int = 0
    phrases_per_object: int = 3
    sentences_per_image: int = 5
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    jpeg_quality: int = 90
    box_jitter: float = 0.04   # region boxes: each side moved by up to this fraction of the box size
    proposal_jitter: float = 0.03
    # detector-like false positives per image, after the true objects' proposals: boxes on the
    # background (IoU < 0.1 with every object) alternating with boxes straddling two objects
    # (from one object's centre to the other's: half of each, IoU < 0.5 with both)
    false_proposals: int = 0

    def validate(self) -> None:
        if self.images < 3:
            raise DvsaError(f"--images must be >= 3 (one per split), got {self.images}")
        if self.image_size < 48:
            raise DvsaError(f"--image-size must be >= 48 pixels, got {self.image_size}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise DvsaError("val/test fractions must be in [0, 1) and sum below 1")
        if self.false_proposals < 0:
            raise DvsaError(f"--false-proposals must be >= 0, got {self.false_proposals}")


def _position(cx: float, cy: float, w: int, h: int) -> str:
    dx, dy = cx / w - 0.5, cy / h - 0.5
    if max(abs(dx), abs(dy)) < 0.17:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _place_objects(rng: random.Random, w: int, h: int) -> list[dict]:
    n = rng.randint(2, 4)
    objs: list[dict] = []
    side_min = min(w, h)
    attempts = 0
    while len(objs) < n and attempts < 200:
        attempts += 1
        size = rng.choice(tuple(SIZES))
        s = int(round(SIZES[size] * side_min * rng.uniform(0.9, 1.1)))
        x1 = rng.randint(2, w - s - 2)
        y1 = rng.randint(2, h - s - 2)
        box = [x1, y1, x1 + s, y1 + s]
        gap = 3
        if any(not (box[2] + gap <= o["box"][0] or o["box"][2] + gap <= box[0]
                    or box[3] + gap <= o["box"][1] or o["box"][3] + gap <= box[1]) for o in objs):
            continue
        used = {(o["colour"], o["shape"]) for o in objs}
        while True:  # distinct (colour, shape) pairs, so every phrase names one object
            colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
            if (colour, shape) not in used:
                break
        objs.append({"box": box, "colour": colour, "shape": shape, "size": size,
                     "position": _position((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, w, h)})
    return objs


def _draw(rng: np.random.Generator, w: int, h: int, background: str, objs: list[dict]) -> Image.Image:
    base = np.empty((h, w, 3), dtype=np.int16)
    base[:] = BACKGROUNDS[background]
    base += rng.integers(-12, 13, size=(h, w, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for o in objs:
        x1, y1, x2, y2 = o["box"]
        c = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            d.ellipse([x1, y1, x2 - 1, y2 - 1], fill=c)
        elif o["shape"] == "square":
            d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=c)
        elif o["shape"] == "triangle":
            d.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=c)
        else:  # diamond
            mx, my = (x1 + x2) / 2, (y1 + y2) / 2
            d.polygon([(mx, y1), (x2 - 1, my), (mx, y2 - 1), (x1, my)], fill=c)
    return img


def _jitter(rng: random.Random, box: list[int], frac: float, w: int, h: int) -> list[int]:
    bw, bh = box[2] - box[0], box[3] - box[1]
    j = lambda span: int(round(rng.uniform(-frac, frac) * span))  # noqa: E731
    x1 = min(max(box[0] + j(bw), 0), w - 2)
    y1 = min(max(box[1] + j(bh), 0), h - 2)
    x2 = min(max(box[2] + j(bw), x1 + 1), w)
    y2 = min(max(box[3] + j(bh), y1 + 1), h)
    return [x1, y1, x2, y2]


FALSE_IOU_BACKGROUND = 0.1   # a background box overlaps no object more than this
FALSE_IOU_STRADDLE = 0.5     # a straddling box matches neither object (IoU >= 0.5 counts as a hit)


def _background_box(rng: random.Random, objs: list[dict], w: int, h: int) -> list[int] | None:
    """An object-sized box on the background (IoU < 0.1 with every object), or None."""
    for _ in range(50):
        s = int(round(rng.choice(tuple(SIZES.values())) * min(w, h) * rng.uniform(0.8, 1.2)))
        x1, y1 = rng.randint(0, w - s), rng.randint(0, h - s)
        box = [x1, y1, x1 + s, y1 + s]
        if all(iou(box, o["box"]) < FALSE_IOU_BACKGROUND for o in objs):
            return box
    return None


def _straddling_box(rng: random.Random, objs: list[dict]) -> list[int] | None:
    """A box from one object's centre to another's (padded by a quarter of their sides when the
    centres line up), matching neither object at IoU >= 0.5; or None."""
    if len(objs) < 2:
        return None
    a, b = (o["box"] for o in rng.sample(objs, 2))
    pad = min(a[2] - a[0], b[2] - b[0]) // 4
    c = [((a[0] + a[2]) // 2, (a[1] + a[3]) // 2), ((b[0] + b[2]) // 2, (b[1] + b[3]) // 2)]
    x1, x2 = min(c[0][0], c[1][0]), max(c[0][0], c[1][0])
    y1, y2 = min(c[0][1], c[1][1]), max(c[0][1], c[1][1])
    if x2 - x1 < 2 * pad:
        x1, x2 = x1 - pad, x2 + pad
    if y2 - y1 < 2 * pad:
        y1, y2 = y1 - pad, y2 + pad
    box = [x1, y1, x2, y2]
    return box if all(iou(box, o["box"]) < FALSE_IOU_STRADDLE for o in objs) else None


def false_proposals(rng: random.Random, objs: list[dict], w: int, h: int, n: int) -> list[list[int]]:
    """Up to ``n`` detector-like false positives: background boxes alternating with straddling ones."""
    out = []
    for k in range(n):
        box = _straddling_box(rng, objs) if k % 2 else _background_box(rng, objs, w, h)
        if box is not None:
            out.append(box)
    return out


def _mention(rng: random.Random, o: dict, idx: int, with_size: bool, with_pos: bool) -> list[tuple[str, int, str]]:
    """``[(word, object index or -1, role)]`` for "a [size] colour shape [on the position]"."""
    words = [("a", -1, "other")]
    if with_size:
        words.append((o["size"], idx, "size"))
    words += [(o["colour"], idx, "colour"), (o["shape"], idx, "shape")]
    if with_pos:
        words += [(PREPOSITION[o["position"]], -1, "other"), ("the", -1, "other"), (o["position"], idx, "position")]
    return words


def _sentence(rng: random.Random, objs: list[dict], background: str) -> tuple[str, list[tuple[str, int, str]]]:
    order = list(range(len(objs)))
    rng.shuffle(order)
    mentions = [_mention(rng, objs[i], i, rng.random() < 0.5, rng.random() < 0.2) for i in order]
    # "A, B and C" in the raw text; the commas vanish when cleaned
    raw_parts: list[str] = []
    words: list[tuple[str, int, str]] = []
    for k, m in enumerate(mentions):
        if k > 0:
            if k == len(mentions) - 1:
                raw_parts.append("and")
                words.append(("and", -1, "other"))
            else:
                raw_parts[-1] += ","
        raw_parts.extend(w for w, _, _ in m)
        words.extend(m)
    kind = rng.randrange(4)
    bg = [("on", -1, "other"), ("a", -1, "other"), (background, -1, "other"), ("background", -1, "other")]
    if kind == 0:
        words = words + bg
        raw = " ".join(raw_parts + [w for w, _, _ in bg])
    elif kind == 1:
        head = [("there", -1, "other"), ("is", -1, "other")]
        words = head + words
        raw = " ".join(["there", "is"] + raw_parts)
    elif kind == 2:
        head = [("a", -1, "other"), (background, -1, "other"), ("background", -1, "other"), ("with", -1, "other")]
        words = head + words
        raw = " ".join([w for w, _, _ in head] + raw_parts)
    else:
        raw = " ".join(raw_parts)
    raw = raw[0].upper() + raw[1:] + "."
    return raw, words


def _region_phrase(rng: random.Random, o: dict) -> str:
    return rng.choice(REGION_TEMPLATES).format(prep=PREPOSITION[o["position"]], **o)


def write_world(out, opts: SynthOptions | None = None) -> dict:
    """Write the world under ``out``; returns a summary {images, regions, sentences, seconds}."""
    import time

    opts = opts or SynthOptions()
    opts.validate()
    t0 = time.perf_counter()
    out = Path(out)
    vg = out / "vg"
    kp = out / "karpathy"
    for d in (vg / "VG_100K", vg / "VG_100K_2", kp):
        d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(opts.seed)
    nrng = np.random.default_rng(opts.seed)
    false_rng = random.Random(f"false-proposals-{opts.seed}")   # its own stream: the world is otherwise unchanged

    ids = list(range(1, opts.images + 1))
    shuffled = ids[:]
    random.Random(opts.seed + 1).shuffle(shuffled)
    n_val = max(1, int(round(opts.images * opts.val_fraction)))
    n_test = max(1, int(round(opts.images * opts.test_fraction)))
    split_of = {i: "val" for i in shuffled[:n_val]}
    split_of.update({i: "test" for i in shuffled[n_val:n_val + n_test]})
    split_of.update({i: "train" for i in shuffled[n_val + n_test:]})
    first_dir_count = int(round(opts.images * 0.6))  # VG_100K holds ~60% of VG, VG_100K_2 the rest

    image_data, regions_out, kp_images, truth_images = [], [], [], []
    proposals: dict[str, list] = {}
    region_id = 1
    sent_id = 0
    for n, image_id in enumerate(ids):
        w = opts.image_size
        h = opts.image_size if rng.random() < 0.5 else int(round(opts.image_size * 0.75))
        background = rng.choice(tuple(BACKGROUNDS))
        objs = _place_objects(rng, w, h)
        img = _draw(nrng, w, h, background, objs)
        folder = "VG_100K" if n < first_dir_count else "VG_100K_2"
        img.save(vg / folder / f"{image_id}.jpg", format="JPEG", quality=opts.jpeg_quality)
        image_data.append({"image_id": image_id, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg",
                           "width": w, "height": h, "coco_id": image_id, "flickr_id": None})

        regions, region_truth = [], []
        for k, o in enumerate(objs):
            for _ in range(opts.phrases_per_object):
                x1, y1, x2, y2 = _jitter(rng, o["box"], opts.box_jitter, w, h)
                regions.append({"region_id": region_id, "image_id": image_id, "phrase": _region_phrase(rng, o),
                                "x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1})
                region_truth.append({"region_id": region_id, "object": k})
                region_id += 1
        regions_out.append({"id": image_id, "regions": regions})

        sentences, sent_truth, sentids = [], [], []
        for _ in range(opts.sentences_per_image):
            raw, words = _sentence(rng, objs, background)
            tokens = clean_caption(raw)
            assert tokens == [w_ for w_, _, _ in words], (tokens, words)
            sentences.append({"raw": raw, "tokens": tokens, "imgid": n, "sentid": sent_id})
            sent_truth.append({"sentid": sent_id, "raw": raw, "tokens": tokens,
                               "objects": [i for _, i, _ in words], "roles": [r for _, _, r in words]})
            sentids.append(sent_id)
            sent_id += 1
        kp_images.append({"filepath": folder, "filename": f"{image_id}.jpg", "imgid": n,
                          "split": split_of[image_id], "cocoid": image_id, "sentids": sentids,
                          "sentences": sentences})
        proposals[str(image_id)] = ([_jitter(rng, o["box"], opts.proposal_jitter, w, h) for o in objs]
                                    + false_proposals(false_rng, objs, w, h, opts.false_proposals))
        truth_images.append({"image_id": image_id, "split": split_of[image_id], "width": w, "height": h,
                             "background": background, "objects": objs, "regions": region_truth,
                             "sentences": sent_truth})

    def dump(path: Path, obj) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
        os.replace(tmp, path)

    dump(vg / "image_data.json", image_data)
    dump(vg / "region_descriptions.json", regions_out)
    dump(vg / "densecap_splits.json", {s: sorted(i for i in ids if split_of[i] == s) for s in ("train", "val", "test")})
    dump(kp / "dataset_synth.json", {"dataset": "synth", "images": kp_images})
    dump(kp / "proposals.json", proposals)
    dump(out / "truth.json", {"options": opts.__dict__, "colours": list(COLOURS), "shapes": list(SHAPES),
                              "sizes": list(SIZES), "images": truth_images})
    return {"images": opts.images, "regions": region_id - 1, "sentences": sent_id,
            "seconds": time.perf_counter() - t0}
