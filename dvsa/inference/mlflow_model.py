"""A trained dvsa model as an MLflow model (``mlflow.pyfunc``): what a training job logs at the
end of its run (``runs:/<run id>/model``) and registers (``models:/<name>/<version|latest>``),
so that ``mlflow.pyfunc.load_model(uri)`` works wherever the tracking server is reachable.

* a captioner (:class:`CaptionerModel`): input a DataFrame with an ``image`` column (a path, or
  the image file's bytes) and optionally ``boxes`` (per row a list of ``[x1, y1, x2, y2]`` in
  pixels of the image, or VG region objects; missing or empty: the whole image); output one row
  per box: ``row`` (the input row), ``box`` (clipped to the image), ``caption``, ``logprob``:
  what ``dvsa caption`` prints for the same image and boxes. Params: ``decode``
  (beam|greedy|sample; "" = the checkpoint's), ``beam_size`` (0 = the checkpoint's),
  ``box_format`` (xyxy|xywh), ``max_megapixels``.
* an alignment model (:class:`AlignmentScorer`): input ``image``, ``sentence`` and optionally
  ``boxes`` (the image's region proposals); output ``score`` per row, the image-sentence score
  S_kl of the model's ``align.score`` (eq. 8, or eq. 7) for the sentence's first
  ``data.max_len`` words (as evaluation scores sentences) over the boxes training would use (the
  whole image first unless ``align.whole_image=false``, then up to ``data.max_regions`` of the
  given boxes; none given: the whole image). Params: ``box_format``, ``max_megapixels``.

Images decode as ``dvsa caption`` decodes them (:mod:`dvsa.inference.own_images`: reduced-size
decode, the pixel cap). The model's files (``artifacts/``) are an inference copy of the
checkpoint (:func:`dvsa.models.checkpoint.write_inference_copy`: ``state.pt`` with the weights,
``vocab.json``, ``config.yaml``, ``checkpoint.json``), loaded in ``load_context`` by
:func:`dvsa.models.checkpoint.load_checkpoint_dir` (``torch.load(..., weights_only=True)``). The
model carries the ``dvsa`` package as its code (``code/dvsa``), so an environment with its pip
requirements loads it without dvsa installed. :func:`log_model` logs and registers one.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from dvsa import tracking
from dvsa.config import Config
from dvsa.errors import DataError, DvsaError
from dvsa.inference.alignment import Embedder, alignment_boxes
from dvsa.inference.boxes_file import BoxFormat, parse_boxes
from dvsa.inference.captioning import BoxCaptioner
from dvsa.inference.device import pick_device
from dvsa.inference.own_images import MAX_MEGAPIXELS, ImageRegions, caption_images, open_image
from dvsa.inference.own_images import model_input as pixels_of
from dvsa.ingest.decode import scale_boxes
from dvsa.ingest.samples import encode_words
from dvsa.models.alignment import AlignmentModel
from dvsa.models.checkpoint import (
    CONFIG_FILE,
    META_FILE,
    STATE_FILE,
    VOCAB_FILE,
    check_checkpoint_dir,
    load_checkpoint_dir,
    write_inference_copy,
)
from dvsa.text import clean_caption

log = logging.getLogger(__name__)

# the distributions the model's code imports (pinned to the versions that logged it)
REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "pyyaml", "fsspec")
ARTIFACTS = {"state": STATE_FILE, "vocab": VOCAB_FILE, "config": CONFIG_FILE, "checkpoint": META_FILE}
SCORE_BATCH = 32          # image-sentence pairs scored at once by the alignment model
UPLOAD_THREADS = 8        # model files uploaded at once (a tracking server takes one request per file)


# --------------------------------------------------------------------------- inputs


def _frame(model_input: Any, required: tuple[str, ...]) -> pd.DataFrame:
    df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"model input: no {missing[0]!r} column (columns: {', '.join(map(str, df.columns)) or 'none'})")
    return df.reset_index(drop=True)


def _plain(value: Any) -> Any:
    """numpy arrays (what pandas and MLflow's schema enforcement make of lists) as lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _image_path(value: Any, row: int, tmp: str) -> str:
    """A path for the row's image: the path given, or its bytes written to a file in ``tmp``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        path = Path(tmp) / f"row-{row}"
        path.write_bytes(bytes(value))
        return str(path)
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    raise DataError(f"row {row}: image: expected a path or the image file's bytes, got {type(value).__name__}")


def _row_boxes(df, row: int, width: int, height: int, box_format: BoxFormat) -> list[list[float]]:
    """The row's boxes (pixels of the image, clipped to it); [] when none are given."""
    value = df.at[row, "boxes"] if "boxes" in df.columns else None
    value = _plain(value)
    if _missing(value) or (isinstance(value, list) and not value):
        return []
    return [b.clipped(width, height) for b in parse_boxes(value, f"row {row}: boxes", box_format)]


def _params(params: Optional[dict]) -> dict:
    p = dict(params or {})
    p["box_format"] = p.get("box_format") or "xyxy"
    p["max_megapixels"] = float(p.get("max_megapixels") or MAX_MEGAPIXELS)
    return p


# --------------------------------------------------------------------------- the pyfunc models


class _CheckpointModel(PythonModel):
    """Loads the checkpoint files of ``context.artifacts`` (one directory) with dvsa's loader."""

    def load_context(self, context) -> None:
        directory = Path(context.artifacts["state"]).parent
        self.model, self.vocab, self.cfg = load_checkpoint_dir(directory)   # weights_only=True
        self.device = pick_device(None)


class CaptionerModel(_CheckpointModel):
    """A captioner: image (+ boxes) rows -> one ``row, box, caption, logprob`` row per box."""

    def load_context(self, context) -> None:
        super().load_context(context)
        self._captioners: dict[tuple, BoxCaptioner] = {}

    def captioner(self, decode: Optional[str], beam_size: Optional[int]) -> BoxCaptioner:
        key = (decode or None, beam_size or None)
        if key not in self._captioners:
            self._captioners[key] = BoxCaptioner(self.model, self.vocab, self.cfg, str(self.device),
                                                 decode=key[0], beam_size=key[1])   # type: ignore[arg-type]
        return self._captioners[key]

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        df = _frame(model_input, ("image",))
        p = _params(params)
        captioner = self.captioner(p.get("decode"), int(p.get("beam_size") or 0))
        with tempfile.TemporaryDirectory(prefix="dvsa-pyfunc-") as tmp:
            inputs = []
            for row in range(len(df)):
                image = open_image(_image_path(df.at[row, "image"], row, tmp), p["max_megapixels"])
                inputs.append(ImageRegions(image, _row_boxes(df, row, image.width, image.height, p["box_format"])))
            results = caption_images(captioner, inputs)
        out = [{"row": row, "box": g["box"], "caption": g["caption"], "logprob": float(g["logprob"])}
               for row, r in enumerate(results) for g in r["regions"]]
        return pd.DataFrame(out, columns=["row", "box", "caption", "logprob"])


class AlignmentScorer(_CheckpointModel):
    """An alignment model: image + sentence (+ boxes) rows -> the score S_kl of each pair."""

    def load_context(self, context) -> None:
        super().load_context(context)
        if not isinstance(self.model, AlignmentModel):
            raise DvsaError(f"this checkpoint is a {self.cfg.task!r} model, not an alignment model")
        self.aligner: AlignmentModel = self.model.to(self.device).eval()

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        import torch

        df = _frame(model_input, ("image", "sentence"))
        p = _params(params)
        cfg: Config = self.cfg
        size = cfg.data.image_size
        images, boxes, tokens, lengths = [], [], [], []
        with tempfile.TemporaryDirectory(prefix="dvsa-pyfunc-") as tmp:
            for row in range(len(df)):
                image = open_image(_image_path(df.at[row, "image"], row, tmp), p["max_megapixels"])
                given = _row_boxes(df, row, image.width, image.height, p["box_format"])
                meta = {"width": image.width, "height": image.height, "proposals": given}
                chosen = alignment_boxes(meta, cfg.data.max_regions, cfg.align.whole_image)
                images.append(pixels_of(image, size))
                boxes.append(scale_boxes(chosen, image.width, image.height, size))
                sentence = df.at[row, "sentence"]
                ids, n = encode_words(self.vocab, clean_caption("" if _missing(sentence) else str(sentence)),
                                      cfg.data.max_len)
                tokens.append(ids)
                lengths.append(n)
        scores = np.zeros(len(df), dtype=np.float64)
        embedder = Embedder(self.aligner, cfg, self.device)
        rows = [i for i in range(len(df)) if lengths[i] > 0]     # no known word: S_kl = 0
        for start in range(0, len(rows), SCORE_BATCH):
            chunk = rows[start:start + SCORE_BATCH]
            with torch.no_grad():
                v, v_mask = embedder.regions([images[i] for i in chunk], [boxes[i] for i in chunk],
                                             max_boxes=max(len(boxes[i]) for i in chunk))
                s, s_mask = embedder.words(np.stack([tokens[i] for i in chunk]),
                                           np.array([lengths[i] for i in chunk], dtype=np.int64))
                S = self.aligner.scores(v, v_mask, s, s_mask)               # [b, b]: image x sentence
            scores[chunk] = torch.diagonal(S).double().numpy()
        return pd.DataFrame({"score": scores})


# --------------------------------------------------------------------------- logging


def signature(task: str):
    """The model's input/output schema and params (given, not inferred: nothing runs)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType, Array

    image = ColSpec(AnyType(), "image")
    boxes = ColSpec(AnyType(), "boxes", required=False)
    common = [ParamSpec("box_format", DataType.string, "xyxy"),
              ParamSpec("max_megapixels", DataType.double, MAX_MEGAPIXELS)]
    if task == "caption":
        return ModelSignature(
            inputs=Schema([image, boxes]),
            outputs=Schema([ColSpec(DataType.long, "row"), ColSpec(Array(DataType.double), "box"),
                            ColSpec(DataType.string, "caption"), ColSpec(DataType.double, "logprob")]),
            params=ParamSchema([ParamSpec("decode", DataType.string, ""), ParamSpec("beam_size", DataType.long, 0),
                                *common]))
    return ModelSignature(inputs=Schema([image, ColSpec(DataType.string, "sentence"), boxes]),
                          outputs=Schema([ColSpec(DataType.double, "score")]), params=ParamSchema(common))


def code_modules() -> list[str]:
    """The dvsa modules this module needs, read from the source (every ``import`` of a dvsa
    module, at any depth, and their packages): what a model carries as its code."""
    root = Path(__file__).resolve().parents[1]            # the dvsa package directory

    def source(module: str) -> Optional[Path]:
        path = root.parent.joinpath(*module.split("."))
        if (path / "__init__.py").is_file():
            return path / "__init__.py"
        return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None

    seen: dict[str, Path] = {}
    todo = [__name__]
    while todo:
        module = todo.pop()
        path = source(module)
        if path is None or module in seen:
            continue
        seen[module] = path
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target.split(".")[0] == "dvsa":
                    todo += [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "dvsa"]
    return sorted(str(p.relative_to(root.parent)) for p in set(seen.values()))


def code_package(out: Path) -> Path:
    """A copy of the dvsa package holding only :func:`code_modules` (36 files, not the whole
    package: each file is one upload to a tracking server); returns its ``dvsa`` directory."""
    root = Path(__file__).resolve().parents[2]
    for rel in code_modules():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, out / rel)
    return out / "dvsa"


def upload(local: Path, artifact_location: str, tracking_uri: str) -> None:
    """Upload the model directory ``local`` to the logged model's artifact location, the files
    in parallel (what ``MlflowClient.log_model_artifacts`` does one file after the other)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_location, tracking_uri=tracking_uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())

    def put(path: Path) -> None:
        folder = path.parent.relative_to(local).as_posix()
        tracking.retry_locked(repo.log_artifact, str(path), None if folder == "." else folder)

    with tracking.quiet_mlflow(), ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, files))


def pip_requirements() -> list[str]:
    """The model's pip requirements: :data:`REQUIREMENTS` pinned to the installed versions
    (a local version label such as ``+cu130`` dropped); given, so MLflow infers nothing."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


@dataclass
class LoggedModel:
    """What :func:`log_model` logged: ``uri`` (``runs:/<run id>/model``), the logged-model id,
    ``registered`` (``models:/<name>/<version>``, None when not registered) and how long it took."""

    uri: str
    model_id: str
    registered: Optional[str]
    seconds: float


def log_model(checkpoint_dir: str | os.PathLike, tracking_uri: str, run_id: str, *,
              registered_name: Optional[str] = None, step: int = 0,
              tags: Optional[dict[str, str]] = None) -> LoggedModel:
    """Log the checkpoint at ``checkpoint_dir`` as the MLflow model :data:`tracking.MODEL_NAME`
    of run ``run_id`` (an MLflow 3 logged model whose source run is ``run_id``, linked to the run
    as an output at ``step``), and register it as a new version of ``registered_name`` when given.

    Everything goes through a client of ``tracking_uri`` (no process-wide MLflow state is set):
    the model directory is written locally (``mlflow.pyfunc.save_model``, explicit pip
    requirements and signature: nothing inferred, nothing run) and uploaded, its files in
    parallel.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    t0 = time.perf_counter()
    cfg = check_checkpoint_dir(checkpoint_dir)
    c = tracking.client(tracking_uri)
    run = tracking.retry_locked(c.get_run, run_id)
    model_type = "dvsa-captioner" if cfg.task == "caption" else "dvsa-alignment"
    all_tags = {"task": cfg.task, tracking.CHECKPOINT_TAG: str(Path(checkpoint_dir).resolve()), **(tags or {})}
    if cfg.task == "caption":
        all_tags.update(mode=cfg.caption.mode, cell=cfg.caption.cell)
    logged = tracking.retry_locked(c.create_logged_model, run.info.experiment_id, name=tracking.MODEL_NAME,
                                   source_run_id=run_id, tags=all_tags, model_type=model_type)
    try:
        with tempfile.TemporaryDirectory(prefix="dvsa-model-") as tmp:
            files = write_inference_copy(checkpoint_dir, Path(tmp) / "checkpoint")
            local = Path(tmp) / "model"
            with tracking.quiet_mlflow():
                mlflow.pyfunc.save_model(
                    str(local), python_model=CaptionerModel() if cfg.task == "caption" else AlignmentScorer(),
                    artifacts={k: str(files / name) for k, name in ARTIFACTS.items() if (files / name).is_file()},
                    code_paths=[str(code_package(Path(tmp) / "code"))], pip_requirements=pip_requirements(),
                    signature=signature(cfg.task),
                    mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                       model_uuid=logged.model_id))
            upload(local, logged.artifact_location, tracking_uri)
        tracking.retry_locked(c.finalize_logged_model, logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            c.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception as e:
            log.warning("could not mark logged model %s FAILED: %s", logged.model_id, e)
        raise
    tracking.retry_locked(c.log_outputs, run_id, [LoggedModelOutput(logged.model_id, step)])
    uri = f"runs:/{run_id}/{tracking.MODEL_NAME}"
    registered = None
    if registered_name:
        registered = register(tracking_uri, registered_name, logged.model_id, run_id, logged.artifact_location)
    return LoggedModel(uri=uri, model_id=logged.model_id, registered=registered, seconds=time.perf_counter() - t0)


def register(tracking_uri: str, name: str, model_id: str, run_id: Optional[str],
             location: Optional[str] = None) -> str:
    """A new version of registered model ``name`` (created when new) for the logged model
    (``location``: its artifact location, when known); returns ``models:/<name>/<version>``."""
    c = tracking.client(tracking_uri)
    try:
        tracking.retry_locked(c.create_registered_model, name)
    except Exception as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e).lower():
            raise DvsaError(f"cannot register the model as {name!r} in {tracking_uri}: {tracking.first_line(e)}") from e
    # the source is the logged model's artifact location, not models:/<model id>: a SQL registry
    # store looks models:/ sources up through MLflow's process-wide tracking URI, not this client's
    location = location or tracking.retry_locked(c.get_logged_model, model_id).artifact_location
    mv = tracking.retry_locked(c.create_model_version, name, source=location, run_id=run_id, model_id=model_id,
                               tags={tracking.MODEL_ID_TAG: model_id})
    return f"models:/{name}/{mv.version}"
