"""``dvsa demo``: the whole chain on a synthetic world, on one local Ray, in minutes.

synth -> prepare (VG regions, Karpathy-split sentences + proposals) -> stats -> train the
region captioner, the full-frame captioner and the alignment model (Ray Train) -> evaluate
both captioners on the VG test regions (Table 5) and the alignment model's retrieval
(Table 1) -> attribute accuracy of region captions and word-to-region accuracy before/after
the MRF (only a synthetic world can give these) -> MRF snippet shards (section 4.3) ->
a text search (Fig. 7) -> ``dvsa compare``. Every step is the product's own command or
library function; the demo only chains them and checks what the paper claims.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dvsa import runtime, tracking
from dvsa.cli import main
from dvsa.config import Config, load_config
from dvsa.data.prepare import KarpathySource, PrepareOptions, VGSource, prepare_karpathy, prepare_vg, summary
from dvsa.data.synth import SynthOptions, write_world
from dvsa.errors import DvsaError
from dvsa.evaluation.meteor import check_java
from dvsa.experiments.attributes import attribute_accuracy, stored_sizes
from dvsa.experiments.compare import compare as compare_runs
from dvsa.experiments.word_alignment import evaluate_word_alignment
from dvsa.train.launch import train

log = logging.getLogger(__name__)

EXPERIMENT = "dvsa-demo"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The preset each model trains from (each extends configs/demo.yaml): the demo trains exactly what
# `dvsa train-caption --config configs/demo_region.yaml` / `dvsa train-align --config
# configs/demo_align.yaml` train, and sets only where data, runs and checkpoints go (ENVIRONMENT_KEYS).
PRESETS = {"region": CONFIGS / "demo_region.yaml", "fullframe": CONFIGS / "demo_fullframe.yaml",
           "align": CONFIGS / "demo_align.yaml"}
TASKS = {"region": "caption", "fullframe": "caption", "align": "align"}
RUN_NAMES = {"region": "region-lstm", "fullframe": "fullframe-lstm", "align": "align-brnn"}
ENVIRONMENT_KEYS = ("out", "data.shards", "data.fullframe_shards", "train.storage_path", "mlflow.experiment",
                    "mlflow.run_name", "train.name", "train.seed")

# What the demo checks of the alignment model (issue 12), on the test split of its world.
TARGET_I2T_R1 = 90.0          # image annotation R@1, percent
TARGET_T2I_R1 = 70.0          # image search R@1, percent
TARGET_WORD_ACC_MRF = 0.93    # word -> true box after the MRF, with no object word carrying no evidence


@dataclass
class DemoOptions:
    out: Path
    images: int = 1200
    seed: int = 0
    image_size: int = 128          # synthetic image side (pixels)
    presets: dict = field(default_factory=dict)   # model -> preset file, replacing PRESETS[model]
    overrides: list = field(default_factory=list)  # key=value on top of every model's preset
    num_cpus: Optional[int] = None


@dataclass
class DemoResult:
    table: str = ""
    checks: list = field(default_factory=list)     # (claim, measured, ok)
    metrics: dict = field(default_factory=dict)    # model -> metrics
    runs: dict = field(default_factory=dict)       # model -> MLflow run id
    paths: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok in self.checks)


class _Steps:
    """Numbered progress lines with each step's wall time."""

    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, time.perf_counter()

    def run(self, title: str, fn: Callable, *a, **kw):
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {title} ...", flush=True)
        t = time.perf_counter()
        out = fn(*a, **kw)
        print(f"[{self.i}/{self.total}] {title}: {time.perf_counter() - t:.0f}s "
              f"(total {time.perf_counter() - self.t0:.0f}s)", flush=True)
        return out


def demo_configs(opts: DemoOptions) -> dict[str, Config]:
    """model -> the validated config it trains with: its preset, the demo's environment
    (:data:`ENVIRONMENT_KEYS`), then the user's ``key=value`` overrides (which win)."""
    unknown = sorted(set(opts.presets) - set(PRESETS))
    if unknown:
        raise DvsaError(f"--preset {unknown[0]}: not one of the demo's models ({', '.join(PRESETS)})")
    out = opts.out
    env = [f"out={out}", f"data.shards={out / 'data' / 'vg'}", f"data.fullframe_shards={out / 'data' / 'karpathy'}",
           f"train.storage_path={out / 'ray_results'}", f"mlflow.experiment={EXPERIMENT}", f"train.seed={opts.seed}"]
    cfgs = {}
    for model, default in PRESETS.items():
        path = Path(opts.presets.get(model, default))
        if not path.is_file():
            raise DvsaError(f"demo preset for the {model} model not found: {path} (pass --preset {model}=FILE)")
        own = [f"task={TASKS[model]}", f"train.name={RUN_NAMES[model]}", f"mlflow.run_name={RUN_NAMES[model]}"]
        cfgs[model] = load_config(path, env + own + list(opts.overrides))
    return cfgs


def _cli(*argv: str) -> None:
    code = main([str(a) for a in argv])
    if code:
        raise DvsaError(f"step failed: dvsa {' '.join(map(str, argv))} (exit {code})")


def _evaluate(ckpt: str, cfg: Config, out: Path, name: str, *extra: str) -> dict:
    outcome = out / "eval" / f"{name}.json"
    outcome.parent.mkdir(parents=True, exist_ok=True)
    _cli("evaluate", "--checkpoint", ckpt, "--outcome-json", outcome, *extra, f"out={cfg.out}",
         f"data.shards={cfg.data.shards}", f"data.fullframe_shards={cfg.data.fullframe_shards}",
         f"mlflow.experiment={cfg.mlflow.experiment}")
    return json.loads(outcome.read_text())


def _train(cfg: Config):
    return train(cfg, cfg.task)


def run_demo(opts: DemoOptions) -> DemoResult:
    out = Path(opts.out).resolve()
    opts.out = out
    cfgs = demo_configs(opts)          # validated before anything runs
    cfg = cfgs["align"]                # where things go (the same for the three models)

    check_java()
    out.mkdir(parents=True, exist_ok=True)
    world, vg, kp = out / "world", out / "data" / "vg", out / "data" / "karpathy"
    res = DemoResult()
    steps = _Steps(11)
    t0 = time.perf_counter()
    runtime.quiet_environment()
    with runtime.ray_session(out, None, opts.num_cpus or cfg.ray.num_cpus) as ray_info:
        log.info("Ray: %s", ray_info["mode"])

        def synth():
            if not (world / "truth.json").is_file():
                write_world(world, SynthOptions(images=opts.images, image_size=opts.image_size, seed=opts.seed))
            print(f"  world: {world}")
        steps.run("synthetic world", synth)

        def prepare():
            options = PrepareOptions(progress=False)
            m = prepare_vg(VGSource(str(world / "vg"), split_file=str(world / "vg" / "densecap_splits.json"),
                                    min_count=2), str(vg), options)
            print(summary(m))
            m = prepare_karpathy(KarpathySource(str(world / "karpathy" / "dataset_synth.json"), str(world / "vg"),
                                                proposals=str(world / "karpathy" / "proposals.json"),
                                                vg_shards=str(vg), min_count=2), str(kp), options)
            print(summary(m))
        steps.run("prepare shards (VG regions; Karpathy-split sentences + proposals)", prepare)
        steps.run("caption statistics (region vs full image)", _cli, "stats", vg, kp, "--out", out / "stats")
        res.paths["stats"] = str(out / "stats")

        region = steps.run("train the region captioner (VG regions)", _train, cfgs["region"])
        full = steps.run("train the full-frame captioner (full-image sentences)", _train, cfgs["fullframe"])
        align = steps.run("train the alignment model (BRNN, eq. 8, eq. 9)", _train, cfgs["align"])
        res.runs = {"region": region.run_id, "fullframe": full.run_id, "align": align.run_id}

        def evaluate():
            for key, o in (("region", region), ("fullframe", full)):
                r = _evaluate(o.checkpoint, cfg, out, key, "--max-groups", "600")
                res.metrics[key] = r["metrics"]
                res.paths[f"{key}_eval"] = r["outputs"]
            r = _evaluate(align.checkpoint, cfg, out, "align")
            res.metrics["align"] = r["metrics"]
        steps.run("evaluate: both captioners on VG test regions, retrieval", evaluate)

        def synthetic_truth():
            _attribute_metrics(res, world, vg, tracking.tracking_uri(out, cfg.mlflow.tracking_uri))
            _word_alignment(res, align, cfg, world, kp, out)
        steps.run("synthetic truth: region attributes, word-to-region alignment", synthetic_truth)

        def snippets():
            _cli("snippets", "--checkpoint", align.checkpoint, "--shards", kp, "--out", out / "data" / "snippets")
            res.paths["snippets"] = str(out / "data" / "snippets")
        steps.run("MRF snippet shards (section 4.3)", snippets)

        def search():
            _cli("search", "red circle", "--checkpoint", align.checkpoint, "--shards", kp, "--out", out / "search",
                 "--top", "8")
            res.paths["search"] = str(out / "search")
        steps.run("search regions for \"red circle\" (Fig. 7)", search)

    def compare():
        r = compare_runs(EXPERIMENT, tracking.tracking_uri(out, cfg.mlflow.tracking_uri), out / "compare")
        res.table = r["markdown"]
        res.paths["compare"] = str(out / "compare")
    steps.run("compare (dvsa compare)", compare)
    res.seconds = time.perf_counter() - t0
    _checks(res)
    _report(res, out, cfg)
    return res


def _attribute_metrics(res: DemoResult, world: Path, vg: Path, uri: str) -> None:
    truth = json.loads((world / "truth.json").read_text())
    for key in ("region", "fullframe"):
        preds = [json.loads(line) for line in open(Path(res.paths[f"{key}_eval"]) / "predictions.jsonl")]
        sizes = stored_sizes(str(vg), "test", {str(p["image_id"]) for p in preds})
        r = attribute_accuracy(preds, truth, sizes)
        m = r.metrics("region")
        res.metrics[key].update(m)
        logger = tracking.RunLogger(uri, res.runs[key])
        logger.log_metrics(m, step=0)
        logger.flush()
        print(f"  {key}: colour+shape right for {r.accuracy:.1%} of {r.regions} test regions "
              f"(colour {r.colour_accuracy:.1%}, shape {r.shape_accuracy:.1%})")
        for cap, colour, shape in r.examples[:3]:
            print(f"    e.g. {cap!r} for a {colour} {shape}")


def _word_alignment(res: DemoResult, align, cfg: Config, world: Path, kp: Path, out: Path) -> None:
    r = evaluate_word_alignment(align.checkpoint, str(world), str(kp), split="test",
                                out_dir=str(out / "pictures"), tracking_uri=align.tracking_uri, run_id=align.run_id)
    w = r["result"]
    res.metrics["align"].update(w.metrics())
    res.paths["alignment_figure"] = str(r["figure"])
    print(f"  word -> true box: {w.acc_argmax:.1%} per-word argmax, {w.acc_mrf:.1%} after the MRF "
          f"(beta {w.beta:g}); chance {w.chance:.1%}; {w.words} object words")


def _silent_words(fraction: float, words) -> str:
    """How many object words carry no evidence, counted (a rounded percentage hides a few)."""
    if not words:
        return f"{fraction:.2%} of object words carry no evidence"
    n = round(fraction * words)
    return f"{n} of {int(words)} object words ({fraction:.2%}) carry no evidence"


def _checks(res: DemoResult) -> None:
    reg, full, al = res.metrics.get("region", {}), res.metrics.get("fullframe", {}), res.metrics.get("align", {})
    c = res.checks
    c.append(("region captioner beats full-frame on region METEOR (Table 5)",
              f"{reg.get('region/METEOR', float('nan')):.3f} vs {full.get('region/METEOR', float('nan')):.3f}",
              reg.get("region/METEOR", 0) > full.get("region/METEOR", 1)))
    c.append(("region captions name colour and shape of >= 95% of test regions",
              f"{reg.get('region/attr_acc', 0):.1%}", reg.get("region/attr_acc", 0) >= 0.95))
    mrf, dead = al.get("align/word_acc_mrf", 0.0), al.get("align/word_no_evidence", 1.0)
    silent = _silent_words(dead, al.get("align/word_acc_words"))
    c.append((f"word-to-region accuracy after the MRF >= {TARGET_WORD_ACC_MRF:.2f}, every object word with evidence",
              f"{mrf:.3f} (argmax {al.get('align/word_acc_argmax', 0):.3f}, "
              f"chance {al.get('align/word_acc_chance', 0):.3f}; {silent})",
              mrf >= TARGET_WORD_ACC_MRF and dead == 0.0))
    n = al.get("retrieval/images", 0.0) or 0.0
    chance = 100.0 / n if n else 100.0
    for claim, key, target in (("image annotation", "retrieval/i2t_r1", TARGET_I2T_R1),
                               ("image search", "retrieval/t2i_r1", TARGET_T2I_R1)):
        r1 = al.get(key, 0.0)
        c.append((f"{claim} R@1 >= {target:.0f}% (Table 1, full test split of {n:.0f} images)",
                  f"{r1:.1f}% (chance {chance:.1f}%)", r1 >= target))


def _report(res: DemoResult, out: Path, cfg: Config) -> None:
    print("\n" + res.table)
    print("What the paper claims, measured here:")
    for claim, measured, ok in res.checks:
        print(f"  [{'ok' if ok else 'MISSED'}] {claim}: {measured}")
    print(f"\nDone in {res.seconds / 60:.1f} min. Look at:")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    print(f"  mlflow ui --backend-store-uri {uri} --host 127.0.0.1   (experiment {EXPERIMENT!r})")
    for k, v in res.paths.items():
        print(f"  {k:<17} {v}")
    (out / "demo.json").write_text(json.dumps({"checks": res.checks, "metrics": res.metrics, "runs": res.runs,
                                               "paths": res.paths, "seconds": res.seconds}, indent=2))
