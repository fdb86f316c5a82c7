"""Ingest throughput: the Ray Data pipeline vs webdataset + torch DataLoader, same shards, same CPUs.

Every arm does the same work per image: read the tar, parse the json, decode the JPEG, resize
to S x S (uint8 CHW), map the region boxes, encode the region captions, pad, and hand the train
loop torch batches of B rows. Arms:

  dataloader_full   webdataset + DataLoader(num_workers=C), PIL full-size decode + resize
                    (what one writes by default: the baseline)
  dataloader_draft  the same, with our reduced-size decode (PIL draft): same decode as Ray
  ray_pil           build_dataset (ShardDatasource read -> map_batches tasks, PIL draft)
                    -> iter_train_batches (local shuffle buffer off)
  ray_torchvision   the same with torchvision.io.decode_jpeg + v2 resize
  ray_actors        the same as ray_pil with an actor pool of C decoders (the read is fused
                    into the actors, so it needs no CPU of its own)

Each arm's pipeline object is built once and iterated once per pass, as epochs are (the
DataLoader with persistent workers, the Ray Dataset as a TorchTrainer holds it). All arms run
in one process run, interleaved (rep 1: every arm, rep 2: every arm, ...), after
one warm-up pass each, so that load from other processes on the machine hits all arms alike.
Caveat (measured): with ray_actors in the run, the other Ray arms' first batch takes 1.5-3 s,
without it 0.3-0.4 s; a 2 s pause between arms did not help (likely the worker processes the
actor pool leaves behind each pass, rebuilt on demand). Compare task arms with --arms too.
Ray is started with num_cpus=C; the DataLoader uses C worker processes.

    .venv/bin/python benchmarks/ingest.py [--images 960] [--size 224] [--cpus 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "a the red blue green man woman dog cat tree car sign window shirt white black on in of with".split()


def _photo_like(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A 'photo-like' JPEG (smooth gradients, shapes, mild noise) of about real-photo size."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / w) * 255 * rng.random(), (yy / h) * 255 * rng.random(),
                     ((xx + yy) / (w + h)) * 255 * rng.random()], -1)
    im = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        d.ellipse([x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))],
                  fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_bench_shards(root: str, images: int, width: int = 640, height: int = 480, regions: int = 12,
                      shard_images: int = 60, seed: int = 0, unique: int = 64) -> str:
    """``images`` samples (``unique`` distinct JPEGs reused) in train shards + vocab.json."""
    from dvsa.data.shards import ShardWriter
    from dvsa.text import Vocab

    rng = np.random.default_rng(seed)
    jpgs = [_photo_like(rng, width, height) for _ in range(min(unique, images))]
    counter: Counter = Counter()
    per_shard_bytes = shard_images * (len(jpgs[0]) + 2000)
    with ShardWriter(root, "train", shard_bytes=per_shard_bytes) as w:
        for i in range(images):
            regs = []
            for j in range(regions):
                x1, y1 = float(rng.integers(0, width - 60)), float(rng.integers(0, height - 60))
                toks = [WORDS[k] for k in rng.integers(0, len(WORDS), int(rng.integers(2, 9)))]
                counter.update(toks)
                regs.append({"id": i * 100 + j, "box": [x1, y1, x1 + 50, y1 + 50], "raw": " ".join(toks),
                             "tokens": toks})
            w.write(f"im{i:07d}", jpgs[i % len(jpgs)],
                    {"image_id": i, "source": "vg", "split": "train", "width": width, "height": height,
                     "regions": regs, "groups": [], "sentences": []})
    Vocab.build(counter, 1, images * regions).save(os.path.join(root, "vocab.json"))
    return root


# --------------------------------------------------------------------------- the DataLoader arm


class _WdsRows:
    """webdataset pipeline stage: raw sample -> the same row dict BatchBuilder makes."""

    def __init__(self, spec, vocab, full_decode: bool):
        self.spec, self.vocab, self.full = spec, vocab, full_decode

    def __call__(self, sample):
        from PIL import Image

        from dvsa.ingest.builder import BatchBuilder
        from dvsa.ingest.decode import decode_resize

        b = BatchBuilder(self.spec, self.vocab)
        meta = json.loads(sample["json"])
        if self.full:   # the default: decode at full size, then resize (PIL, bilinear)
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                w, h = im.size
                rgb = im.convert("RGB").resize((self.spec.image_size,) * 2, Image.BILINEAR)
            img = np.asarray(rgb).transpose(2, 0, 1).copy()
        else:
            img, (w, h) = decode_resize(sample["jpg"], self.spec.image_size, "pil")
        from dvsa.ingest.samples import select

        sel = select(self.spec.layout, meta, self.spec.rows, None)
        row = {"images": img, "image_id": np.int64(meta["image_id"])}
        row.update(b._boxes(meta, sel, w, h))
        row.update(b._tokens(sel))
        return row


def _collate(rows):
    import torch

    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0] if not k.startswith("__")}


def make_loader(urls, spec, vocab, batch_size, workers, full_decode):
    """One DataLoader reused across passes (persistent workers), as one trains epochs."""
    import torch
    import webdataset as wds

    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
          .map(_WdsRows(spec, vocab, full_decode)).batched(batch_size, collation_fn=_collate, partial=True))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2,
                                       persistent_workers=True)


def run_dataloader(loader) -> tuple[int, float]:
    n, t0, first = 0, time.perf_counter(), None
    for batch in loader:
        n += batch["images"].shape[0]
        first = first if first is not None else time.perf_counter() - t0
    return n, first


# --------------------------------------------------------------------------- the Ray arm


def run_ray(ds, batch_size) -> tuple[int, float]:
    """One pass over a Dataset built once and reused across passes, as a TorchTrainer does."""
    from dvsa.ingest import iter_train_batches

    n, t0, first = 0, time.perf_counter(), None
    for batch in iter_train_batches(ds, batch_size, "cpu", prefetch_batches=2, epoch=0, seed=0, shuffle_buffer=0):
        n += batch["images"].shape[0]
        first = first if first is not None else time.perf_counter() - t0
    return n, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--arms", default="dataloader_full,dataloader_draft,ray_pil,ray_torchvision,ray_actors")
    args = ap.parse_args()

    import ray

    from dvsa.config import Config
    from dvsa.data.shards import list_shards, load_vocab
    from dvsa.ingest.builder import IngestSpec

    work = tempfile.mkdtemp(prefix="dvsa-bench-ingest-", dir="/tmp")
    try:
        root = make_bench_shards(os.path.join(work, "shards"), args.images)
        urls = list_shards(root, "train")
        vocab = load_vocab(root)
        base = {"data.image_size": args.size, "data.decode_concurrency": args.cpus,
                "data.decode_batch_size": args.batch_size, "caption.max_regions_per_image": 10}
        cfgs = {
            "ray_pil": Config().replace(**base),
            "ray_torchvision": Config().replace(**base, **{"data.jpeg_decoder": "torchvision"}),
            # the read runs inside the actors (fused): all C CPUs decode
            "ray_actors": Config().replace(**{**base, "data.decode_pool": "actors"}),
        }
        spec = IngestSpec(layout="caption_region", image_size=args.size, rows=10, max_len=16, randomize=False)
        ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=os.path.join(work, "ray"),
                 log_to_driver=False, configure_logging=False)
        from dvsa.ingest import build_dataset

        wanted = args.arms.split(",")
        loaders = {k: make_loader(urls, spec, vocab, args.batch_size, args.cpus, k == "dataloader_full")
                   for k in ("dataloader_full", "dataloader_draft") if k in wanted}
        datasets = {k: build_dataset(root, "train", "caption_region", c, vocab, seed=0)
                    for k, c in cfgs.items() if k in wanted}
        arms = {**{k: (lambda l=l: run_dataloader(l)) for k, l in loaders.items()},
                **{k: (lambda d=d: run_ray(d, args.batch_size)) for k, d in datasets.items()}}
        arms = {k: arms[k] for k in wanted}
        times: dict[str, list[float]] = {k: [] for k in arms}
        firsts: dict[str, list[float]] = {k: [] for k in arms}
        for k, fn in arms.items():           # warm-up pass (worker start-up, page cache)
            assert fn()[0] == args.images, k
        for _ in range(args.reps):
            for k, fn in arms.items():
                t = time.perf_counter()
                n, first = fn()
                times[k].append(time.perf_counter() - t)
                firsts[k].append(first)
                assert n == args.images, (k, n)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {k: args.images / statistics.median(v) for k, v in times.items()}
    first_s = {k: statistics.median(v) for k, v in firsts.items()}
    # after the first batch: the steady rate a long epoch sees
    steady = {k: (args.images - args.batch_size) / max(1e-9, statistics.median(
        [t - f for t, f in zip(times[k], firsts[k])])) for k in times}
    ref = rate.get("dataloader_full")
    print(f"\ningest: {args.images} images 640x480 -> {args.size}, {args.cpus} CPUs, batch {args.batch_size}, "
          f"median of {args.reps} interleaved passes")
    print(f"{'arm':<18}{'rows/s':>10}{'vs dataloader_full':>20}{'vs dataloader_draft':>21}"
          f"{'1st batch s':>13}{'steady rows/s':>15}")
    for k, r in rate.items():
        a = f"{r / ref:.2f}x" if ref else "-"
        b = f"{r / rate['dataloader_draft']:.2f}x" if "dataloader_draft" in rate else "-"
        print(f"{k:<18}{r:>10.1f}{a:>20}{b:>21}{first_s[k]:>13.2f}{steady[k]:>15.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"images": args.images, "image": "640x480 JPEG q90", "size": args.size, "cpus": args.cpus,
           "batch_size": args.batch_size, "reps": args.reps, "interleaved": True,
           "machine": f"{platform.machine()} {os.cpu_count()} cores (shared with other processes)",
           "seconds": times, "first_batch_s": firsts, "rows_per_s": rate, "steady_rows_per_s": steady,
           "ratio_vs_dataloader_full": {k: r / ref for k, r in rate.items()} if ref else None}
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'ingest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
