"""Typed configuration: YAML presets in ``configs/`` plus ``key=value`` overrides.

Every job takes ``--config FILE`` and any number of ``section.key=value`` overrides. The
result is validated *before* any Ray work starts: an unknown key, a value of the wrong type
or one outside its allowed set raises :class:`ConfigError` whose message names the key and
what is allowed, e.g.::

    train.optimizer: 'adamw' is not one of 'adam', 'rmsprop', 'sgd'

Sections are plain dataclasses; ``Literal[...]`` fields list their allowed values, and
``__post_init__``-free validation lives in :func:`_check_ranges`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from dvsa.errors import DvsaError


class ConfigError(DvsaError, ValueError):
    """A configuration problem, phrased as one line that names the offending key."""


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    # Directory (or fsspec URL) holding {split}-NNNNNN.tar + manifest.json + vocab.json.
    shards: str = "runs/data/vg"
    # Karpathy-split (full-image caption) shards, used by the full-frame captioner.
    fullframe_shards: Optional[str] = None
    image_size: int = 224           # images are resized to image_size x image_size
    max_regions: int = 20           # alignment model: up to this many boxes (whole image included)
    max_len: int = 17               # START + words + END: T = max_len - 1 = 16 steps (section 3.2)
    batch_size: int = 32
    val_batch_size: int = 64
    decode_concurrency: int = 1     # Ray Data map_batches workers for JPEG decode
    # rows per decoded chunk = per Ray Data output block; a multiple of the train batch lets
    # iter_batches slice batches out of blocks without copying (128: docs/ingest.md, "Parity")
    decode_batch_size: int = 128
    prefetch_batches: int = 2
    max_val_images: int = 200       # cap on validation images (METEOR subset)
    features: Optional[str] = None  # precomputed frozen-CNN feature shards (dvsa features)
    # pil: reduced-size draft decode; torchvision: decode_jpeg + resize; gpu: Ray Data passes the
    # JPEG bytes on and the train worker decodes each batch on its device (nvJPEG on CUDA)
    jpeg_decoder: Literal["pil", "torchvision", "gpu"] = "pil"
    decode_pool: Literal["tasks", "actors"] = "tasks"    # map_batches as tasks or an actor pool
    shuffle_buffer: int = 256       # rows in the local shuffle buffer of training iteration (0: off)
    # fail the job when more than this fraction of a split's samples is skipped in one pass
    # (corrupt JPEG, missing member, bad boxes, truncated shard...); 1.0 never fails
    max_skip_fraction: float = 0.05


@dataclass
class ModelConfig:
    backbone: Literal["tiny", "resnet18", "resnet50", "resnet101", "vgg16"] = "resnet18"
    weights: Optional[str] = None   # torchvision weights name (e.g. ResNet18_Weights.DEFAULT) or a file path
    trainable: bool = True          # fine-tune the CNN, or keep it frozen
    region_features: Literal["roi_align", "crop"] = "roi_align"
    roi_size: int = 7
    crop_size: int = 224
    embed_dim: int = 256            # h: multimodal embedding size (paper: 1,000-1,600)
    word_dim: int = 128             # word vectors x_t (paper: 300)
    hidden_dim: int = 256           # RNN hidden size (paper: 300-600, captioner 512)
    word_vectors: Optional[str] = None  # optional text file "word v1 v2 ..." to initialise W_w
    freeze_word_vectors: bool = False   # keep W_w fixed (the paper keeps word2vec vectors fixed)
    dropout: float = 0.0
    # alignment model: add W_g g(b) to eq. 1, g = the box's corners and area over the image side
    # (absolute position: "on the left"); needs the images and boxes, not precomputed features
    box_geometry: bool = False


@dataclass
class AlignConfig:
    sentence_encoder: Literal["brnn", "bow"] = "brnn"
    score: Literal["eq8", "eq7"] = "eq8"
    loss: Literal["sum", "hardest"] = "sum"  # eq. 9 sum over violators, or VSE++ hardest negative
    # S_kl over the words of sentence l: their sum (eq. 8 as written) or their mean (S_kl / |l|,
    # so a long sentence does not outscore a short one for every image)
    word_pool: Literal["sum", "mean"] = "sum"
    margin: float = 1.0
    mrf_beta: float = 1.0
    whole_image: bool = True        # the whole image is a candidate region (paper: it + 19 detections)


#: ``caption.decode``: how captions are generated (beam search, greedy argmax, sampling)
CaptionDecode = Literal["beam", "greedy", "sample"]


@dataclass
class CaptionConfig:
    mode: Literal["fullframe", "region"] = "region"
    cell: Literal["rnn", "lstm"] = "lstm"
    beam_size: int = 3
    decode: CaptionDecode = "beam"
    temperature: float = 1.0
    max_regions_per_image: int = 20  # region captioner: regions sampled per image per step
    rnn_input_relu: bool = False    # rnn cell: pass W_hx x_t through ReLU too (paper, sec. 3.2)


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0              # 0 = no cap; else stop after this many optimizer steps
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "rmsprop", "sgd"] = "adam"
    momentum: float = 0.9            # sgd only (the paper's alignment model); rmsprop and adam take none
    grad_clip: float = 5.0          # clip value (0 disables)
    grad_clip_mode: Literal["value", "norm"] = "value"  # per element (the paper's RNN) or the global norm
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    amp: bool = True                # bf16 autocast on CUDA (ignored on CPU)
    storage_path: str = "runs/ray_results"
    name: Optional[str] = None      # Ray Train run name; the same name resumes
    max_failures: int = 2
    # seconds to wait for the cluster to place the workers (num_workers x cpus/gpus_per_worker);
    # then the job ends naming what is missing (0: wait forever, e.g. for a slow autoscaler)
    start_timeout_s: float = 600.0
    checkpoint_every: int = 1       # epochs between checkpoints
    keep_checkpoints: int = 2       # best-k by the validation metric (the k most recent with checkpoint_select=last)
    # the run's model (registered, evaluated, loaded from a run dir): the best checkpoint by the
    # validation metric, or the last one (a schedule that decays to 0, a validation set too small
    # to rank epochs: docs/training.md, "Which checkpoint")
    checkpoint_select: Literal["best", "last"] = "best"
    val_every: int = 1
    log_every: int = 10             # steps between train-loss reports
    seed: int = 0
    # GPU step switches (docs/training.md, "GPU step"); the defaults are the plain path, and each
    # is harmless on the CPU. configs/vg.yaml (the GPU preset) turns them on.
    channels_last: bool = False     # the CNN's weights and images in channels-last (NHWC) memory format
    compile: Literal["none", "cnn", "model"] = "none"   # torch.compile the CNN trunk, or the whole model
    # optimizer kernels: auto = fused on CUDA (adam, sgd; foreach for rmsprop), foreach on the CPU
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    cudnn_benchmark: bool = False   # let cuDNN time its convolution algorithms once per input shape
    # every padded region slot through RoIAlign and the captioner, masked out of the loss, instead
    # of selecting the occupied rows: no tensor shape depends on the data, so a step reads nothing
    # back from the GPU and torch.compile sees one shape (costs the padded slots' compute)
    static_shapes: bool = False
    # linear LR scaling: train.lr is meant for a global batch of lr_scale_batch images; the optimizer
    # gets lr x data.batch_size x train.num_workers / lr_scale_batch (0: train.lr as given)
    lr_scale_batch: int = 0


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # default: sqlite:///<out>/mlflow.db; MLFLOW_TRACKING_URI overrides
    experiment: str = "dvsa"
    run_name: Optional[str] = None
    # a training job logs its best checkpoint as the run's MLflow model (runs:/<run id>/model) ...
    log_model: bool = True
    # ... and registers it as a new version of `registered_model` (models:/<name>/latest); null:
    # the job's train name (train.name, else <name>-<task>[-<mode>-<cell>]; see registry_name)
    register_model: bool = True
    registered_model: Optional[str] = None


@dataclass
class RayConfig:
    address: Optional[str] = None   # None: RAY_ADDRESS or an embedded local Ray
    num_cpus: Optional[int] = None  # for an embedded local Ray
    num_gpus: Optional[int] = None


@dataclass
class TuneConfig:
    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = 4
    max_concurrent_trials: int = 1
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "optuna", "grid"] = "random"
    grace_period: int = 1
    reduction_factor: int = 2
    time_budget_s: Optional[float] = None
    # resources of one trial's Train workers, split evenly over train.num_workers (fractional GPUs
    # let several single-worker trials share a GPU); the trial's own driver takes driver_cpus
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    driver_cpus: float = 0.1        # the Tune trial function (it only waits on its TorchTrainer); > 0
    name: Optional[str] = None      # sweep name; re-running a sweep with the same name resumes it
    best_scope: Literal["last", "all"] = "last"   # rank trials by their last epoch or their best one
    # search space: {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.hidden_dim": {"choice": [...]}}
    space: dict = field(default_factory=dict)


@dataclass
class Config:
    name: str = "dvsa"
    task: Literal["align", "caption"] = "caption"
    out: str = "runs"               # where this job's outputs, Ray temp dir and MLflow db go
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    # ----------------------------------------------------------------- helpers
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}``: the resolved config as MLflow params."""
        return flatten(self.to_dict())

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted-key overrides applied and validated."""
        return from_dict(_apply_overrides(self.to_dict(), overrides))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- loading


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("tune.space"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "caption.mode=region"]`` -> ``{"train.lr": 0.01, ...}``.

    Values are parsed as YAML scalars, so ``1e-3``, ``true``, ``null`` and ``[1, 2]`` work.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=0.01)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        out[key] = _numeric(value)
    return out


def _numeric(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; users mean a number."""
    if isinstance(value, str):
        try:
            return int(value) if value.lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def _apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    base = _deepcopy(base)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = base
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: unknown key ({_allowed_keys_hint(node)})")
            if node[p] is None:
                node[p] = {}
            node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {'.'.join(parts[:-1])} is not a section")
        node[parts[-1]] = value
    return base


def _allowed_keys_hint(node: Any) -> str:
    if isinstance(node, dict):
        return "allowed: " + ", ".join(sorted(node))
    return "not a section"


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


#: a preset's top-level key naming the preset it extends (a path relative to the preset's folder)
BASE_KEY = "base"


def read_preset(path: str | os.PathLike) -> dict:
    """A YAML preset as a raw mapping, with the preset its ``base:`` names (recursively) merged
    under it: ``configs/demo_align.yaml`` is ``configs/demo.yaml`` plus the alignment model's
    own settings. Raises ConfigError (missing file, bad YAML, a cycle of bases)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    return _read_preset(p, ())


def _read_preset(p: Path, seen: tuple) -> dict:
    if p.resolve() in seen:
        raise ConfigError(f"{p}: {BASE_KEY}: presets extend each other in a cycle "
                          f"({' -> '.join(str(s) for s in seen + (p.resolve(),))})")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{p}: {BASE_KEY}: expected the file name of a preset, got {base!r}")
    base_path = p.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{p}: {BASE_KEY}: no such file: {base_path}")
    return _merge(_read_preset(base_path, seen + (p.resolve(),)), raw)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML preset (or the defaults; its ``base:`` first, see :func:`read_preset`),
    apply overrides, validate; raise ConfigError."""
    raw: dict = {}
    if path is not None:
        raw = read_preset(path)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        base = _merge(Config().to_dict(), raw)
        raw = _apply_overrides(base, ov)
    return from_dict(raw)


def _merge(base: dict, upd: dict) -> dict:
    out = _deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "space":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    _check_ranges(cfg)
    return cfg


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{prefix}{k}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # hints are classes, never instances
        return _build(tp, value, key + ".")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


# a registered model's name: it goes into models:/<name>/<version> and models:/<name>@<alias>
REGISTERED_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
REGISTERED_MODEL_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 characters"


def registry_name(text: str) -> str:
    """``text`` as a registered-model name (:data:`REGISTERED_MODEL_NAME`): every run of other
    characters becomes '-' (``"vg caption/region"`` -> ``"vg-caption-region"``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-._")[:200]
    return name or "dvsa"


_POSITIVE_INT = {
    "data.image_size", "data.max_regions", "data.batch_size", "data.val_batch_size",
    "data.decode_concurrency", "data.decode_batch_size", "model.roi_size", "model.crop_size",
    "model.embed_dim", "model.word_dim", "model.hidden_dim", "caption.beam_size",
    "caption.max_regions_per_image", "train.epochs", "train.num_workers", "train.checkpoint_every",
    "train.keep_checkpoints", "train.val_every", "train.log_every", "tune.num_samples",
    "tune.max_concurrent_trials", "tune.grace_period",
}
_NON_NEGATIVE = {
    "data.prefetch_batches", "data.max_val_images", "data.shuffle_buffer", "train.max_steps", "train.weight_decay",
    "train.grad_clip", "train.max_failures", "train.momentum", "align.mrf_beta", "train.start_timeout_s",
    "train.lr_scale_batch",
    "tune.gpus_per_trial",
}


def _check_ranges(cfg: Config) -> None:
    flat = cfg.flat()
    for key, value in flat.items():   # NaN passes every `<` check below, and inf is no setting
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    for key in ("ray.num_cpus", "ray.num_gpus"):
        if flat[key] is not None and flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0 or null, got {flat[key]!r}")
    for key in _POSITIVE_INT:
        if flat[key] <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {cfg.model.dropout!r}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {cfg.train.lr!r}")
    if cfg.train.optimizer_impl == "fused" and cfg.train.optimizer == "rmsprop":
        raise ConfigError("train.optimizer_impl: 'fused' kernels exist for adam and sgd, not rmsprop "
                          "(use 'auto' or 'foreach')")
    if cfg.train.static_shapes and cfg.model.region_features != "roi_align" and not cfg.data.features:
        raise ConfigError("train.static_shapes: needs model.region_features=roi_align (the crop path cuts "
                          "each box out on the host)")
    if cfg.data.max_len < 3:
        raise ConfigError(f"data.max_len: must be >= 3 (START, a word, END), got {cfg.data.max_len!r}")
    if cfg.model.box_geometry and cfg.data.features:
        raise ConfigError("model.box_geometry: needs the images and boxes; data.features holds CNN features only "
                          "(set data.features=null)")
    if cfg.caption.temperature <= 0:
        raise ConfigError(f"caption.temperature: must be > 0, got {cfg.caption.temperature!r}")
    if not 0.0 <= cfg.data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction: must be in [0, 1], got {cfg.data.max_skip_fraction!r}")
    if cfg.train.cpus_per_worker <= 0:
        raise ConfigError(f"train.cpus_per_worker: must be > 0, got {cfg.train.cpus_per_worker!r}")
    for key in ("tune.cpus_per_trial", "tune.driver_cpus"):
        if flat[key] <= 0:
            raise ConfigError(f"{key}: must be > 0 (Ray refuses a trial without CPU), got {flat[key]!r}")
    if cfg.tune.time_budget_s is not None and cfg.tune.time_budget_s <= 0:
        raise ConfigError(f"tune.time_budget_s: must be > 0 or null, got {cfg.tune.time_budget_s!r}")
    if cfg.tune.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor: must be >= 2, got {cfg.tune.reduction_factor!r}")
    for k, spec in cfg.tune.space.items():
        _check_space_entry(cfg, k, spec)
    name = cfg.mlflow.registered_model
    if name is not None and not REGISTERED_MODEL_NAME.match(name):
        raise ConfigError(f"mlflow.registered_model: {name!r} is not a registered-model name ({REGISTERED_MODEL_RULE})")


_SPACE_KINDS = ("uniform", "loguniform", "choice", "grid", "randint")


def _check_space_entry(cfg: Config, key: str, spec: Any) -> None:
    where = f"tune.space.{key}"
    flat = cfg.flat()
    if key not in flat:
        raise ConfigError(f"{where}: {key!r} is not a config key")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(_SPACE_KINDS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in _SPACE_KINDS:
        raise ConfigError(f"{where}: {kind!r} is not one of {', '.join(repr(k) for k in _SPACE_KINDS)}")
    if kind in ("uniform", "loguniform", "randint"):
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
            raise ConfigError(f"{where}.{kind}: expected [low, high], got {args!r}")
        if args[0] >= args[1]:
            raise ConfigError(f"{where}.{kind}: low must be < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {args!r}")
    else:
        if not (isinstance(args, list) and args):
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    # each candidate value must itself be valid for the key
    samples = args if kind in ("choice", "grid") else [args[0], args[1]]
    for v in samples:
        try:
            cfg.replace(**{"tune.space": {}, key: v})
        except ConfigError as e:
            raise ConfigError(f"{where}: candidate {v!r} is invalid: {e}") from None
