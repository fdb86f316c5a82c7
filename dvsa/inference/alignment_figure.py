"""Fig. 5 of the paper: one image-sentence pair, each word coloured like the box the MRF
aligns it to (section 3.1.4), from a trained alignment model. Used by ``dvsa evaluate`` (a
picture in the model's run), ``dvsa snippets`` and the word-alignment experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dvsa.config import Config
from dvsa.data.shards import iter_samples
from dvsa.errors import DataError
from dvsa.inference.alignment import align_sentences, alignment_boxes, embed_images, encode_sentences
from dvsa.text import Vocab
from dvsa.viz import draw_alignment


def first_sample(shards: str, split: str) -> tuple[str, bytes, dict]:
    """The first sample of ``split`` that has a JPEG and a non-empty sentence."""
    for key, jpg, meta in iter_samples(shards, split):
        if jpg and any(s.get("tokens") for s in meta.get("sentences") or []):
            return key, jpg, meta
    raise DataError(f"{shards}: no {split} sample with an image and a sentence")


def alignment_figure(model, vocab: Vocab, cfg: Config, jpg: bytes, meta: dict, path: str | Path, *, sentence: int = 0,
                     beta: Optional[float] = None, title: Optional[str] = None) -> Path:
    """Fig. 5: one image-sentence pair, each word coloured like the box the MRF (``beta``,
    default ``align.mrf_beta``) aligns it to; snippets show as spans. Returns the PNG path."""
    import io

    from PIL import Image

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
