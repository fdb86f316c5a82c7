"""Models with known behaviour for the evaluation tests (imported by tests/test_evaluate.py,
test_caption_cli.py, test_search.py; not collected itself).

* :func:`chain_captioner`: an RNN captioner whose decode is fixed by hand: one-hot word
  vectors, W_hh = 0, b_v = 0, W_hx maps each word to the next one of a chain, W_oh = 10 I.
  Whatever the image, every box is described as the chain (e.g. "red circle").
* :func:`colour_aligner`: an alignment model whose tiny CNN is set by hand so that feature 0
  of a box is its mean "redness" relu(R - G - B - 0.2) and feature 1 its "blueness"; W_m keeps
  them as v[0], v[1]; the words "red"/"blue" embed as s = 2 e_0 / 2 e_1 (every other word 0).
  So a region's score for the query "red" is twice its mean redness.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dvsa.config import load_config
from dvsa.models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def prepare_shards(world: Path, out: Path) -> Path:
    """VG (regions + groups) and Karpathy (sentences + proposals) shards of a synthetic world."""
    from dvsa.data.prepare import KarpathySource, PrepareOptions, VGSource, prepare_karpathy, prepare_vg

    local = PrepareOptions(use_ray=False, progress=False)
    prepare_vg(VGSource(str(world / "vg"), split_file=str(world / "vg" / "densecap_splits.json"), min_count=2),
               str(out / "vg"), local)
    prepare_karpathy(KarpathySource(str(world / "karpathy" / "dataset_synth.json"), str(world / "vg"),
                                    proposals=str(world / "karpathy" / "proposals.json"), min_count=2),
                     str(out / "kp"), local)
    return out


def tiny_cfg(shards: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"out={out}", f"data.shards={shards / 'vg'}", f"data.fullframe_shards={shards / 'kp'}",
        f"train.storage_path={out / 'ray_results'}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        *overrides])


def chain_captioner(cfg, vocab, chain: list[str]):
    """A CaptioningModel (cell rnn, word_dim = hidden_dim >= |V|) that always says ``chain``."""
    from dvsa.models.build import build_model
    from dvsa.models.captioner import END, START

    V = len(vocab)
    assert cfg.caption.cell == "rnn" and cfg.model.word_dim >= V and cfg.model.hidden_dim >= V, V
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    cap = model.captioner
    ids = [vocab.stoi[w] for w in chain]
    with torch.no_grad():
        cap.W_w.weight.zero_()
        cap.W_w.weight[:V, :V] = torch.eye(V)                     # x_t = one-hot(word)
        cap.W_hi.weight.zero_()                                    # b_v = 0: the image is ignored
        cap.W_hh.weight.zero_()
        cap.W_hh.bias.zero_()
        cap.W_hx.weight.zero_()
        for prev, nxt in zip([START] + ids, ids + [END]):
            cap.W_hx.weight[nxt, prev] = 1.0                       # h_t = one-hot(next word)
        cap.W_oh.weight.zero_()
        cap.W_oh.weight[:V, :V] = 10.0 * torch.eye(V)
        cap.W_oh.bias.zero_()
    return model.eval()


def colour_aligner(cfg, vocab):
    """The hand-set alignment model described in the module doc (backbone tiny)."""
    from dvsa.ingest import IMAGENET_MEAN, IMAGENET_STD
    from dvsa.models.build import build_model

    assert cfg.task == "align" and cfg.model.backbone == "tiny"
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    layers = model.encoder.trunk.features
    m, s = IMAGENET_MEAN, IMAGENET_STD
    # pixel p_c = x_c * s_c + m_c; channel 0 = p_R - p_G - p_B - 0.2, channel 1 = p_B - p_R - p_G - 0.2
    signs = {0: (1.0, -1.0, -1.0), 1: (-1.0, -1.0, 1.0)}
    with torch.no_grad():
        for i in (0, 3, 6, 9):                                     # the four convs
            conv, bn = layers[i], layers[i + 1]
            conv.weight.zero_()
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
            for c in (0, 1):
                if i == 0:
                    for k in range(3):
                        conv.weight[c, k, 1, 1] = signs[c][k] * s[k]
                    bn.bias[c] = sum(signs[c][k] * m[k] for k in range(3)) - 0.2
                else:
                    conv.weight[c, c] = 1.0 / 9.0                  # 3x3 mean of the channel
        model.W_m.weight.zero_()
        model.W_m.bias.zero_()
        model.W_m.weight[0, 0] = model.W_m.weight[1, 1] = 1.0
        sent = model.sentence
        for lin in (sent.W_e, sent.W_f, sent.W_b, sent.W_d):
            lin.weight.zero_()
            lin.bias.zero_()
        sent.W_w.weight.zero_()
        sent.W_w.weight[vocab.stoi["red"], 0] = 1.0
        sent.W_w.weight[vocab.stoi["blue"], 1] = 1.0
        sent.W_e.weight[0, 0] = sent.W_e.weight[1, 1] = 1.0
        sent.W_d.weight[0, 0] = sent.W_d.weight[1, 1] = 1.0
    return model.eval()


def save(model, vocab, cfg, path: Path, step: int = 5) -> Path:
    return save_checkpoint(path, model=model, step=step, epoch=1, vocab=vocab, cfg=cfg)
