"""Benchmark: ``dvsa prepare vg`` at the paper's scale (108,077 images, 4.1M region phrases).

1. Writes VG v1.2 metadata at full scale (``--scale`` shrinks it): image_data.json and a
   region_descriptions.json of ~4.1M phrases (Zipf words, 1-12 words each); every image file is
   a hard link to one tiny JPEG (pixels are not the point of this part).
2. Runs ``dvsa prepare vg`` in a subprocess on a local Ray and measures wall time, captions/s,
   and peak RSS (driver alone; Ray workers; the whole process tree, Ray's own services
   included), sampled from /proc every 0.2 s.
   Baseline a user would otherwise write: ``json.load`` of region_descriptions.json (time and
   RSS), measured in its own subprocess.
3. The pixel path, over real synthetic JPEGs (640 px, quality 95), MB/s of image bytes in,
   against a plain file copy of the same files (shutil.copyfile, i.e. sendfile: what ``cp``
   does) in the same run, best of two: (a) the image path alone (read the file, verify it,
   write it into a shard: ``prepare_image`` + ``ShardWriter``), (b) the whole of
   ``prepare_vg`` in one process (captions, boxes, groups, vocabulary, manifest too).

Writes benchmarks/results/prepare_scale.json and prints a table.

    .venv/bin/python benchmarks/prepare_scale.py [--scale 1.0] [--work /tmp/dvsa-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

FULL_IMAGES = 108_077
FULL_PHRASES = 4_100_000
HERE = Path(__file__).resolve().parent


def write_metadata(root: Path, images: int, phrases: int, seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for d in ("VG_100K", "VG_100K_2"):
        (root / d).mkdir(parents=True, exist_ok=True)
    tiny = root / "tiny.jpg"
    Image.new("RGB", (64, 48), (120, 90, 60)).save(tiny, format="JPEG", quality=90)
    words = [f"w{i}" for i in range(30_000)]
    zipf_p = 1.0 / np.arange(1, len(words) + 1)
    zipf_p /= zipf_p.sum()
    per_image = rng.multinomial(phrases, np.full(images, 1.0 / images))
    n_first = int(images * 0.6)
    with open(root / "image_data.json", "w") as f:
        f.write("[")
        for i in range(images):
            iid = i + 1
            folder = "VG_100K" if i < n_first else "VG_100K_2"
            f.write(("," if i else "") + json.dumps({"image_id": iid, "url": f"https://x/{folder}/{iid}.jpg",
                                                     "width": 64, "height": 48, "coco_id": iid if i % 2 else None,
                                                     "flickr_id": None}))
            dst = root / folder / f"{iid}.jpg"
            if not dst.exists():
                src = root / f"tiny-{i // 50_000}.jpg"  # a file takes ~65,000 hard links at most
                if not src.exists():
                    shutil.copyfile(tiny, src)
                os.link(src, dst)
        f.write("]")
    rid = 1
    with open(root / "region_descriptions.json", "w") as f:
        f.write("[")
        for i in range(images):
            n = int(per_image[i])
            lens = rng.integers(1, 13, size=n)
            idx = rng.choice(len(words), size=int(lens.sum()), p=zipf_p)
            xy = rng.integers(0, 40, size=(n, 2))
            wh = rng.integers(1, 30, size=(n, 2))
            regs, k = [], 0
            for j in range(n):
                phrase = " ".join(words[t] for t in idx[k:k + lens[j]])
                k += lens[j]
                regs.append(f'{{"region_id": {rid}, "width": {wh[j, 0]}, "height": {wh[j, 1]}, "image_id": {i + 1}, '
                            f'"phrase": "{phrase}", "y": {xy[j, 1]}, "x": {xy[j, 0]}}}')
                rid += 1
            f.write(("," if i else "") + f'{{"regions": [{", ".join(regs)}], "id": {i + 1}}}')
        f.write("]")
    region_json_mb = (root / "region_descriptions.json").stat().st_size / 1e6
    return {"images": images, "phrases": rid - 1, "region_json_mb": region_json_mb}


# --------------------------------------------------------------------------- process-tree RSS


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(p))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        return b"default_worker" in cmd or cmd.startswith(b"ray::")
    except OSError:
        return False


class TreeSampler(threading.Thread):
    def __init__(self, root_pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.period = root_pid, period
        self.peak = {"driver_mb": 0.0, "workers_mb": 0.0, "tree_mb": 0.0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            kids = _children()
            tree, todo = [], [self.root]
            while todo:
                p = todo.pop()
                tree.append(p)
                todo.extend(kids.get(p, []))
            rss = {p: _rss_mb(p) for p in tree}
            self.peak["driver_mb"] = max(self.peak["driver_mb"], rss.get(self.root, 0.0))
            self.peak["workers_mb"] = max(self.peak["workers_mb"], sum(v for p, v in rss.items() if _is_worker(p)))
            self.peak["tree_mb"] = max(self.peak["tree_mb"], sum(rss.values()))
            time.sleep(self.period)


def run_measured(cmd: list[str]) -> tuple[float, dict, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return wall, sampler.peak, out


# --------------------------------------------------------------------------- pixel path


def pixel_path(work: Path, images: int) -> dict:
    from dvsa.data.images import prepare_image
    from dvsa.data.prepare import PrepareOptions, VGSource, prepare_vg
    from dvsa.data.shards import ShardWriter
    from dvsa.data.synth import SynthOptions, write_world

    world = work / "pixels-world"
    if not (world / "vg" / "region_descriptions.json").exists():
        write_world(world, SynthOptions(images=images, image_size=640, seed=0, jpeg_quality=95))
    files = sorted((world / "vg").glob("VG_100K*/*.jpg"))
    total = sum(p.stat().st_size for p in files)
    # warm the page cache for both runs alike
    for p in files:
        p.read_bytes()
    dst = work / "pixels-copy"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    copy_times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for p in files:
            shutil.copyfile(p, dst / p.name)
        copy_times.append(time.perf_counter() - t0)
    copy_s = min(copy_times)
    res = {"images": len(files), "mb": total / 1e6, "copy_s": copy_s, "copy_mb_s": total / 1e6 / copy_s}
    for verify in ("decode", "markers"):
        times = []
        for _ in range(2):
            out = work / f"pixels-imgpath-{verify}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            w = ShardWriter(str(out), "train", 256 << 20)
            for i, p in enumerate(files):
                with open(p, "rb") as f:
                    img = prepare_image(f.read(), None, verify)
                w.write(str(i), img.data, {"image_id": i, "width": img.width, "height": img.height})
            w.close()
            times.append(time.perf_counter() - t0)
        s = min(times)
        res[f"image_path_{verify}_s"] = s
        res[f"image_path_{verify}_mb_s"] = total / 1e6 / s
        res[f"ratio_image_path_{verify}_over_copy"] = total / 1e6 / s / res["copy_mb_s"]
        times = []
        for _ in range(2):
            out = work / f"pixels-shards-{verify}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            m = prepare_vg(VGSource(str(world / "vg"), split_file=str(world / "vg" / "densecap_splits.json")),
                           str(out), PrepareOptions(use_ray=False, progress=False, chunk_images=images, verify=verify))
            times.append(time.perf_counter() - t0)
        s = min(times)
        mb_s = m.input_details["image_bytes_read"] / 1e6 / s
        res[f"prepare_{verify}_s"] = s
        res[f"prepare_{verify}_mb_s"] = mb_s
        res[f"ratio_{verify}_over_copy"] = mb_s / res["copy_mb_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", default="/tmp/dvsa-bench")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--chunk-images", type=int, default=1000)
    ap.add_argument("--pixel-images", type=int, default=400)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--pixels-only", action="store_true", help="redo only the pixel-path part of an existing result")
    args = ap.parse_args()
    result_file = HERE / "results" / "prepare_scale.json"
    if args.pixels_only:
        res = json.loads(result_file.read_text())
        res["pixels"] = pixel_path(Path(args.work), args.pixel_images)
        result_file.write_text(json.dumps(res, indent=1))
        print(table(res))
        return
    work = Path(args.work) / f"scale-{args.scale:g}"
    root = work / "vg"
    images, phrases = max(10, int(FULL_IMAGES * args.scale)), max(100, int(FULL_PHRASES * args.scale))
    meta_file = work / "meta.json"
    t0 = time.perf_counter()
    if meta_file.exists():
        gen = json.loads(meta_file.read_text())
    else:
        gen = write_metadata(root, images, phrases)
        gen["seconds"] = time.perf_counter() - t0
        meta_file.write_text(json.dumps(gen))
    print(f"metadata: {gen['images']:,} images, {gen['phrases']:,} phrases, {gen['region_json_mb']:.0f} MB json")

    py = sys.executable
    baseline = None
    if not args.skip_baseline:
        code = ("import json,sys,time;t=time.perf_counter();d=json.load(open(sys.argv[1]));"
                "print(sum(len(e['regions']) for e in d), time.perf_counter()-t)")
        wall, peak, out = run_measured([py, "-c", code, str(root / "region_descriptions.json")])
        baseline = {"what": "json.load(region_descriptions.json) alone", "wall_s": wall,
                    "peak_rss_mb": peak["driver_mb"]}

    out_dir = work / "shards"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [py, "-m", "dvsa.cli", "prepare", "vg", "--root", str(root), "--out", str(out_dir), "--quiet",
           "--num-cpus", str(args.num_cpus), "--chunk-images", str(args.chunk_images)]
    wall, peak, log = run_measured(cmd)
    from dvsa.data.manifest import Manifest

    m = Manifest.read(str(out_dir))
    res = {
        "scale": args.scale, "images": gen["images"], "phrases": gen["phrases"],
        "region_json_mb": gen["region_json_mb"],
        "cpus": os.cpu_count(), "ray_cpus": args.num_cpus, "chunk_images": args.chunk_images,
        "prepare_wall_s": wall, "prepare_inner_s": m.sections["run"]["seconds"],
        "captions_per_s": gen["phrases"] / wall,
        "regions_written": m.written["regions"], "regions_dropped": m.dropped("regions"),
        "vocab_size": m.vocab.size, "shards": len(m.shards),
        "peak_rss_driver_mb": peak["driver_mb"], "peak_rss_workers_mb": peak["workers_mb"],
        "peak_rss_driver_plus_workers_mb": peak["driver_mb"] + peak["workers_mb"],
        "peak_rss_process_tree_mb": peak["tree_mb"], "worker_max_rss_mb_self_reported": m["worker_max_rss_mb"],
        "baseline": baseline,
        "pixels": pixel_path(Path(args.work), args.pixel_images),
    }
    (HERE / "results").mkdir(exist_ok=True)
    result_file.write_text(json.dumps(res, indent=1))
    print(table(res))


def table(res: dict) -> str:
    px, base = res["pixels"], res.get("baseline")
    rows = [
        ("images / region phrases", f"{res['images']:,} / {res['phrases']:,}"),
        ("region_descriptions.json", f"{res['region_json_mb']:.0f} MB"),
        ("prepare wall (incl. Ray start)", f"{res['prepare_wall_s']:.1f} s"),
        ("captions / s", f"{res['captions_per_s']:,.0f}"),
        ("peak RSS driver + workers", f"{res['peak_rss_driver_plus_workers_mb']:.0f} MB "
                                      f"(driver {res['peak_rss_driver_mb']:.0f}, "
                                      f"workers {res['peak_rss_workers_mb']:.0f})"),
        ("peak RSS whole tree (Ray services too)", f"{res['peak_rss_process_tree_mb']:.0f} MB"),
    ]
    if base:
        rows.append(("baseline json.load alone", f"{base['wall_s']:.1f} s, {base['peak_rss_mb']:.0f} MB RSS"))
    rows += [
        ("pixel path: plain file copy", f"{px['copy_mb_s']:.0f} MB/s ({px['images']} JPEGs, {px['mb']:.0f} MB)"),
    ]
    for verify in ("markers", "decode"):
        if f"image_path_{verify}_mb_s" in px:
            rows.append((f"pixel path: read + verify {verify} + shard write",
                         f"{px[f'image_path_{verify}_mb_s']:.0f} MB/s "
                         f"({px[f'ratio_image_path_{verify}_over_copy']:.2f} x copy)"))
        rows.append((f"pixel path: whole prepare --verify {verify}", f"{px[f'prepare_{verify}_mb_s']:.0f} MB/s "
                     f"({px[f'ratio_{verify}_over_copy']:.2f} x copy)"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)

if __name__ == "__main__":
    main()
