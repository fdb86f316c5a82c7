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
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dvsa import tracking
from dvsa.config import Config
from dvsa.data.groups import IOU_GROUP, region_groups
from dvsa.data.manifest import DEFAULT_SHARD_BYTES, Manifest, ShardRecord, SplitCounts, Tally
from dvsa.data.shards import BAD_JSON, RawSample, ShardWriter, list_shards, parse_row
from dvsa.errors import DataError, DvsaError
from dvsa.files import Folder
from dvsa.inference.alignment import (
    align_sentences,
    alignment_boxes,
    decode_images,
    embed_decoded,
    encode_sentences,
)
from dvsa.inference.alignment_figure import alignment_figure, first_sample
from dvsa.inference.checkpoints import load_trained, resolve_checkpoint
from dvsa.ingest.dataset import dataset_paths
from dvsa.models.alignment import AlignmentModel
from dvsa.models.checkpoint import load_config_file
from dvsa.models.mrf import snippets
from dvsa.text import Vocab

log = logging.getLogger(__name__)

SOURCE = "snippets"


# --------------------------------------------------------------------------- snippets of one image


def snippet_regions(tokens: Sequence[str], assign_row: Sequence[int], boxes: Sequence[Sequence[float]],
                    sentence: int, first_id: int, include_full_image: bool = True
                    ) -> tuple[list[dict], int]:
    """One sentence's alignment -> its snippets as regions, and how many were left out.

    ``assign_row[t]``: the box index of word t (``boxes[0]`` is the whole image); each maximal
    run of equal indices is one region ``{id, box, raw, tokens, span: [sentence, start, end]}``
    (``end`` exclusive), ids counting up from ``first_id``. ``include_full_image=False`` leaves
    out snippets aligned to box 0 (counted in the second value).
    """
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
                 device: str = "cpu", tracking_uri: Optional[str] = None):
        # checkpoint: a directory every node sees, or an MLflow model URI each actor resolves
        # into its own node's model cache from the store at tracking_uri
        self.device = torch.device(device)
        model, self.vocab, self.cfg = load_trained(checkpoint, tracking_uri, map_location=self.device)
        if not isinstance(model, AlignmentModel):   # the driver refuses other checkpoints first
            raise DvsaError(f"{checkpoint}: a {self.cfg.task!r} checkpoint; snippet alignment needs an alignment model")
        self.model = model
        if self.model.encoder is None:
            raise DvsaError(f"{checkpoint}: this alignment model was trained on precomputed features "
                            "(data.features); snippet alignment needs a model with its CNN")
        self.model.to(self.device).eval()
        self.beta = float(beta)
        self.include_full_image = bool(include_full_image)

    def __call__(self, batch: dict) -> dict:
        samples = [parse_row(batch, i) for i in range(len(batch["__key__"]))]
        keys = [s.key for s in samples]
        n = len(keys)
        out = {"key": keys, "jpg": [b""] * n, "json": [b""] * n, "dropped": [""] * n,
               "sentences_in": [0] * n, "sentences_dropped": [0] * n, "snippets": [0] * n,
               "snippets_dropped": [0] * n}
        live = [item for i, sample in enumerate(samples) if (item := self._alignable(i, sample, out)) is not None]
        live, emb = self._embed(live, out, keys)
        if live:
            self._align(live, emb, out)
        for c in ("key", "jpg", "json", "dropped"):
            out[c] = _object_array(out[c])
        for c in ("sentences_in", "sentences_dropped", "snippets", "snippets_dropped"):
            out[c] = np.asarray(out[c], dtype=np.int64)
        return out

    def _alignable(self, i: int, sample: RawSample, out: dict) -> Optional[tuple]:
        """``(row, jpg, meta, boxes, usable sentences)`` of a sample to align; None when it is
        dropped (the reason and its sentences then set in ``out``)."""
        if sample.meta is None:
            out["dropped"][i] = BAD_JSON
            return None
        sents = sample.meta.get("sentences") or []
        out["sentences_in"][i] = len(sents)
        usable = [s for s in sents if isinstance(s, dict) and isinstance(s.get("tokens"), list) and s["tokens"]]
        out["sentences_dropped"][i] = len(sents) - len(usable)
        if not sample.data:
            out["dropped"][i] = "missing_image"
        elif not usable:
            out["dropped"][i] = "no_sentence"
        else:
            try:
                boxes = alignment_boxes(sample.meta, self.cfg.data.max_regions, self.cfg.align.whole_image)
            except (KeyError, TypeError, ValueError, IndexError):
                out["dropped"][i] = BAD_JSON
            else:
                return i, sample.data, sample.meta, boxes, usable
        out["sentences_dropped"][i] = len(sents)   # the whole image's sentences go with it
        return None

    def _embed(self, live: list, out: dict, keys: list) -> tuple[list, Optional[tuple[Tensor, Tensor]]]:
        """Embed every image's boxes: ``(items kept, (v, v_mask))``; images that do not decode
        are dropped as ``corrupt_image``."""
        if not live:
            return [], None
        decoded = decode_images([x[1] for x in live], [x[3] for x in live], self.cfg.data.image_size,
                                self.cfg.data.jpeg_decoder)
        for j in decoded.corrupt:
            i = live[j][0]
            out["dropped"][i] = "corrupt_image"
            out["sentences_dropped"][i] = out["sentences_in"][i]
            log.warning("snippets: dropped %s: corrupt image", keys[i])
        kept = [live[j] for j in decoded.kept]
        return kept, (embed_decoded(self.model, decoded, self.device) if kept else None)

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


@dataclass
class SnippetOptions:
    """How :func:`write_snippet_shards` aligns and writes."""

    splits: Sequence[str] = ("train", "val")   # train and val for `dvsa train-caption` to accept the result
    beta: Optional[float] = None               # MRF beta; None: the checkpoint's align.mrf_beta
    include_full_image: bool = True            # False: snippets aligned to the whole image are left out
    batch_size: int = 16                       # images per map_batches call
    concurrency: int = 1                       # aligner actors
    use_gpu: bool = False                      # one GPU per aligner actor
    shard_bytes: int = DEFAULT_SHARD_BYTES


def write_snippet_shards(checkpoint: str, shards: str, out: str, options: Optional[SnippetOptions] = None,
                         tracking_uri: Optional[str] = None) -> Manifest:
    """Run the batch-inference job on the running (or an embedded) Ray; write the snippet
    shards, ``manifest.json`` and ``vocab.json`` under ``out``; return the manifest."""
    o = options or SnippetOptions()
    t0 = time.perf_counter()
    ckpt, cfg, beta = _alignment_checkpoint(checkpoint, o.beta, tracking_uri)
    source = Manifest.read(shards)
    todo = _splits_to_align(shards, o.splits)
    Folder.of(out).make()
    job = _AlignJob(checkpoint if tracking.is_model_uri(checkpoint) else str(ckpt), beta, o.include_full_image,
                    o.use_gpu, o.batch_size, _actor_count(o.concurrency, o.use_gpu), tracking_uri)
    counts, written = _SnippetCounts(), []
    for split in todo:
        with ShardWriter(str(out), split, o.shard_bytes) as writer:
            for row in job.rows(shards, split):
                meta = counts.add(split, row)
                if meta is not None:
                    writer.write(row["key"], row["jpg"], meta)
        written += writer.shards
        c = counts.splits.setdefault(split, SplitCounts())
        log.info("snippets: %s: %d images, %d snippets (%d groups) in %d shards",
                 split, c.images, c.regions, c.groups, len(writer.shards))
    _check_source_counts(source, shards, todo, counts.tally)
    min_count = source.vocab.min_count if source.vocab is not None else 1
    params = {"checkpoint": checkpoint if tracking.is_model_uri(checkpoint) else str(ckpt),
              "source_shards": str(shards), "beta": beta,
              "include_full_image": bool(o.include_full_image), "max_regions": cfg.data.max_regions,
              "image_size": cfg.data.image_size, "iou_threshold": IOU_GROUP, "min_count": min_count,
              "splits": list(todo)}
    manifest = counts.manifest(params, written, time.perf_counter() - t0)
    manifest.write(out, counts.vocab(min_count))
    return manifest


def _alignment_checkpoint(checkpoint: str, beta: Optional[float], tracking_uri: Optional[str]
                          ) -> tuple[Path, Config, float]:
    """The checkpoint resolved, its config and the MRF beta; DvsaError unless it is an
    alignment model with its CNN."""
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
    return ckpt, cfg, beta


def _splits_to_align(shards: str, splits: Sequence[str]) -> list[str]:
    """The asked splits that have shards (train must)."""
    todo = [s for s in splits if list_shards(shards, s)]
    if "train" in splits and "train" not in todo:
        raise DataError(f"{shards}: no train shards (train-NNNNNN.tar)")
    skipped = [s for s in splits if s not in todo]
    if skipped:
        log.warning("snippets: %s has no %s shards: not aligned", shards, ", ".join(skipped))
    return todo


def _actor_count(concurrency: int, use_gpu: bool) -> int:
    """Aligner actors: on CPU, one CPU is left for the read tasks, or the pipeline stalls."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    if not use_gpu and concurrency >= cpus > 1:
        log.warning("snippets: %d aligner actors on a %d-CPU cluster would starve the readers; using %d",
                    concurrency, cpus, cpus - 1)
        return cpus - 1
    return concurrency


@dataclass(frozen=True)
class _AlignJob:
    """The Ray Data pipeline: a split's shards -> :class:`SnippetAligner` actors -> rows, in order."""

    checkpoint: str
    beta: float
    include_full_image: bool
    use_gpu: bool
    batch_size: int
    concurrency: int
    tracking_uri: Optional[str] = None       # the store of an MLflow model URI checkpoint

    def rows(self, shards: str, split: str) -> Iterator[dict[str, Any]]:
        """One row per input sample (SnippetAligner's columns, as Python values)."""
        import ray

        ds = ray.data.read_webdataset(dataset_paths(shards, split), decoder=None, suffixes=["jpg", "json"])
        ds.context.execution_options.preserve_order = True
        ds = ds.map_batches(SnippetAligner, fn_constructor_args=(self.checkpoint, self.beta, self.include_full_image,
                                                                 "cuda" if self.use_gpu else "cpu", self.tracking_uri),
                            batch_size=self.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=self.concurrency),
                            num_gpus=1 if self.use_gpu else 0)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for j in range(len(batch["key"])):
                yield {"key": str(batch["key"][j]), "jpg": bytes(batch["jpg"][j]), "json": bytes(batch["json"][j]),
                       "dropped": str(batch["dropped"][j]),
                       **{c: int(batch[c][j]) for c in ("sentences_in", "sentences_dropped", "snippets",
                                                        "snippets_dropped")}}


@dataclass
class _SnippetCounts:
    """The tally of the job (regions in = snippets the MRF found), what each split got, and the
    train split's snippet tokens for the vocabulary."""

    tally: Tally = field(default_factory=Tally)
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    tokens: Counter = field(default_factory=Counter)
    train_snippets: int = 0
    coco_ids: dict[str, list] = field(default_factory=dict)

    def add(self, split: str, row: dict[str, Any]) -> Optional[dict]:
        """Count one row of the aligner; the sample json to write, or None when it was dropped."""
        n_sent, n_snip, full_image = row["sentences_in"], row["snippets"], row["snippets_dropped"]
        self.tally.count_in(images=1, sentences=n_sent, regions=n_snip)
        self.tally.drop("full_image_snippet", regions=full_image)
        if row["dropped"]:
            self.tally.drop(row["dropped"], images=1, sentences=n_sent, regions=n_snip - full_image)
            return None
        meta = json.loads(row["json"])
        self.tally.drop("empty_caption", sentences=row["sentences_dropped"])
        self.splits.setdefault(split, SplitCounts()).add(images=1, regions=len(meta["regions"]),
                                                         groups=len(meta["groups"]),
                                                         sentences=n_sent - row["sentences_dropped"])
        if meta.get("coco_id") is not None:
            self.coco_ids.setdefault(split, []).append(meta["coco_id"])
        if split == "train":
            for r in meta["regions"]:
                self.tokens.update(r["tokens"])
            self.train_snippets += len(meta["regions"])
        return meta

    def vocab(self, min_count: int) -> Vocab:
        return Vocab.build(self.tokens, min_count, self.train_snippets)

    def manifest(self, params: dict, shards: list[ShardRecord], seconds: float) -> Manifest:
        m = Manifest(source=SOURCE, params=params, tally=self.tally, splits=self.splits, shards=shards,
                     coco_ids={s: sorted(v) for s, v in self.coco_ids.items()},
                     input_details={"note": "regions in = snippets found by the MRF"},
                     sections={"run": {"seconds": round(seconds, 3)}})
        written = m.written
        m.info = {"snippets_per_sentence": round(written["regions"] / max(written["sentences"], 1), 3),
                  "words_per_snippet": round(sum(self.tokens.values()) / max(self.train_snippets, 1), 3)}
        return m


def _check_source_counts(source: Manifest, shards: str, splits: Sequence[str], tally: Tally) -> None:
    """DataError unless the images and sentences read equal the source manifest's counts."""
    if not source.splits:
        return
    expect_images = sum(source.split_count(s, "images") for s in splits)
    expect_sents = sum(source.split_count(s, "sentences") for s in splits)
    got = (tally.inputs["images"], tally.inputs["sentences"])
    if got != (expect_images, expect_sents):
        raise DataError(f"{shards}: read {got[0]} images / {got[1]} sentences from the {', '.join(splits)} "
                        f"shards, but its manifest lists {expect_images} / {expect_sents}")


def _object_array(values: list) -> np.ndarray:
    """A 1-D object array (bytes/str stay whole, whatever their lengths)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


# --------------------------------------------------------------------------- Fig. 5


def checkpoint_figure(checkpoint: str, shards: str, split: str, path: str | Path, *,
                      beta: Optional[float] = None) -> Optional[Path]:
    """Fig. 5 of the first sample of ``split`` with a trained alignment model, also logged to the
    model's MLflow run when that run can be found. None when the split has no sample."""
    try:
        _, jpg, meta = first_sample(shards, split)
    except DataError as e:
        log.warning("no Fig. 5 example: %s", e)
        return None
    resolved = resolve_checkpoint(checkpoint)
    model, vocab, cfg = load_trained(str(resolved))
    fig = alignment_figure(model, vocab, cfg, jpg, meta, path, beta=beta)
    if tracking.is_model_uri(checkpoint):   # the store it was resolved in
        uri = tracking.tracking_uri(os.environ.get("DVSA_OUT", "runs"))
    else:
        uri = tracking.tracking_uri(os.environ.get("DVSA_OUT", cfg.out), cfg.mlflow.tracking_uri)
    try:
        rid = tracking.find_checkpoint_run(uri, checkpoint, resolved)
    except Exception as e:  # no store there: the picture is still on disk
        log.warning("MLflow store %s not readable (%s): Fig. 5 not logged", uri, e)
        rid = None
    if rid:
        tracking.RunLogger(uri, rid).log_artifact(fig, "figures")
    return fig
