"""What ``train.static_shapes`` costs in compute: the train step with every padded region slot
computed and masked, against the plain step that selects the occupied rows, at several fills.

``train.static_shapes`` exists for the GPU: the plain step's boolean indexing makes the host
wait for the device a few times per step, the static step never does (docs/training.md, "GPU
step"; ``benchmarks/gpu_step.py`` measures that side on a GPU). What it pays for that is the
work on empty slots: RoIAlign, the region head and the captioner's LSTM (or, for the alignment
model, the region embedding) run on all B x R slots instead of the occupied ones. On the CPU
host reads cost nothing, so this benchmark isolates that price: the same batches, seed, model
and thread count on both arms, steps interleaved arm by arm, fill = the fraction of occupied
slots (the first slot of every image is always occupied).

    .venv/bin/python benchmarks/static_shapes_cost.py [--backbone resnet18] [--size 128] [--steps 4]

Prints a table and writes benchmarks/results/static_shapes_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"


def make_batches(task: str, b: int, r: int, t: int, size: int, fill: float, vocab_size: int, n: int) -> list[dict]:
    """``n`` ingest-shaped batches whose slots are occupied with probability ``fill`` (slot 0 always)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.rand(b, r, generator=g) < fill
        mask[:, 0] = True
        xy = torch.randint(0, size // 2, (b, r, 2), generator=g).float()
        wh = torch.randint(8, size // 2, (b, r, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], -1) * mask[..., None]
        images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)
        if task == "align":
            lengths = torch.randint(3, t + 1, (b,), generator=g)
            tokens = torch.randint(4, vocab_size, (b, t), generator=g) * (torch.arange(t)[None] < lengths[:, None])
            out.append({"images": images, "boxes": boxes, "box_mask": mask, "tokens": tokens, "lengths": lengths})
        else:
            tokens = torch.randint(4, vocab_size, (b, r, t), generator=g) * mask[..., None]
            out.append({"images": images, "boxes": boxes, "box_mask": mask, "targets": tokens,
                        "inputs": torch.cat([torch.ones(b, r, 1, dtype=torch.long), tokens[..., :-1]], -1)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--regions", type=int, default=20)
    ap.add_argument("--fills", default="1.0,0.75,0.5")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm and round (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="static_shapes_cost.json")
    args = ap.parse_args()

    import torch

    from dvsa.config import Config
    from dvsa.models.build import build_model
    from dvsa.models.optim import build_optimizer, update
    from dvsa.text import Vocab
    from dvsa.train import common
    from dvsa.train.align import align_batch_loss
    from dvsa.train.caption import caption_batch_loss

    torch.set_num_threads(args.threads)
    from collections import Counter
    vocab = Vocab.build(Counter({f"w{i}": 2 for i in range(996)}), 1, 1000)
    t_len = 15
    rows = []
    for task in ("caption", "align"):
        loss_fn = align_batch_loss if task == "align" else caption_batch_loss
        for fill in (float(f) for f in args.fills.split(",")):
            batches = make_batches(task, args.batch, args.regions, t_len, args.size, fill, len(vocab),
                                   args.steps + 1)
            occupied = float(torch.stack([b["box_mask"] for b in batches]).float().mean())
            arms = {}
            for static in (False, True):
                cfg = Config().replace(**{"task": task, "model.backbone": args.backbone, "model.weights": None,
                                          "data.image_size": args.size, "data.max_len": t_len + 1,
                                          "data.max_regions": args.regions,
                                          "caption.max_regions_per_image": args.regions,
                                          "train.optimizer": "adam", "train.static_shapes": static})
                common.seed_everything(0)
                model = build_model(cfg, vocab).train()
                opt = build_optimizer(model.parameters(), cfg.train)
                arms[static] = (cfg, model, opt, list(model.parameters()))
            times: dict[bool, list[float]] = {False: [], True: []}
            losses: dict[bool, float] = {}
            for rnd in range(args.rounds + 1):            # round 0: warm-up (one step each)
                for static, (cfg, model, opt, params) in arms.items():
                    todo = batches[:1] if rnd == 0 else batches[1:]
                    t0 = time.perf_counter()
                    for batch in todo:
                        loss = loss_fn(model, batch, cfg)
                        update(opt, loss, params, cfg.train)
                    if rnd:
                        times[static].append((time.perf_counter() - t0) / len(todo))
                    else:
                        losses[static] = float(loss.detach())
            plain, static = statistics.median(times[False]), statistics.median(times[True])
            rows.append({"task": task, "fill": fill, "occupied": round(occupied, 3),
                         "plain_s_per_step": plain, "static_s_per_step": static,
                         "static_over_plain": static / plain, "loss_first": losses})
    print(f"\nstatic_shapes cost on the CPU: {args.backbone} at {args.size} px, batch {args.batch}, "
          f"{args.regions} slots, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':<10}{'fill':>6}{'occupied':>10}{'plain s/step':>14}{'static s/step':>15}{'static/plain':>14}")
    for r in rows:
        print(f"{r['task']:<10}{r['fill']:>6.2f}{r['occupied']:>10.3f}{r['plain_s_per_step']:>14.3f}"
              f"{r['static_s_per_step']:>15.3f}{r['static_over_plain']:>13.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = {"backbone": args.backbone, "size": args.size, "batch": args.batch, "regions": args.regions,
           "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "load_average": os.getloadavg(),
           "command": " ".join(["benchmarks/static_shapes_cost.py"] + sys.argv[1:]), "rows": rows}
    (RESULTS / args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
