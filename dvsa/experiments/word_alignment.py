"""Word-to-region alignment accuracy on ``dvsa synth`` data, where the true boxes are known.

``truth.json`` records, for every full sentence, the object each token names (-1 for none).
A word that names object o counts as correctly aligned when the box the model aligns it to
overlaps o's true box at IoU >= 0.5. Two alignments are scored from the same unary
``v_i^T s_t``:

- ``argmax``: each word its own best box (the MRF with beta = 0);
- ``mrf``: Viterbi with ``align.mrf_beta`` (eq. 10-12), the snippets used for training.

Chance is the expected accuracy of a box drawn uniformly among the candidates the model
chooses from (the whole image + proposals, or the proposals only with
``align.whole_image=false``): ``align/word_acc_chance``; drawn among the proposals only:
``align/word_acc_chance_proposals`` (the figure a detector-only baseline
would quote). No real dataset can give these numbers; the synthetic world can.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from dvsa import tracking
from dvsa.boxes import iou
from dvsa.config import Config
from dvsa.data.shards import iter_samples
from dvsa.errors import DataError, DvsaError
from dvsa.files import load_json
from dvsa.inference.alignment import align_sentences, alignment_boxes, decode_images, embed_decoded, encode_sentences
from dvsa.inference.alignment_figure import alignment_figure, first_sample
from dvsa.inference.checkpoints import load_trained, resolve_checkpoint
from dvsa.models.alignment import AlignmentModel
from dvsa.models.mrf import viterbi_align
from dvsa.text import Vocab

log = logging.getLogger(__name__)

IOU_CORRECT = 0.5
METRIC_PREFIX = "align/"


@dataclass
class WordAlignmentResult:
    acc_argmax: float               # fraction of object words aligned to their object's box, beta = 0
    acc_mrf: float                  # the same after MRF smoothing (beta)
    chance: float                   # uniform over all candidate boxes (whole image included)
    chance_proposals: float         # uniform over the proposals only
    beta: float
    words: int                      # object-naming words scored
    sentences: int
    images: int
    no_evidence: float = 0.0        # fraction of object words whose scores v_i^T s_t tie over every box
    by_role: dict = field(default_factory=dict)   # role -> {"argmax", "mrf", "no_evidence", "words"}
    skipped: dict = field(default_factory=dict)   # reason -> count (images or sentences not scored)

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics: ``align/word_acc_argmax``, ``align/word_acc_mrf``, chance, ..."""
        m = {f"{METRIC_PREFIX}word_acc_argmax": self.acc_argmax, f"{METRIC_PREFIX}word_acc_mrf": self.acc_mrf,
             f"{METRIC_PREFIX}word_acc_chance": self.chance,
             f"{METRIC_PREFIX}word_acc_chance_proposals": self.chance_proposals,
             f"{METRIC_PREFIX}word_acc_words": float(self.words),
             f"{METRIC_PREFIX}word_no_evidence": self.no_evidence}
        for role, r in self.by_role.items():
            m[f"{METRIC_PREFIX}word_acc_mrf_{role}"] = r["mrf"]
            m[f"{METRIC_PREFIX}word_no_evidence_{role}"] = r["no_evidence"]
        return m

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- pure scoring


def word_hits(assign_row: Sequence[int], boxes: Sequence[Sequence[float]], word_objects: Sequence[int],
              true_boxes: Sequence[Sequence[float]], threshold: float = IOU_CORRECT) -> list[tuple[int, bool]]:
    """``[(t, correct)]`` for every word t that names an object (``word_objects[t] >= 0``):
    correct when ``boxes[assign_row[t]]`` has IoU >= threshold with that object's true box."""
    out = []
    for t, o in enumerate(word_objects):
        if o < 0:
            continue
        a = int(assign_row[t])
        out.append((t, 0 <= a < len(boxes) and iou(boxes[a], true_boxes[o]) >= threshold))
    return out


def chance_hit_rate(boxes: Sequence[Sequence[float]], true_box: Sequence[float],
                    threshold: float = IOU_CORRECT) -> float:
    """Probability that a box drawn uniformly from ``boxes`` matches ``true_box``."""
    if not boxes:
        return 0.0
    return sum(iou(b, true_box) >= threshold for b in boxes) / len(boxes)


def no_evidence(unary_row: torch.Tensor, region_mask: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """bool[N]: the words whose scores over the usable boxes all tie (``s_t = 0`` after the
    ReLU of eq. 6, typically): the word carries no evidence for any box, its argmax is an
    arbitrary tie-break and only the MRF's smoothing places it.

    unary_row float[N, M] (``v_i^T s_t``), region_mask bool[M]."""
    u = unary_row[:, region_mask]                                    # [N, M']
    spread = u.max(dim=1).values - u.min(dim=1).values
    scale = u.abs().max(dim=1).values.clamp(min=1.0)
    return spread <= rel_tol * scale


def accuracy(hits: Sequence[bool]) -> float:
    return sum(bool(h) for h in hits) / len(hits) if hits else 0.0


# --------------------------------------------------------------------------- truth


def load_truth(world: str | os.PathLike) -> dict[int, dict]:
    """``truth.json`` of a synthetic world (the file or its directory): image_id -> entry."""
    p = Path(world)
    p = p / "truth.json" if p.is_dir() else p
    data = load_json(str(p), "no such file (word alignment accuracy needs a `dvsa synth` world)")
    try:
        return {int(im["image_id"]): im for im in data["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{p}: not a dvsa synth truth file ({type(e).__name__}: {e})") from None


def true_boxes_in_frame(truth_image: dict, width: int, height: int) -> list[list[float]]:
    """The objects' true boxes scaled into the stored JPEG's ``width x height`` (prepare may
    have downscaled it)."""
    sx, sy = width / float(truth_image["width"]), height / float(truth_image["height"])
    return [[o["box"][0] * sx, o["box"][1] * sy, o["box"][2] * sx, o["box"][3] * sy]
            for o in truth_image["objects"]]


def match_sentences(sentences: Sequence[dict], truth_sentences: Sequence[dict]) -> list[Optional[dict]]:
    """For each shard sentence, the truth sentence with the same tokens (each used once), or None."""
    pool = list(truth_sentences)
    out = []
    for s in sentences:
        hit = next((i for i, ts in enumerate(pool) if ts["tokens"] == s.get("tokens")), None)
        out.append(pool.pop(hit) if hit is not None else None)
    return out


# --------------------------------------------------------------------------- the evaluation


class _Tally:
    """Hits per alignment (``argmax``, ``mrf``) and no-evidence flags, overall and per word role,
    and the chance rates of the same words."""

    def __init__(self, whole_image: bool):
        self.whole_image = whole_image
        self.hits: dict[str, list] = {"argmax": [], "mrf": [], "no_evidence": []}
        self.roles: dict[str, dict[str, list]] = {}
        self.chance: list[float] = []
        self.chance_prop: list[float] = []
        self.images = self.sentences = 0

    def add(self, boxes: list, ts: dict, true_boxes: list, assign: dict[str, list], unary: torch.Tensor,
            region_mask: torch.Tensor) -> None:
        """One sentence: ``assign[name]`` its box per word, ``unary float[N, M]`` its scores."""
        role_of = ts.get("roles") or ["other"] * len(ts["objects"])
        for name in ("argmax", "mrf"):
            for t, ok in word_hits(assign[name], boxes, ts["objects"], true_boxes):
                self._hit(name, role_of[t], ok)
        flat = no_evidence(unary[:len(ts["objects"])], region_mask).tolist()
        props = boxes[1:] if self.whole_image else boxes
        for t, o in enumerate(ts["objects"]):
            if o >= 0:
                self._hit("no_evidence", role_of[t], flat[t])
                self.chance.append(chance_hit_rate(boxes, true_boxes[o]))
                self.chance_prop.append(chance_hit_rate(props, true_boxes[o]))
        self.sentences += 1

    def _hit(self, name: str, role: str, ok: bool) -> None:
        self.hits[name].append(ok)
        self.roles.setdefault(role, {"argmax": [], "mrf": [], "no_evidence": []})[name].append(ok)

    def result(self, beta: float, skipped: Counter) -> WordAlignmentResult:
        h = self.hits
        return WordAlignmentResult(
            acc_argmax=accuracy(h["argmax"]), acc_mrf=accuracy(h["mrf"]),
            chance=sum(self.chance) / len(self.chance),
            chance_proposals=sum(self.chance_prop) / len(self.chance_prop), beta=beta,
            words=len(h["mrf"]), sentences=self.sentences, images=self.images,
            no_evidence=accuracy(h["no_evidence"]),
            by_role={r: {"argmax": accuracy(x["argmax"]), "mrf": accuracy(x["mrf"]),
                         "no_evidence": accuracy(x["no_evidence"]), "words": len(x["mrf"])}
                     for r, x in sorted(self.roles.items())},
            skipped=dict(skipped))


def _truth_samples(shards: str, split: str, truth: dict[int, dict], cfg: Config, skipped: Counter,
                   max_images: Optional[int]) -> Iterator[tuple[bytes, list, list, list]]:
    """``(jpg, candidate boxes, [(sentence, truth sentence)], true boxes in the stored frame)``
    of every image of ``split`` with a truth entry and at least one matched sentence."""
    for seen, (_, jpg, meta) in enumerate(iter_samples(shards, split)):
        if max_images is not None and seen >= max_images:
            return
        t = truth.get(_as_int(meta.get("image_id")))
        if t is None:
            skipped["image_not_in_truth"] += 1
            continue
        if not jpg:
            skipped["missing_image"] += 1
            continue
        sents = [s for s in meta.get("sentences") or [] if s.get("tokens")]
        pairs = []
        for s, ts in zip(sents, match_sentences(sents, t["sentences"])):
            if ts is None:
                skipped["sentence_not_in_truth"] += 1
            else:
                pairs.append((s, ts))
        if not pairs:
            skipped["no_sentence"] += 1
            continue
        boxes = alignment_boxes(meta, cfg.data.max_regions, cfg.align.whole_image)
        yield jpg, boxes, pairs, true_boxes_in_frame(t, int(meta["width"]), int(meta["height"]))


def _score_batch(model: AlignmentModel, vocab: Vocab, cfg: Config, batch: list, beta: float, tally: _Tally,
                 skipped: Counter) -> None:
    """Align every sentence of the batch's images (argmax and MRF) and add it to ``tally``."""
    decoded = decode_images([b[0] for b in batch], [b[1] for b in batch], cfg.data.image_size,
                            cfg.data.jpeg_decoder)
    if decoded.corrupt:
        skipped["corrupt_image"] += len(decoded.corrupt)
    batch = [batch[j] for j in decoded.kept]
    if not batch:
        return
    v, vm = embed_decoded(model, decoded)
    sentences = [(i, s, ts) for i, (_, _, pairs, _) in enumerate(batch) for s, ts in pairs]
    tokens, lengths = encode_sentences(vocab, [s["tokens"] for _, s, _ in sentences])
    sent_img = torch.tensor([i for i, _, _ in sentences], dtype=torch.long)
    a_mrf, unary = align_sentences(model, v, vm, sent_img, tokens, lengths, beta)
    vm_l = vm[sent_img]
    a_arg = viterbi_align(unary, lengths, vm_l, 0.0)
    for k, (i, _, ts) in enumerate(sentences):
        _, boxes, _, true_boxes = batch[i]
        tally.add(boxes, ts, true_boxes, {"argmax": a_arg[k].tolist(), "mrf": a_mrf[k].tolist()}, unary[k], vm_l[k])
    tally.images += len(batch)


def word_alignment_accuracy(model: AlignmentModel, vocab: Vocab, cfg: Config, shards: str,
                            truth: dict[int, dict], split: str = "test", beta: Optional[float] = None,
                            batch_size: int = 16, max_images: Optional[int] = None) -> WordAlignmentResult:
    """Score the alignment model on ``split`` of a synth world's Karpathy shards."""
    beta = float(cfg.align.mrf_beta if beta is None else beta)
    tally = _Tally(cfg.align.whole_image)
    skipped: Counter = Counter()
    batch: list = []
    for item in _truth_samples(shards, split, truth, cfg, skipped, max_images):
        batch.append(item)
        if len(batch) >= batch_size:
            _score_batch(model, vocab, cfg, batch, beta, tally, skipped)
            batch = []
    if batch:
        _score_batch(model, vocab, cfg, batch, beta, tally, skipped)
    if not tally.hits["mrf"]:
        raise DataError(f"{shards}: no {split} sentence with object words matched {len(truth)} truth images "
                        f"(skipped: {dict(skipped) or 'none'}); are these the shards of this synth world?")
    if skipped:
        log.warning("word alignment: not scored: %s", ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    return tally.result(beta, skipped)


def _as_int(v) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- MLflow


def evaluate_word_alignment(checkpoint: str, world: str, shards: str, *, split: str = "test",
                            beta: Optional[float] = None, out_dir: Optional[str] = None,
                            tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                            experiment: Optional[str] = None, max_images: Optional[int] = None) -> dict:
    """Score a trained alignment model on a synth world, log the metrics and the Fig. 5
    picture to its MLflow run (found by run id or checkpoint tag; a new run in ``experiment``
    when there is none), write them under ``out_dir``; return ``{"result", "run_id", "figure"}``."""
    resolved = resolve_checkpoint(checkpoint, tracking_uri)
    model, vocab, cfg = load_trained(str(resolved))
    if cfg.task != "align" or not isinstance(model, AlignmentModel):
        raise DvsaError(f"{checkpoint}: a {cfg.task!r} checkpoint; word alignment needs an alignment model")
    if model.encoder is None:
        raise DvsaError(f"{checkpoint}: trained on precomputed features; word alignment needs the model's CNN")
    result = word_alignment_accuracy(model, vocab, cfg, shards, load_truth(world), split, beta,
                                     max_images=max_images)
    out = Path(out_dir or cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "word_alignment.json").write_text(json.dumps(result.as_dict(), indent=2))
    _, jpg, meta = first_sample(shards, split)
    figure = alignment_figure(model, vocab, cfg, jpg, meta, out / "fig5_alignment.png", beta=result.beta)
    uri = tracking_uri or tracking.tracking_uri(out, cfg.mlflow.tracking_uri)
    rid = run_id or tracking.find_checkpoint_run(uri, checkpoint, resolved)
    if rid is None:
        logger, _ = tracking.start_run(uri, experiment or cfg.mlflow.experiment, "word-alignment",
                                       {"task": "align", tracking.CHECKPOINT_TAG: str(resolved)})
        logger.log_params({"align.mrf_beta": result.beta, "split": split})
        rid = logger.run_id
        logger.log_metrics(result.metrics(), step=0)
        logger.log_artifact(figure, "figures")
        logger.log_artifact(out / "word_alignment.json", "eval")
        logger.end("FINISHED")
    else:
        logger = tracking.RunLogger(uri, rid)
        logger.log_metrics(result.metrics(), step=0)
        logger.log_artifact(figure, "figures")
        logger.log_artifact(out / "word_alignment.json", "eval")
    log.info("word alignment (%s, %d words): argmax %.3f, MRF(beta=%g) %.3f, chance %.3f, "
             "no evidence %.3f -> run %s", split, result.words, result.acc_argmax, result.beta, result.acc_mrf,
             result.chance, result.no_evidence, rid)
    return {"result": result, "run_id": rid, "figure": str(figure)}
