"""The captioners' ``train_loop_per_worker``: full-frame or region mode, RNN or LSTM cell.

Batches (docs/architecture.md): ``images uint8[B,3,S,S]`` (or precomputed ``feats
float[B,R,D]``), ``boxes float[B,R,4]``, ``box_mask bool[B,R]``, ``inputs``/``targets
int64[B,R,T]``. Full-frame mode is R = 1 with the whole image as the box, so both modes share
this code: the N = sum of masked-in rows are the captions of the batch.

Loss: cross-entropy of y_t against word t over occupied positions (eq. 15 + softmax).
Validation (rank 0): the loss over the capped validation set, token-weighted, and captions
generated with ``caption.decode`` (beam | greedy | sample) for the same rows, scored at corpus
level with METEOR (+ BLEU, ROUGE-L, CIDEr) against the row's own reference caption by one
:class:`dvsa.evaluation.captions.CaptionScorer` (one JVM) kept for the worker's lifetime.
"""

from __future__ import annotations

import torch

from dvsa.config import Config
from dvsa.evaluation.captions import CaptionScorer
from dvsa.ingest import normalize_images
from dvsa.models.captioner import PAD, caption_loss
from dvsa.models.decoding import decode
from dvsa.train.loop import Objective, ValidationContext, run_worker

SAMPLE_ROWS = 16   # generated captions kept for the MLflow table


def _images(batch: dict) -> torch.Tensor:
    return normalize_images(batch["images"])


def caption_batch_loss(model: torch.nn.Module, batch: dict, cfg: Config) -> torch.Tensor:
    """Mean cross-entropy over the occupied target positions of the batch's captions.

    ``train.static_shapes``: every region slot is captioned and the empty ones' targets are
    all PAD, so they drop out of the mean; no tensor's size depends on the box mask."""
    mask = batch["box_mask"].bool()
    every = cfg.train.static_shapes
    if "feats" in batch:
        logits = model(batch["feats"], batch["inputs"], mask, every_slot=every)
    else:
        logits = model(_images(batch), batch["boxes"], batch["inputs"], mask, every_slot=every)
    if every:   # logits [B*R, T, V]; the empty slots' targets set to PAD
        targets = batch["targets"].masked_fill(~mask[:, :, None], PAD).flatten(0, 1)
    else:       # logits [N, T, V] of the occupied rows
        targets = batch["targets"][mask]
    return caption_loss(logits.float(), targets)


def _features(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """CNN features of the masked-in rows: float[N, feat_dim]."""
    if "feats" in batch:
        return batch["feats"][mask]
    return model.region_features(_images(batch), batch["boxes"], mask)


def validate_captions(v: ValidationContext) -> tuple[dict, list]:
    cfg, vocab, model = v.cfg, v.vocab, v.model
    loss_sum, tokens = 0.0, 0
    refs: dict[str, list[str]] = {}
    hyps: dict[str, str] = {}
    samples: list[dict] = []
    for b, batch in enumerate(v.batches):
        mask = batch["box_mask"].bool()
        feats = _features(model, batch, mask)                           # [N, D]
        targets = batch["targets"][mask]                                # [N, T]
        logits = model.captioner(feats, batch["inputs"][mask])          # [N, T, V]
        n_tok = int((targets != PAD).sum())
        if n_tok:
            loss_sum += float(caption_loss(logits.float(), targets)) * n_tok
            tokens += n_tok
        gen, logprob = decode(model.captioner, feats, cfg.data.max_len, cfg.caption)   # [N, T'], [N]
        image_ids = batch["image_id"] if "image_id" in batch else None
        rows_img = mask.nonzero()[:, 0]                                 # image row of each caption
        if b == 0 and "images" in batch and mask[0].any():
            k = int(mask[0].sum())   # the first image's regions are the first k rows
            v.state["picture"] = {
                "image": batch["images"][0].permute(1, 2, 0).cpu().numpy().tolist(),   # HWC uint8
                "boxes": batch["boxes"][0][mask[0]].float().cpu().tolist(),
                "captions": [" ".join(vocab.decode(gen[n].tolist())) for n in range(k)],
                "scores": [float(x) for x in logprob[:k].float().cpu()],
                "image_id": int(batch["image_id"][0]) if "image_id" in batch else 0,
            }
        for n in range(len(targets)):
            ref = " ".join(vocab.decode(targets[n].tolist()))
            if not ref:
                continue
            key = f"{b}_{n}"
            hyp = " ".join(vocab.decode(gen[n].tolist()))
            refs[key] = [ref]
            hyps[key] = hyp
            if len(samples) < SAMPLE_ROWS:
                img = int(image_ids[rows_img[n]]) if image_ids is not None else int(rows_img[n])
                samples.append({"image_id": img, "generated": hyp, "reference": ref})
    metrics = {"val/loss": loss_sum / max(tokens, 1), "val/captions": float(len(hyps))}
    if hyps:
        scorer = v.state.get("scorer")
        if scorer is None:
            scorer = v.state["scorer"] = CaptionScorer()
        for name, value in scorer.score(refs, hyps).items():
            metrics[f"val/{name}"] = float(value)
    else:
        metrics["val/METEOR"] = 0.0
    return metrics, samples


CAPTION_OBJECTIVE = Objective(name="caption", loss=caption_batch_loss, validate=validate_captions)


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry for the captioners (``caption.mode``, ``caption.cell`` from the config)."""
    return run_worker(CAPTION_OBJECTIVE, config)
