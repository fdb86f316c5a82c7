"""MRF snippet alignment over a shard set (section 3.1.4), written as region-snippet shards.

For every image of the source shards (Karpathy split with proposals, as the alignment model
was trained on) and every one of its sentences::

    unary[t, i] = v_i^T s_t                 (eq. 11: boxes = whole image + proposals)
    a = argmax_a E(a)                       (eq. 10-12, Viterbi, beta = align.mrf_beta)
    snippets = maximal runs of equal a_t    (one region annotated with one piece of text)

Each snippet becomes a region ``{id, box, raw, tokens, span}`` of the image (``box``: its
aligned box in pixels of the stored JPEG; ``span``: ``[sentence, start, end)``); the regions
are regrouped at IoU >= 0.7 as ``dvsa prepare`` does, and the sample is written to the SAME
shard contract (``KEY.jpg`` copied + ``KEY.json``) with ``manifest.json`` and ``vocab.json``
(built from the snippets of the train split). So::

    dvsa snippets --checkpoint ALIGN --shards runs/data/karpathy --out runs/data/snippets
    dvsa train-caption --config configs/tiny.yaml data.shards=runs/data/snippets caption.mode=region

trains a region captioner on inferred snippets (section 4.3).

The job is Ray Data batch inference: ``read_webdataset(decoder=None)`` -> ``map_batches`` with
an actor pool of :class:`SnippetAligner` (each holds the trained model once) -> the driver
writes shards as batches stream back. Every input sample yields exactly one output row, either
written or dropped with a reason, so the manifest balances (inputs = written + dropped) against
the source manifest's counts.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dvsa.errors import DataError, DvsaError

log = logging.getLogger(__name__)

FORMAT = "dvsa-shards/1"
SOURCE = "snippets"
IOU_GROUP = 0.7
DEFAULT_SHARD_BYTES = 128 * 2**20


# --------------------------------------------------------------------------- pure pieces


def alignment_boxes(meta: dict, max_regions: int, whole_image: bool = True,
                    width: Optional[int] = None, height: Optional[int] = None) -> list[list[float]]:
    """The boxes the alignment model scores for this sample, in pixels of the stored JPEG
    (``width x height``, by default the sample's own): the same choice as training ingest
    (:func:`dvsa.ingest.samples.align_boxes`, ``align.whole_image``)."""
    from dvsa.ingest.samples import align_boxes, box_of

    width = int(meta["width"] if width is None else width)
    height = int(meta["height"] if height is None else height)
    return [[float(v) for v in box_of(meta, kind, idx, width, height)]
            for kind, idx in align_boxes(meta, max_regions, whole_image)]


def encode_sentences(vocab, token_lists: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
    """Word ids of every sentence, untruncated: ``(tokens long[L, N], lengths long[L])``
    (no START/END; unknown words -> UNK; 0-padded)."""
    n = max((len(t) for t in token_lists), default=0)
    tokens = torch.zeros(len(token_lists), max(n, 1), dtype=torch.long)
    lengths = torch.zeros(len(token_lists), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        ids = vocab.ids(list(toks))
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths[i] = len(ids)
    return tokens, lengths


def embed_images(model, jpgs: Sequence[bytes], boxes: Sequence[Sequence[Sequence[float]]],
                 image_size: int, decoder: str = "pil", device: str | torch.device = "cpu"
                 ) -> tuple[Tensor, Tensor]:
    """v_i of eq. 1 for the given boxes (pixels of each stored JPEG) of each image:
    ``(v float[B, M, h], v_mask bool[B, M])``. Images are decoded and resized exactly as
    training ingest does. Raises :class:`dvsa.ingest.decode.CorruptImage`."""
    from dvsa.ingest.decode import decode_resize, scale_boxes
    from dvsa.ingest.torch_batches import normalize_images

    images, scaled = [], []
    for jpg, bx in zip(jpgs, boxes):
        img, (w, h) = decode_resize(jpg, image_size, decoder)
        images.append(img)
        scaled.append(torch.from_numpy(scale_boxes(bx, w, h, image_size)).to(device))
    x = normalize_images(torch.from_numpy(np.stack(images)).to(device))      # [B, 3, S, S]
    with torch.no_grad():
        return model.embed_regions(x, scaled)


def align_sentences(model, v: Tensor, v_mask: Tensor, sent_img: Tensor, tokens: Tensor,
                    lengths: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """MRF alignment of each sentence l to the boxes of its image ``sent_img[l]``.

    v float[B,M,h], v_mask bool[B,M], sent_img long[L], tokens long[L,N], lengths long[L] ->
    ``(assign long[L, N] (box index per word, -1 on padding), unary float[L, N, M])``.
    """
    from dvsa.models.mrf import viterbi_align

    with torch.no_grad():
        s, s_mask = model.embed_words(tokens, lengths)                       # [L, N, h], [L, N]
        v_l, vm_l = v[sent_img], v_mask[sent_img]                            # [L, M, h], [L, M]
        unary = model.word_region_scores(v_l, vm_l, s, s_mask).float()      # [L, N, M]
        assign = viterbi_align(unary, lengths, vm_l, beta)                  # [L, N]
    return assign, unary


def snippet_regions(tokens: Sequence[str], assign_row: Sequence[int], boxes: Sequence[Sequence[float]],
                    sentence: int, first_id: int, include_full_image: bool = True
                    ) -> tuple[list[dict], int]:
    """One sentence's alignment -> its snippets as regions, and how many were left out.

    ``assign_row[t]``: the box index of word t (``boxes[0]`` is the whole image); each maximal
    run of equal indices is one region ``{id, box, raw, tokens, span: [sentence, start, end]}``
    (``end`` exclusive), ids counting up from ``first_id``. ``include_full_image=False`` leaves
    out snippets aligned to box 0 (counted in the second value).
    """
    from dvsa.models.mrf import snippets

    n = len(tokens)
    if len(assign_row) < n:
        raise ValueError(f"sentence {sentence}: {len(assign_row)} alignments for {n} words")
    regions, left_out = [], 0
    for box_idx, start, end in snippets(list(assign_row[:n]), n):
        if not 0 <= box_idx < len(boxes):
            raise ValueError(f"sentence {sentence}: word {start} aligned to box {box_idx}, "
                             f"but there are {len(boxes)} boxes")
        if box_idx == 0 and not include_full_image:
            left_out += 1
            continue
        toks = [str(w) for w in tokens[start:end]]
        regions.append({"id": first_id + len(regions), "box": [float(c) for c in boxes[box_idx]],
                        "raw": " ".join(toks), "tokens": toks, "span": [sentence, start, end]})
    return regions, left_out


def region_groups(regions: Sequence[dict], threshold: float = IOU_GROUP) -> list[dict]:
    """Regions merged at IoU >= threshold, as ``dvsa prepare`` writes them (mean box, every
    caption a reference)."""
    from dvsa.boxes import group_boxes

    groups = []
    for members, box in group_boxes([r["box"] for r in regions], threshold):
        groups.append({"box": regions[members[0]]["box"] if len(members) == 1 else [round(v, 2) for v in box],
                       "region_ids": [regions[i]["id"] for i in members],
                       "refs": [regions[i]["raw"] for i in members],
                       "tokens": [regions[i]["tokens"] for i in members]})
    return groups


def snippet_sample(meta: dict, assign: Tensor, boxes: Sequence[Sequence[float]], sentences: Sequence[dict],
                   include_full_image: bool = True) -> tuple[dict, int, int]:
    """The output json of one image: ``meta`` with ``regions`` = the snippets of every
    sentence and ``groups`` recomputed. ``assign`` holds one row per entry of ``sentences``.
    Returns ``(json, snippets found, snippets left out)``."""
    regions, found, left = [], 0, 0
    for k, sent in enumerate(sentences):
        regs, out = snippet_regions(sent["tokens"], assign[k].tolist(), boxes, k, 1 + len(regions),
                                    include_full_image)
        regions += regs
        found += len(regs) + out
        left += out
    new = {key: value for key, value in meta.items() if key not in ("regions", "groups")}
    new["sentences"] = list(sentences)
    new["regions"] = regions
    new["groups"] = region_groups(regions)
    new["alignment_boxes"] = [list(b) for b in boxes]
    return new, found, left


# --------------------------------------------------------------------------- the Ray Data actor


class SnippetAligner:
    """Actor-pool callable: raw ``jpg``/``json`` batch -> one row per input sample.

    Output columns: ``key``, ``jpg`` and ``json`` (bytes; empty when dropped), ``dropped`` (the
    reason, "" when written), ``sentences_in`` / ``sentences_dropped`` (by sentence), and
    ``snippets`` / ``snippets_dropped``.
    """

    def __init__(self, checkpoint: str, beta: float, include_full_image: bool = True,
                 device: str = "cpu"):
        from dvsa.train.checkpoints import load_trained

        self.device = torch.device(device)
        self.model, self.vocab, self.cfg = load_trained(checkpoint, map_location=self.device)
        if getattr(self.model, "encoder", None) is None:
            raise DvsaError(f"{checkpoint}: this alignment model was trained on precomputed features "
                            "(data.features); snippet alignment needs a model with its CNN")
        self.model.to(self.device).eval()
        self.beta = float(beta)
        self.include_full_image = bool(include_full_image)

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["__key__"]]
        n = len(keys)
        jpg_col = batch.get("jpg")
        json_col = batch.get("json")
        out = {"key": keys, "jpg": [b""] * n, "json": [b""] * n, "dropped": [""] * n,
               "sentences_in": [0] * n, "sentences_dropped": [0] * n, "snippets": [0] * n,
               "snippets_dropped": [0] * n}
        live = []   # (row, jpg, meta, boxes, sentences)
        for i, key in enumerate(keys):
            jpg = bytes(jpg_col[i]) if jpg_col is not None and jpg_col[i] is not None else b""
            try:
                meta = json.loads(bytes(json_col[i])) if json_col is not None and json_col[i] is not None else None
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                out["dropped"][i] = "bad_json"
                continue
            sents = meta.get("sentences") or []
            out["sentences_in"][i] = len(sents)
            usable = [s for s in sents if isinstance(s, dict) and isinstance(s.get("tokens"), list) and s["tokens"]]
            out["sentences_dropped"][i] = len(sents) - len(usable)
            if not jpg:
                out["dropped"][i] = "missing_image"
            elif not usable:
                out["dropped"][i] = "no_sentence"
            else:
                try:
                    boxes = alignment_boxes(meta, self.cfg.data.max_regions, self.cfg.align.whole_image)
                except (KeyError, TypeError, ValueError, IndexError):
                    out["dropped"][i] = "bad_json"
                else:
                    live.append((i, jpg, meta, boxes, usable))
                    continue
            out["sentences_dropped"][i] = len(sents)   # the whole image's sentences go with it
        live, emb = self._embed(live, out, keys)
        if live:
            self._align(live, emb, out)
        for c in ("key", "jpg", "json", "dropped"):
            out[c] = _object_array(out[c])
        for c in ("sentences_in", "sentences_dropped", "snippets", "snippets_dropped"):
            out[c] = np.asarray(out[c], dtype=np.int64)
        return out

    def _embed(self, live: list, out: dict, keys: list) -> tuple[list, Optional[tuple[Tensor, Tensor]]]:
        """Embed every image's boxes: ``(items kept, (v, v_mask))``. On a corrupt JPEG the
        images are tried one by one and the corrupt ones dropped."""
        from dvsa.ingest.decode import CorruptImage

        size, decoder = self.cfg.data.image_size, self.cfg.data.jpeg_decoder

        def embed(items):
            return embed_images(self.model, [x[1] for x in items], [x[3] for x in items], size, decoder,
                                self.device)

        if not live:
            return [], None
        try:
            return live, embed(live)
        except CorruptImage:
            pass
        ok = []
        for item in live:
            try:
                embed([item])
                ok.append(item)
            except CorruptImage as e:
                i = item[0]
                out["dropped"][i] = "corrupt_image"
                out["sentences_dropped"][i] = out["sentences_in"][i]
                log.warning("snippets: dropped %s: corrupt image (%s)", keys[i], e)
        return ok, (embed(ok) if ok else None)

    def _align(self, live: list, emb: tuple[Tensor, Tensor], out: dict) -> None:
        v, v_mask = emb
        sent_img, token_lists = [], []
        for b, item in enumerate(live):
            for s in item[4]:
                sent_img.append(b)
                token_lists.append(s["tokens"])
        tokens, lengths = encode_sentences(self.vocab, token_lists)
        assign, _ = align_sentences(self.model, v, v_mask, torch.tensor(sent_img, device=self.device),
                                    tokens.to(self.device), lengths.to(self.device), self.beta)
        assign = assign.cpu()
        first = 0
        for item in live:
            i, jpg, meta, boxes, sents = item
            rows = assign[first:first + len(sents)]
            first += len(sents)
            new, found, left = snippet_sample(meta, rows, boxes, sents, self.include_full_image)
            out["jpg"][i] = jpg
            out["json"][i] = json.dumps(new, separators=(",", ":")).encode()
            out["snippets"][i] = found
            out["snippets_dropped"][i] = left
            if not new["regions"]:
                out["dropped"][i] = "no_snippet"
                out["jpg"][i] = out["json"][i] = b""
                out["sentences_dropped"][i] = out["sentences_in"][i]


# --------------------------------------------------------------------------- the job


def write_snippet_shards(checkpoint: str, shards: str, out: str, *, splits: Sequence[str] = ("train", "val"),
                         beta: Optional[float] = None, include_full_image: bool = True,
                         batch_size: int = 16, concurrency: int = 1, use_gpu: bool = False,
                         shard_bytes: int = DEFAULT_SHARD_BYTES, tracking_uri: Optional[str] = None) -> dict:
    """Run the batch-inference job on the running (or an embedded) Ray; write the snippet
    shards, ``manifest.json`` and ``vocab.json`` under ``out``; return the manifest.

    ``beta`` defaults to the checkpoint's ``align.mrf_beta``. ``splits`` must include train
    and val for ``dvsa train-caption`` to accept the result.
    """
    import fsspec
    import ray

    from dvsa.data.prepare import check_balance
    from dvsa.data.shards import MANIFEST, VOCAB, ShardWriter, list_shards, load_manifest, write_json_atomic
    from dvsa.ingest.dataset import dataset_paths
    from dvsa.text import Vocab
    from dvsa.train.checkpoints import load_config_file, resolve_checkpoint

    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint, tracking_uri)
    cfg = load_config_file(ckpt)
    if cfg.task != "align":
        raise DvsaError(f"{checkpoint}: a {cfg.task!r} checkpoint; snippets need an alignment model (task=align)")
    if cfg.data.features:
        raise DvsaError(f"{checkpoint}: trained on precomputed features (data.features); snippet alignment "
                        "needs a model with its CNN")
    beta = float(cfg.align.mrf_beta if beta is None else beta)
    if beta < 0:
        raise DvsaError(f"--beta must be >= 0, got {beta}")
    src_manifest = load_manifest(shards)
    todo = [s for s in splits if list_shards(shards, s)]
    if "train" in splits and "train" not in todo:
        raise DataError(f"{shards}: no train shards (train-NNNNNN.tar)")
    fs, root = fsspec.core.url_to_fs(str(out))
    fs.makedirs(root, exist_ok=True)
    skipped_splits = [s for s in splits if s not in todo]
    if skipped_splits:
        log.warning("snippets: %s has no %s shards: not aligned", shards, ", ".join(skipped_splits))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if not use_gpu and concurrency >= cpus > 1:
        # every aligner actor holds a CPU: leave one for the read tasks, or the pipeline stalls
        log.warning("snippets: %d aligner actors on a %d-CPU cluster would starve the readers; using %d",
                    concurrency, cpus, cpus - 1)
        concurrency = cpus - 1

    counts = {s: Counter() for s in todo}
    dropped = {"images": Counter(), "regions": Counter(), "sentences": Counter()}
    inputs = Counter()
    tokens, n_train_snippets, shards_written, coco_ids = Counter(), 0, [], {}
    for split in todo:
        ds = ray.data.read_webdataset(dataset_paths(shards, split), decoder=None, suffixes=["jpg", "json"])
        ds.context.execution_options.preserve_order = True
        ds = ds.map_batches(SnippetAligner, fn_constructor_args=(str(ckpt), beta, include_full_image,
                                                                 "cuda" if use_gpu else "cpu"),
                            batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=1 if use_gpu else 0)
        c = counts[split]
        with ShardWriter(str(out), split, shard_bytes) as writer:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for j in range(len(batch["key"])):
                    n_sent, n_sent_drop = int(batch["sentences_in"][j]), int(batch["sentences_dropped"][j])
                    n_snip, n_snip_drop = int(batch["snippets"][j]), int(batch["snippets_dropped"][j])
                    inputs.update(images=1, sentences=n_sent, regions=n_snip)
                    reason = str(batch["dropped"][j])
                    if reason:
                        dropped["images"][reason] += 1
                        dropped["sentences"][reason] += n_sent
                        dropped["regions"][reason] += n_snip - n_snip_drop
                        if n_snip_drop:
                            dropped["regions"]["full_image_snippet"] += n_snip_drop
                        continue
                    meta = json.loads(bytes(batch["json"][j]))
                    writer.write(str(batch["key"][j]), bytes(batch["jpg"][j]), meta)
                    if n_sent_drop:
                        dropped["sentences"]["empty_caption"] += n_sent_drop
                    if n_snip_drop:
                        dropped["regions"]["full_image_snippet"] += n_snip_drop
                    c.update(images=1, regions=len(meta["regions"]), groups=len(meta["groups"]),
                             sentences=n_sent - n_sent_drop)
                    if meta.get("coco_id") is not None:
                        coco_ids.setdefault(split, []).append(meta["coco_id"])
                    if split == "train":
                        for r in meta["regions"]:
                            tokens.update(r["tokens"])
                        n_train_snippets += len(meta["regions"])
        shards_written += writer.shards
        c["shards"] = len(writer.shards)
        log.info("snippets: %s: %d images, %d snippets (%d groups) in %d shards",
                 split, c["images"], c["regions"], c["groups"], c["shards"])
    # inputs must equal the source manifest's counts for the splits read
    src_splits = src_manifest.get("splits") or {}
    expect_images = sum(int((src_splits.get(s) or {}).get("images", 0)) for s in todo)
    expect_sents = sum(int((src_splits.get(s) or {}).get("sentences", 0)) for s in todo)
    if src_splits and (inputs["images"], inputs["sentences"]) != (expect_images, expect_sents):
        raise DataError(f"{shards}: read {inputs['images']} images / {inputs['sentences']} sentences from "
                        f"the {', '.join(todo)} shards, but its manifest lists {expect_images} / {expect_sents}")

    src_vocab_min = int((src_manifest.get("vocab") or {}).get("min_count", 1))
    vocab = Vocab.build(tokens, src_vocab_min, n_train_snippets)
    vocab_path = posixpath.join(root, VOCAB)
    vocab.save(vocab_path if _is_local(fs) else fs.unstrip_protocol(vocab_path))
    written = {k: sum(c[k] for c in counts.values()) for k in ("images", "regions", "sentences")}
    manifest = {
        "format": FORMAT,
        "source": SOURCE,
        "params": {"checkpoint": str(ckpt), "source_shards": str(shards), "beta": beta,
                   "include_full_image": bool(include_full_image), "max_regions": cfg.data.max_regions,
                   "image_size": cfg.data.image_size, "iou_threshold": IOU_GROUP, "min_count": src_vocab_min,
                   "splits": list(todo)},
        "inputs": {"images": inputs["images"], "regions": inputs["regions"], "sentences": inputs["sentences"],
                   "note": "regions in = snippets found by the MRF"},
        "written": written,
        "splits": {s: dict(c) for s, c in counts.items()},
        "shards": sorted(shards_written, key=lambda s: s["name"]),
        "dropped": {k: dict(sorted((r, n) for r, n in v.items() if n)) for k, v in dropped.items()},
        "info": {"snippets_per_sentence": round(written["regions"] / max(written["sentences"], 1), 3),
                 "words_per_snippet": round(sum(tokens.values()) / max(n_train_snippets, 1), 3)},
        "vocab": {"size": len(vocab), "min_count": src_vocab_min, "train_captions": n_train_snippets},
        "coco_ids": {s: sorted(v) for s, v in coco_ids.items()},
        "run": {"seconds": round(time.perf_counter() - t0, 3)},
    }
    check_balance(manifest)
    write_json_atomic(fs, posixpath.join(root, MANIFEST), manifest)
    return manifest


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def _object_array(values: list) -> np.ndarray:
    """A 1-D object array (bytes/str stay whole, whatever their lengths)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


# --------------------------------------------------------------------------- Fig. 5


def first_sample(shards: str, split: str) -> tuple[str, bytes, dict]:
    """The first sample of ``split`` that has a JPEG and a non-empty sentence."""
    from dvsa.data.shards import iter_samples

    for key, jpg, meta in iter_samples(shards, split):
        if jpg and any(s.get("tokens") for s in meta.get("sentences") or []):
            return key, jpg, meta
    raise DataError(f"{shards}: no {split} sample with an image and a sentence")


def alignment_figure(model, vocab, cfg, jpg: bytes, meta: dict, path: str | Path, *, sentence: int = 0,
                     beta: Optional[float] = None, title: Optional[str] = None) -> Path:
    """Fig. 5: one image-sentence pair, each word coloured like the box the MRF (``beta``,
    default ``align.mrf_beta``) aligns it to; snippets show as spans. Returns the PNG path."""
    import io

    from PIL import Image

    from dvsa.viz import draw_alignment

    sents = [s for s in meta.get("sentences") or [] if s.get("tokens")]
    if not 0 <= sentence < len(sents):
        raise DataError(f"image {meta.get('image_id')}: no sentence {sentence} (it has {len(sents)})")
    beta = float(cfg.align.mrf_beta if beta is None else beta)
    boxes = alignment_boxes(meta, cfg.data.max_regions, cfg.align.whole_image)
    v, v_mask = embed_images(model, [jpg], [boxes], cfg.data.image_size, cfg.data.jpeg_decoder)
    toks = list(sents[sentence]["tokens"])
    tokens, lengths = encode_sentences(vocab, [toks])
    assign, unary = align_sentences(model, v, v_mask, torch.zeros(1, dtype=torch.long), tokens, lengths, beta)
    a = assign[0, : len(toks)].tolist()
    scores = [float(unary[0, t, a[t]]) for t in range(len(toks))]
    with Image.open(io.BytesIO(jpg)) as im:
        img = im.convert("RGB")
    title = title or f"image {meta.get('image_id')}: MRF snippets (beta={beta:g}); box 0 = whole image"
    return draw_alignment(img, boxes, toks, a, path, word_scores=scores, title=title)
