"""Region evaluation (section 4.4) as a Ray Data batch-inference job.

Every merged region group of the split's images is one query (the shards' ``groups``:
regions merged at IoU >= 0.7, mean box, every caption kept): the captioner describes the
group's box, and the group's captions are the references. Scores are corpus-level
BLEU-1..4, METEOR, ROUGE-L and CIDEr (:func:`dvsa.evaluation.captions.score_parallel`: METEOR
split over several Ray actors, each its own JVM, combined exactly).

The job::

    read_webdataset(split shards, decoder=None)                      raw jpg + json bytes
      -> map_batches(RegionCaptionActor, actor pool, GPU when asked)   one row per query
           per image: decode + resize as training ingest does, the query boxes mapped into
           that frame; per batch of images: ONE CNN pass, RoIAlign for every box
           (``CaptioningModel.region_features``), then beam search for all boxes at once
      -> driver: (query id, caption, log prob, references) -> score_parallel

The same job runs a full-frame captioner on the region boxes (Table 5's comparison: the
model never saw regions), and, with ``queries="images"``, any captioner on whole images
against their full-image sentences (``fullframe/*`` metrics).

:class:`dvsa.inference.captioning.BoxCaptioner` is the in-process core (also used by ``dvsa caption``): a trained
captioner + vocabulary + config, describing boxes of already resized images.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from dvsa import tracking
from dvsa.config import CaptionDecode
from dvsa.data.manifest import Manifest
from dvsa.data.shards import BAD_JSON, iter_samples, parse_row
from dvsa.errors import DataError, DvsaError
from dvsa.evaluation.captions import score_parallel
from dvsa.evaluation.meteor import check_java
from dvsa.inference.captioning import BoxCaptioner
from dvsa.inference.checkpoints import resolve_checkpoint
from dvsa.ingest.dataset import dataset_paths
from dvsa.ingest.decode import CorruptImage
from dvsa.viz import draw_region_captions

log = logging.getLogger(__name__)

QUERY_KINDS = ("groups", "images")
METRIC_PREFIX = {"groups": "region", "images": "fullframe"}


# --------------------------------------------------------------------------- queries


def sample_queries(meta: dict, kind: str = "groups") -> list[dict]:
    """The queries of one shard sample: ``[{"index", "box" (stored-image pixels), "refs"}]``.

    ``groups``: every merged region group with at least one non-empty reference caption.
    ``images``: the whole image, its full-image sentences as references (none: no query).
    """
    if kind == "groups":
        out = []
        for i, g in enumerate(meta.get("groups") or []):
            refs = [r for r in (g.get("refs") or []) if isinstance(r, str) and r.strip()]
            box = g.get("box")
            if refs and isinstance(box, (list, tuple)) and len(box) == 4:
                out.append({"index": i, "box": [float(v) for v in box], "refs": refs})
        return out
    if kind == "images":
        refs = [s.get("raw", "") for s in (meta.get("sentences") or [])]
        refs = [r for r in refs if isinstance(r, str) and r.strip()]
        if not refs:
            return []
        w, h = float(meta["width"]), float(meta["height"])
        return [{"index": 0, "box": [0.0, 0.0, w, h], "refs": refs}]
    raise DvsaError(f"region evaluation: queries must be one of {QUERY_KINDS}, got {kind!r}")


def expected_queries(manifest: Manifest, split: str, kind: str = "groups") -> Optional[int]:
    """How many queries the manifest says the split holds (groups, or images), if it lists the split."""
    if split not in manifest.splits:
        return None
    return manifest.split_count(split, "groups" if kind == "groups" else "images")


def query_id(image_id: Any, index: int) -> str:
    return f"{image_id}:{index}"


# --------------------------------------------------------------------------- the Ray Data job

_OUT_COLUMNS = ("qid", "key", "image_id", "index", "box", "caption", "logprob", "refs", "skip")


def _empty_columns() -> dict:
    return {"qid": np.array([], dtype=object), "key": np.array([], dtype=object),
            "image_id": np.array([], dtype=object), "index": np.zeros(0, np.int64),
            "box": np.zeros((0, 4), np.float64), "caption": np.array([], dtype=object),
            "logprob": np.zeros(0, np.float64), "refs": np.array([], dtype=object),
            "skip": np.array([], dtype=object)}


class RegionCaptionActor:
    """``map_batches`` actor: raw ``jpg``/``json`` rows -> one row per query (see ``_OUT_COLUMNS``).

    An image that cannot be read becomes one row with ``skip`` set to the reason (counted on the
    driver, never silently lost); every other row has ``skip == ""``.
    """

    def __init__(self, checkpoint_dir: str, queries: str = "groups", device: Optional[str] = None,
                 decode: Optional[CaptionDecode] = None, beam_size: Optional[int] = None,
                 tracking_uri: Optional[str] = None):
        # checkpoint_dir: a directory every node sees, or an MLflow model URI each actor resolves
        # into its own node's model cache (``tracking_uri``: the store that holds it)
        self.captioner = BoxCaptioner.from_checkpoint(checkpoint_dir, tracking_uri, device=device, decode=decode,
                                                      beam_size=beam_size)
        self.queries = queries

    def __call__(self, batch: dict) -> dict:
        images, frames, per_image, skipped = [], [], [], []
        for i in range(len(batch["__key__"])):
            key, data, meta, _ = parse_row(batch, i)
            if meta is None:
                skipped.append((key, BAD_JSON))
                continue
            queries = sample_queries(meta, self.queries)
            if not queries:
                continue
            try:
                img, (w, h) = self.captioner.prepare_image(data)
            except CorruptImage:
                skipped.append((key, "corrupt_image" if data else "missing_image"))
                continue
            images.append(img)
            frames.append(self.captioner.to_frame([q["box"] for q in queries], w, h))
            per_image.append((key, meta.get("image_id", key), queries))
        described = self.captioner.describe(images, frames) if images else []
        cols: dict[str, list] = {c: [] for c in _OUT_COLUMNS}
        for (key, image_id, queries), captions in zip(per_image, described):
            for q, (caption, lp) in zip(queries, captions):
                cols["qid"].append(query_id(image_id, q["index"]))
                cols["key"].append(key)
                cols["image_id"].append(str(image_id))
                cols["index"].append(q["index"])
                cols["box"].append(q["box"])
                cols["caption"].append(caption)
                cols["logprob"].append(lp)
                cols["refs"].append(json.dumps(q["refs"]))
                cols["skip"].append("")
        for key, reason in skipped:
            for c, v in (("qid", ""), ("key", key), ("image_id", ""), ("index", -1), ("box", [0.0] * 4),
                         ("caption", ""), ("logprob", 0.0), ("refs", "[]"), ("skip", reason)):
                cols[c].append(v)
        if not cols["qid"]:
            return _empty_columns()
        out = {c: np.array(v, dtype=object) for c, v in cols.items()}
        out["index"] = np.asarray(cols["index"], np.int64)
        out["box"] = np.asarray(cols["box"], np.float64).reshape(-1, 4)
        out["logprob"] = np.asarray(cols["logprob"], np.float64)
        return out


def prediction_dataset(checkpoint_dir: str, shards: str, split: str = "test", *, queries: str = "groups",
                       batch_size: int = 8, concurrency: int = 1, use_gpu: bool = False,
                       decode: Optional[CaptionDecode] = None, beam_size: Optional[int] = None,
                       tracking_uri: Optional[str] = None):
    """The streaming Ray Dataset of predictions (one row per query), in shard order.
    ``checkpoint_dir``: a checkpoint directory every node sees, or an MLflow model URI
    (``runs:/``, ``models:/``: each actor downloads it from ``tracking_uri``)."""
    import ray

    if queries not in QUERY_KINDS:
        raise DvsaError(f"region evaluation: queries must be one of {QUERY_KINDS}, got {queries!r}")
    paths = dataset_paths(shards, split)
    ds = ray.data.read_webdataset(paths, decoder=None, suffixes=["jpg", "json"])
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        RegionCaptionActor, fn_constructor_args=(str(checkpoint_dir), queries, "cuda" if use_gpu else "cpu",
                                                 decode, beam_size, tracking_uri),
        batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
        num_gpus=1 if use_gpu else 0, num_cpus=1, zero_copy_batch=True)


@dataclass
class RegionEvalResult:
    metrics: dict                           # "region/METEOR", ... (or "fullframe/...")
    predictions: list = field(default_factory=list)   # dicts: qid, key, image_id, index, box, caption, logprob, refs
    images: int = 0                         # images that produced queries
    expected: Optional[int] = None          # queries the manifest announces (uncapped runs)
    skipped: dict = field(default_factory=dict)       # images skipped, by reason
    capped: bool = False                    # stopped at max_queries

    @property
    def queries(self) -> int:
        return len(self.predictions)


def collect_predictions(ds, max_queries: Optional[int] = None, batch_size: int = 256
                        ) -> tuple[list[dict], Counter, bool]:
    """Rows of the prediction dataset (stopping the stream after ``max_queries``), skip counts."""
    preds: list[dict] = []
    skipped: Counter = Counter()
    capped = False
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for i in range(len(batch["qid"])):
            if batch["skip"][i]:
                skipped[str(batch["skip"][i])] += 1
                log.warning("region evaluation: skipped image %s (%s)", batch["key"][i], batch["skip"][i])
                continue
            preds.append({"qid": str(batch["qid"][i]), "key": str(batch["key"][i]),
                          "image_id": str(batch["image_id"][i]), "index": int(batch["index"][i]),
                          "box": [float(v) for v in batch["box"][i]], "caption": str(batch["caption"][i]),
                          "logprob": float(batch["logprob"][i]), "refs": json.loads(batch["refs"][i])})
            if max_queries and len(preds) >= max_queries:
                capped = True
                break
        if capped:
            break
    return preds, skipped, capped


def score_predictions(preds: Sequence[dict], prefix: str = "region", num_actors: int = 2,
                      actor_num_cpus: float = 1.0) -> dict[str, float]:
    """Corpus-level metrics of the predictions, named ``<prefix>/<metric>``."""
    if not preds:
        raise DataError("region evaluation: no queries to score (no groups in the split's shards?)")
    refs = {p["qid"]: p["refs"] for p in preds}
    hyps = {p["qid"]: p["caption"] for p in preds}
    if len(refs) != len(preds):
        dup = Counter(p["qid"] for p in preds).most_common(1)[0][0]
        raise DataError(f"region evaluation: query id {dup!r} occurs twice (duplicate image ids in the shards?)")
    scores = score_parallel(refs, hyps, num_actors=num_actors, actor_num_cpus=actor_num_cpus)
    return {f"{prefix}/{k}": float(v) for k, v in scores.items()}


@dataclass
class RegionEvalOptions:
    """How :func:`evaluate_regions` runs."""

    queries: str = "groups"                  # "groups" (region/...) or "images" (fullframe/...)
    max_queries: Optional[int] = None        # the first N queries in shard order (quick runs)
    batch_size: int = 8                      # images per captioning call
    concurrency: int = 1                     # captioning actors (one model each)
    use_gpu: Optional[bool] = None           # one GPU per actor; None: when the cluster has a GPU
    num_meteor_actors: int = 2               # Ray actors (JVMs) computing METEOR
    meteor_actor_cpus: float = 1.0
    decode: Optional[CaptionDecode] = "beam"  # None: the checkpoint's caption.decode
    beam_size: Optional[int] = None          # None: the checkpoint's caption.beam_size


def evaluate_regions(checkpoint: str, shards: str, split: str = "test",
                     options: Optional[RegionEvalOptions] = None,
                     tracking_uri: Optional[str] = None) -> RegionEvalResult:
    """Caption every query of ``split`` with the checkpoint's captioner and score the captions.

    ``checkpoint``: anything :func:`dvsa.inference.checkpoints.load_trained` accepts; it is resolved
    to a directory on the driver and loaded by every actor (an MLflow model URI is resolved by
    every actor from ``tracking_uri``, so actors on other nodes need no shared path). Needs a
    connected Ray.
    """
    import ray

    o = options or RegionEvalOptions()
    check_java()
    ckpt = resolve_checkpoint(checkpoint, tracking_uri)
    if o.max_queries is not None and o.max_queries < 1:
        raise DvsaError(f"max queries must be >= 1, got {o.max_queries}")
    manifest = Manifest.read(shards)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if o.use_gpu is None else o.use_gpu
    queries = o.queries
    model_uri = tracking.is_model_uri(checkpoint)
    ds = prediction_dataset(checkpoint if model_uri else str(ckpt), shards, split, queries=queries,
                            batch_size=o.batch_size, concurrency=o.concurrency, use_gpu=use_gpu, decode=o.decode,
                            beam_size=o.beam_size, tracking_uri=tracking_uri)
    preds, skipped, capped = collect_predictions(ds, o.max_queries)
    metrics = score_predictions(preds, METRIC_PREFIX[queries], o.num_meteor_actors, o.meteor_actor_cpus)
    prefix = METRIC_PREFIX[queries]
    metrics[f"{prefix}/queries"] = float(len(preds))
    images = len({p["key"] for p in preds})
    expected = None if capped else expected_queries(manifest, split, queries)
    if expected is not None and not skipped and expected != len(preds):
        log.warning("region evaluation: %d queries scored, the manifest announces %d for %s",
                    len(preds), expected, split)
    return RegionEvalResult(metrics=metrics, predictions=preds, images=images, expected=expected,
                            skipped=dict(skipped), capped=capped)


# --------------------------------------------------------------------------- pictures and tables


def iter_images(shards: str, split: str, keys: Sequence[str]) -> Iterator[tuple[str, bytes, dict]]:
    """``(key, jpg, meta)`` of the given sample keys (read in shard order, stops when all found)."""
    wanted = set(keys)
    for key, jpg, meta in iter_samples(shards, split):
        if key in wanted:
            wanted.discard(key)
            yield key, jpg, meta
            if not wanted:
                return


def draw_examples(result: RegionEvalResult, shards: str, split: str, out_dir: str | Path,
                  n_images: int = 3) -> list[Path]:
    """Fig. 10 for the first ``n_images`` images: their query boxes captioned, sorted by log prob."""
    import io

    from PIL import Image

    by_key: dict[str, list[dict]] = {}
    for p in result.predictions:
        if p["key"] not in by_key and len(by_key) >= n_images:
            continue
        by_key.setdefault(p["key"], []).append(p)
    paths = []
    for key, jpg, meta in iter_images(shards, split, list(by_key)):
        preds = by_key[key]
        with Image.open(io.BytesIO(jpg)) as im:
            image = im.convert("RGB")
        path = Path(out_dir) / f"regions_{key}.png"
        paths.append(draw_region_captions(image, [p["box"] for p in preds], [p["caption"] for p in preds],
                                          [p["logprob"] for p in preds], path,
                                          title=f"image {meta.get('image_id', key)}: {len(preds)} regions"))
    return paths


def sample_table(preds: Sequence[dict], n: int = 50) -> list[dict]:
    """Rows for an MLflow table: the first ``n`` queries with caption, log prob, references."""
    return [{"image_id": p["image_id"], "group": p["index"], "box": json.dumps([round(v, 1) for v in p["box"]]),
             "generated": p["caption"], "logprob": round(p["logprob"], 4), "references": " | ".join(p["refs"])}
            for p in preds[:n]]
