"""Exact expectations for the end-to-end tests (imported by tests/test_train.py,
test_fault_tolerance.py, test_cluster_rehearsal.py, test_tune.py; not collected itself).

Everything here is computed from the inputs of a run, never from the run's own output:

* :func:`split_count` / :func:`steps_per_epoch`: from the shard set's ``manifest.json``
  (full batches per worker per epoch, as the train loop draws them with ``drop_last``);
* :func:`validation_captions`: the (image id, reference) rows a captioner validates on, read
  straight from the validation shards (tar + json, no Ray, no dvsa reader);
* :func:`coco_caption_scores`: pycocoevalcap 1.2 called directly on a run's own predictions;
* :func:`retrieval_by_hand`: R@K and median rank from a full score matrix, by counting.
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


# --------------------------------------------------------------------------- from the manifest


def manifest(root) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


def split_count(root, split: str, key: str = "images") -> int:
    return int(manifest(root)["splits"][split][key])


def steps_per_epoch(root, batch_size: int, workers: int = 1) -> int:
    """Optimizer steps of one epoch: each of ``workers`` ranks gets ``images // workers`` rows
    and steps once per full batch."""
    return (split_count(root, "train") // workers) // batch_size


def checkpoint_epochs(epochs: int, every: int = 1) -> list[int]:
    return [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]


# --------------------------------------------------------------------------- from the shards


def shard_samples(root, split: str) -> list[dict]:
    """The json of every sample of ``split``, in read order (shards by name, members in tar order)."""
    names = sorted(s["name"] for s in manifest(root)["shards"] if s["split"] == split)
    out = []
    for name in names:
        with tarfile.open(Path(root) / name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out.append(json.loads(tar.extractfile(m).read()))
    return out


def _reference(tokens, vocab, max_len: int) -> str:
    """What the loop decodes from a target row: the first max_len - 2 tokens, unknown words dropped."""
    from dvsa.text import SPECIALS

    return " ".join(w for w in list(tokens)[: max_len - 2] if vocab.stoi.get(w, 0) >= len(SPECIALS))


def validation_captions(root, mode: str, max_images: int, rows_per_image: int, max_len: int, vocab
                        ) -> list[tuple[int, str]]:
    """``[(image_id, reference)]`` of a captioner's unshuffled validation pass: the first
    ``max_images`` val images that make a row; region mode: the first ``rows_per_image``
    regions with tokens of each, full-frame mode: the first sentence; empty references skipped."""
    out, images = [], 0
    for meta in shard_samples(root, "val"):
        if images == max_images:
            break
        if mode == "region":
            caps = [r["tokens"] for r in meta.get("regions") or [] if r.get("tokens")][:rows_per_image]
        else:
            caps = [s["tokens"] for s in meta.get("sentences") or [] if s.get("tokens")][:1]
        if not caps:
            continue                                   # no row for this image
        images += 1
        for toks in caps:
            ref = _reference(toks, vocab, max_len)
            if ref:
                out.append((int(meta["image_id"]), ref))
    return out


# --------------------------------------------------------------------------- scorers


def coco_caption_scores(refs: dict, hyps: dict, meteor=None) -> dict[str, float]:
    """coco-caption's pipeline called directly: PTBTokenizer, then BLEU-1..4, METEOR, ROUGE-L,
    CIDEr at corpus level. ``meteor``: a pycocoevalcap ``Meteor`` to reuse (one JVM)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": hyps[k]}] for k in refs})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    own = meteor is None
    meteor = meteor or Meteor()
    try:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        if own:
            del meteor
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def retrieval_by_hand(S) -> dict[str, float]:
    """Image i's true sentence is sentence i. A query's 0-based rank counts the wrong candidates
    scoring at least as high as the true one; R@K = % of ranks < K; medr = the lower middle
    1-based rank."""
    n = len(S)
    i2t = [sum(1 for j in range(n) if j != i and S[i][j] >= S[i][i]) for i in range(n)]
    t2i = [sum(1 for k in range(n) if k != j and S[k][j] >= S[j][j]) for j in range(n)]
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / n
        out[f"{name}_medr"] = float(sorted(r + 1 for r in ranks)[(n - 1) // 2])
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def close(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(float(a), float(b), rel_tol=0, abs_tol=tol)
