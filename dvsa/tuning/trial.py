"""What one Tune trial runs: the sweep's base config with the trial's sampled values, trained by
the same ``TorchTrainer`` a single job uses (:func:`dvsa.train.launch.make_trainer`).

Ray 2.60 Train V2 under Tune: the trial function builds and fits the trainer; the trainer's
``RunConfig`` carries ``TuneReportCallback``, which forwards rank 0's per-epoch
``ray.train.report`` metrics to Tune (the scheduler and the sweep's MLflow callback see them).
The trial's Train run is named after the trial id under ``<storage>/<sweep>-trials``: when an
interrupted sweep is resumed, an unfinished trial's trainer resumes from its own checkpoint.
"""

from __future__ import annotations

import posixpath
from typing import Optional

from dvsa import runtime
from dvsa.config import Config, from_dict
from dvsa.data.manifest import Manifest
from dvsa.errors import DataError
from dvsa.train import launch
from dvsa.tuning import space


def trials_storage(storage_path: str, sweep: str) -> str:
    """Where the trials' Train runs (checkpoints) live: a sibling of Tune's experiment dir."""
    return posixpath.join(storage_path, f"{sweep}-trials")


def trial_config(base: Config, params: dict, sweep: str, trial_id: str, storage_path: str) -> Config:
    """The config one trial trains with: ``base`` + sampled ``params`` + per-trial settings
    (its own Train run name and storage, validation every epoch, resources from ``tune.*``)."""
    cfg = space.apply_params(base, params)
    return cfg.replace(**{
        "train.name": trial_id,
        "train.storage_path": trials_storage(storage_path, sweep),
        "train.val_every": 1,          # the scheduler needs the metric at every report
        "mlflow.run_name": None,
        **space.worker_settings(cfg),
    })


def trial_main(params: dict, *, base: dict, sweep: str, storage_path: str,
               manifest: Optional[Manifest] = None) -> None:
    """The Tune trainable (wrapped by ``tune.with_parameters``); the metrics reach Tune epoch by
    epoch through ``TuneReportCallback``. A training failure raises: Tune marks the trial ERROR."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    env = runtime.quiet_environment()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(base), params, sweep, trial_id, storage_path)
    trainer = launch.make_trainer(cfg, cfg.task, cfg.train.name, manifest=manifest,
                                  callbacks=[TuneReportCallback()], env_vars=env)
    result = trainer.fit()
    aborted = (result.return_value or {}).get("aborted")
    if aborted:                        # too much bad data (data.max_skip_fraction): the trial errors
        raise DataError(aborted)
