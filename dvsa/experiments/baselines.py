"""Table 4: BLEU on region annotations for the ranking (nearest-neighbour) baseline, the
full-frame captioner and the region captioner trained on inferred snippets, in one table.

The ranking baseline (section 4.3) "retrieves training sentence substrings most compatible
with each region as judged by the BRNN model": every unique training snippet (the regions of
the snippet shards written by :mod:`dvsa.experiments.snippets`, or any shards' region
captions) is embedded once as its own sentence (s_t, eq. 2-6); each test region group's box
is embedded (v, eq. 1); the caption is the candidate with the highest compatibility::

    score(region, snippet) = 1/|snippet| sum_t v^T s_t

(the per-word mean, as the paper ranks regions for a text query in Fig. 7; ``per_word=False``
uses the plain sum of eq. 8 with one region, which favours long snippets).

The queries and references are exactly those of region evaluation
(:func:`dvsa.evaluation.regions.sample_queries`: every merged group of the split, its
captions as references), so the captioners' rows come from
:func:`dvsa.evaluation.regions.evaluate_regions` and all rows are comparable.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from dvsa import tracking
from dvsa.config import CaptionDecode, Config
from dvsa.data.shards import iter_samples
from dvsa.errors import DataError, DvsaError
from dvsa.evaluation.captions import CaptionScorer, prepare
from dvsa.evaluation.regions import RegionEvalOptions, evaluate_regions, query_id, sample_queries, score_predictions
from dvsa.inference.alignment import decode_images, embed_decoded, encode_sentences
from dvsa.inference.checkpoints import load_trained
from dvsa.text import Vocab

log = logging.getLogger(__name__)

TABLE4_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "CIDEr", "ROUGE_L")
NN_ROW = "Nearest neighbour (ranking)"


# --------------------------------------------------------------------------- ranking core


def rank_snippets(v: Tensor, s: Tensor, s_mask: Tensor, per_word: bool = True,
                  chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """The most compatible candidate per region: v float[G,h] (one region each), s float[C,T,h]
    with s_mask bool[C,T] (candidate snippets) -> ``(best long[G], score float[G])``.

    score[g, c] = sum_t v_g^T s_ct over the candidate's words (divided by its length when
    ``per_word``). Ties go to the lowest candidate index. Candidates are scored ``chunk`` at
    a time, so memory stays at G x chunk.
    """
    if v.dim() != 2 or s.dim() != 3 or s_mask.shape != s.shape[:2]:
        raise ValueError(f"need v [G,h], s [C,T,h], s_mask [C,T]; got {tuple(v.shape)}, "
                         f"{tuple(s.shape)}, {tuple(s_mask.shape)}")
    if s.shape[0] == 0:
        raise ValueError("no candidate snippets to rank")
    G = v.shape[0]
    best = torch.zeros(G, dtype=torch.long)
    best_score = torch.full((G,), float("-inf"))
    for c0 in range(0, s.shape[0], chunk):
        sc = s[c0:c0 + chunk] * s_mask[c0:c0 + chunk, :, None]            # [c, T, h]
        total = torch.einsum("gh,cth->gc", v.float(), sc.float())           # [G, c]
        if per_word:
            total = total / s_mask[c0:c0 + chunk].sum(dim=1).clamp(min=1)[None, :]
        val, idx = total.max(dim=1)                                         # first max on ties
        better = val > best_score
        best = torch.where(better, idx + c0, best)
        best_score = torch.where(better, val, best_score)
    return best, best_score


def snippet_candidates(shards: str, split: str = "train", max_candidates: Optional[int] = None
                       ) -> list[tuple[str, ...]]:
    """Unique region captions (token tuples) of ``split``, most frequent first (ties: first seen)."""
    counts: Counter = Counter()
    order: dict[tuple, int] = {}
    for _, _, meta in iter_samples(shards, split):
        for r in meta.get("regions") or []:
            toks = r.get("tokens")
            if isinstance(toks, list) and toks:
                t = tuple(str(w) for w in toks)
                counts[t] += 1
                order.setdefault(t, len(order))
    if not counts:
        raise DataError(f"{shards}: no {split} region captions to retrieve from")
    ranked = sorted(counts, key=lambda t: (-counts[t], order[t]))
    return ranked[:max_candidates] if max_candidates else ranked


def embed_candidates(model, vocab: Vocab, candidates: Sequence[Sequence[str]], batch: int = 512
                     ) -> tuple[Tensor, Tensor]:
    """Each candidate embedded as its own sentence: ``(s float[C,T,h], s_mask bool[C,T])``."""
    T = max(len(c) for c in candidates)
    parts, masks = [], []
    with torch.no_grad():
        for i in range(0, len(candidates), batch):
            tokens, lengths = encode_sentences(vocab, candidates[i:i + batch])
            s, m = model.embed_words(tokens, lengths)
            pad = T - s.shape[1]
            parts.append(torch.nn.functional.pad(s.float(), (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(m, (0, pad)))
    return torch.cat(parts), torch.cat(masks)


def nn_baseline_predictions(model, vocab: Vocab, cfg: Config, candidates: Sequence[Sequence[str]], region_shards: str,
                            split: str = "test", *, per_word: bool = True, max_queries: Optional[int] = None,
                            batch_images: int = 16) -> tuple[list[dict], dict]:
    """The ranking baseline's caption for every query (region group) of ``split``:
    ``(predictions, skipped)``; predictions are dicts like region evaluation's (``qid``,
    ``key``, ``image_id``, ``index``, ``box``, ``caption``, ``refs``) plus ``score``."""
    if cfg.task != "align":
        raise DvsaError(f"the ranking baseline needs an alignment model, got a {cfg.task!r} checkpoint")
    s, s_mask = embed_candidates(model, vocab, candidates)
    preds: list[dict] = []
    skipped: Counter = Counter()
    pending: list = []

    def flush():
        if not pending:
            return
        decoded = decode_images([p[1] for p in pending], [[q["box"] for q in p[3]] for p in pending],
                                cfg.data.image_size, cfg.data.jpeg_decoder)
        if decoded.corrupt:
            skipped["corrupt_image"] += len(decoded.corrupt)
        pending[:] = [pending[j] for j in decoded.kept]
        if not pending:
            return
        v, vm = embed_decoded(model, decoded)
        best, score = rank_snippets(v[vm], s, s_mask, per_word=per_word)    # one row per query, in order
        g = 0
        for key, _, image_id, queries in pending:
            for q in queries:
                preds.append({"qid": query_id(image_id, q["index"]), "key": key, "image_id": str(image_id),
                              "index": q["index"], "box": q["box"], "caption": " ".join(candidates[int(best[g])]),
                              "refs": q["refs"], "score": float(score[g])})
                g += 1
        pending.clear()

    for key, jpg, meta in iter_samples(region_shards, split):
        if max_queries and len(preds) + sum(len(p[3]) for p in pending) >= max_queries:
            break
        queries = sample_queries(meta, "groups")
        if not queries:
            continue
        if not jpg:
            skipped["missing_image"] += 1
            continue
        pending.append((key, jpg, meta.get("image_id", key), queries))
        if len(pending) >= batch_images:
            flush()
    flush()
    if max_queries:
        preds = preds[:max_queries]
    return preds, dict(skipped)


# --------------------------------------------------------------------------- scoring and the table


def score_predictions_local(preds: Sequence[dict], scorer=None, metrics: str = "all",
                            tokenizer: str = "ptb") -> dict[str, float]:
    """Corpus-level scores of predictions in this process (no Ray).

    ``metrics="all"``: BLEU-1..4, METEOR, ROUGE-L, CIDEr with one
    :class:`~dvsa.evaluation.captions.CaptionScorer` (``scorer``, or a new one);
    ``metrics="bleu"``: BLEU-1..4 only, Table 4's columns (no METEOR JVM; with
    ``tokenizer="none"`` no Java at all, for captions that are already lower-case words).
    """
    if not preds:
        raise DataError("no predictions to score")
    refs = {p["qid"]: list(p["refs"]) for p in preds}
    hyps = {p["qid"]: p["caption"] for p in preds}
    if len(refs) != len(preds):
        raise DataError("duplicate query ids among the predictions")
    if metrics == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        gts, res, _ = prepare(refs, hyps, tokenizer)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    if metrics != "all":
        raise DvsaError(f"metrics must be 'all' or 'bleu', got {metrics!r}")
    if scorer is not None:
        return scorer.score(refs, hyps)
    with CaptionScorer(tokenizer=tokenizer) as sc:
        return sc.score(refs, hyps)


def table4_rows(results: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """``{row name: {"Bleu_1": ..., or "region/Bleu_1": ...}}`` -> table rows (BLEU in percent,
    as the paper prints them; METEOR/CIDEr/ROUGE-L as fractions)."""
    rows = []
    for name, metrics in results.items():
        m = {k.split("/", 1)[-1]: float(v) for k, v in metrics.items()}
        row = {"model": name}
        for k in TABLE4_METRICS:
            if k in m:
                row[k] = round(100.0 * m[k], 1) if k.startswith("Bleu") else round(m[k], 3)
        rows.append(row)
    return rows


def format_markdown(rows: Sequence[dict]) -> str:
    cols = ["model"] + [k for k in TABLE4_METRICS if any(k in r for r in rows)]
    head = {"Bleu_1": "B-1", "Bleu_2": "B-2", "Bleu_3": "B-3", "Bleu_4": "B-4"}
    lines = ["| " + " | ".join(head.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_table(rows: Sequence[dict], out_dir: str | Path, name: str = "table4") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / f"{name}.md", out / f"{name}.csv"
    md.write_text(format_markdown(rows) + "\n")
    cols = ["model"] + [k for k in TABLE4_METRICS if any(k in r for r in rows)]
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return md, cs


def run_table4(region_shards: str, *, captioners: Mapping[str, str], align_checkpoint: Optional[str] = None,
               candidate_shards: Optional[str] = None, split: str = "test", max_queries: Optional[int] = None,
               out_dir: str = "runs/table4", tracking_uri: Optional[str] = None, experiment: str = "dvsa",
               decode: Optional[CaptionDecode] = "beam") -> dict:
    """Table 4 on ``split`` of ``region_shards`` (VG: region annotations): one row per
    captioner checkpoint (``{"RNN: full frame": ckpt, "RNN: region (snippets)": ckpt}``) and,
    with ``align_checkpoint`` + ``candidate_shards`` (the snippet shards), the ranking baseline.
    Needs a connected Ray (captioner rows run region evaluation's Ray Data job). Writes
    ``table4.md`` / ``table4.csv`` under ``out_dir`` and logs them, with ``table4/<row>/<metric>``
    metrics, to one MLflow run (tag ``task=table4``); returns ``{"rows", "run_id", "paths"}``."""
    results: dict[str, dict] = {}
    counts: dict[str, int] = {}
    if align_checkpoint:
        if not candidate_shards:
            raise DvsaError("the ranking baseline needs candidate snippets: pass candidate_shards (snippet shards)")
        model, vocab, cfg = load_trained(align_checkpoint, tracking_uri)
        preds, skipped = nn_baseline_predictions(model, vocab, cfg, snippet_candidates(candidate_shards), region_shards,
                                                 split, max_queries=max_queries)
        if skipped:
            log.warning("table 4, ranking baseline: skipped images %s", skipped)
        results[NN_ROW] = score_predictions(preds, prefix="region", num_actors=1)
        counts[NN_ROW] = len(preds)
    for name, ckpt in captioners.items():
        r = evaluate_regions(ckpt, region_shards, split, RegionEvalOptions(
            max_queries=max_queries, num_meteor_actors=1, decode=decode), tracking_uri=tracking_uri)
        results[name] = {k: v for k, v in r.metrics.items() if not k.endswith("/queries")}
        counts[name] = r.queries
    if len(set(counts.values())) > 1:
        log.warning("table 4: rows scored different numbers of queries: %s", counts)
    rows = table4_rows(results)
    for r in rows:
        r["queries"] = counts[r["model"]]
    md, cs = write_table(rows, out_dir)
    print(format_markdown(rows), flush=True)
    uri = tracking_uri or tracking.tracking_uri(out_dir)
    logger, _ = tracking.start_run(uri, experiment, "table4", {"task": "table4", "split": split})
    try:
        metrics = {}
        for name, m in results.items():
            slug = _slug(name)
            metrics.update({f"table4/{slug}/{k.split('/', 1)[-1]}": v for k, v in m.items()})
        logger.log_metrics(metrics, step=0)
        logger.log_params({"region_shards": region_shards, "candidate_shards": candidate_shards, "split": split,
                           "max_queries": max_queries, "align_checkpoint": align_checkpoint,
                           **{f"captioner.{_slug(k)}": v for k, v in captioners.items()}})
        logger.log_artifact(md, "tables")
        logger.log_artifact(cs, "tables")
        (Path(out_dir) / "table4.json").write_text(json.dumps(rows, indent=2))
        logger.end("FINISHED")
    except BaseException:
        logger.end("FAILED")
        raise
    return {"rows": rows, "run_id": logger.run_id, "paths": [str(md), str(cs)]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
