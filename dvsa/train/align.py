"""The alignment model's ``train_loop_per_worker`` (section 3.1: BRNN + eq. 8 scores + eq. 9).

Batches (docs/architecture.md): ``images uint8[B,3,S,S]`` (or precomputed ``feats
float[B,M,D]``), ``boxes float[B,M,4]`` (whole image first), ``box_mask bool[B,M]``,
``tokens int64[B,T]`` (word ids), ``lengths int64[B]``. Image b and sentence b are the true
pair; the other B-1 sentences (images) of the batch are the negatives of eq. 9.

Validation (rank 0): the mean batch loss, and image-sentence retrieval on the capped
validation set (one sentence per image): R@1/5/10 and median rank both ways
(:func:`dvsa.evaluation.retrieval.retrieval_metrics`), with ``val/rsum`` (sum of the six
R@K) ranking checkpoints.
"""

from __future__ import annotations

import torch

from dvsa.config import Config
from dvsa.evaluation.retrieval import model_score_fn, retrieval_metrics
from dvsa.ingest import normalize_images
from dvsa.models.alignment import ranking_loss
from dvsa.train.loop import Objective, ValidationContext, run_worker


def _forward(model: torch.nn.Module, batch: dict, every_slot: bool = False) -> torch.Tensor:
    """S float[B, B]: image b against sentence l (called on the DDP wrapper when training);
    ``every_slot``: ``train.static_shapes`` (no shape depends on the box mask)."""
    mask = batch["box_mask"].bool()
    if "feats" in batch:
        return model(None, None, mask, batch["tokens"], batch["lengths"], feats=batch["feats"])

    return model(normalize_images(batch["images"]), batch["boxes"], mask, batch["tokens"], batch["lengths"],
                 every_slot=every_slot)


def align_batch_loss(model: torch.nn.Module, batch: dict, cfg: Config) -> torch.Tensor:
    S = _forward(model, batch, every_slot=cfg.train.static_shapes).float()
    return ranking_loss(S, margin=cfg.align.margin, hardest=cfg.align.loss == "hardest")


def validate_alignment(v: ValidationContext) -> tuple[dict, list]:
    model, cfg = v.model, v.cfg
    vs, vms, ss, sms = [], [], [], []
    loss_sum, batches = 0.0, 0
    for batch in v.batches:
        mask = batch["box_mask"].bool()
        if "feats" in batch:
            emb, emb_mask = model.embed_region_features(batch["feats"], mask)
        else:
            emb, emb_mask = model.embed_regions(normalize_images(batch["images"]), batch["boxes"], mask)
        s, s_mask = model.embed_words(batch["tokens"], batch["lengths"])
        if len(s) > 1:   # eq. 9 needs negatives
            S = model.scores(emb, emb_mask, s, s_mask).float()
            loss_sum += float(ranking_loss(S, margin=cfg.align.margin, hardest=cfg.align.loss == "hardest"))
            batches += 1
        vs.append(emb.float())
        vms.append(emb_mask)
        ss.append(s.float())
        sms.append(s_mask)
    if not vs:
        return {"val/loss": 0.0, "val/rsum": 0.0}, []
    v_all, vm_all = torch.cat(vs), torch.cat(vms)                       # [N, M, h], [N, M]
    s_all, sm_all = torch.cat(ss), torch.cat(sms)                       # [N, T, h], [N, T]
    n = len(v_all)
    r = retrieval_metrics(model_score_fn(model, v_all, vm_all, s_all, sm_all),
                          torch.arange(n), n_img=n)
    metrics = {"val/loss": loss_sum / max(batches, 1), "val/images": float(n)}
    metrics.update({f"val/{k}": float(val) for k, val in r.items()})
    metrics["val/rsum"] = sum(r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics, []


ALIGN_OBJECTIVE = Objective(name="align", loss=align_batch_loss, validate=validate_alignment)


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry for the alignment model."""
    return run_worker(ALIGN_OBJECTIVE, config)
