"""Ray Tune sweeps over the training jobs, recorded in MLflow (parent run + one child per trial).

:func:`run_sweep` (``dvsa tune`` / ``python -m jobs.tune``) is the entry; :mod:`.space` turns
the config's ``tune`` section into Tune's search space, searcher, scheduler and resources,
:mod:`.trial` is what a trial runs, :mod:`.mlflow_callback` the driver-side MLflow record, and
:mod:`.report` the summary table and the best config YAML.
"""

from dvsa.tuning.report import SweepOutcome, TrialRow
from dvsa.tuning.sweep import run_sweep, sweep_name

__all__ = ["SweepOutcome", "TrialRow", "run_sweep", "sweep_name"]
