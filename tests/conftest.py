"""Shared test fixtures: quiet environment, one local Ray per test module, the markers of the
fast tier, and what the session trains once (the demo's three models).

Tiers: ``pytest -m "not slow"`` runs every test that neither starts Ray nor trains end to end
(minutes); plain ``pytest`` runs everything. A test that uses a Ray-starting fixture
(:data:`RAY_FIXTURES`) or carries the ``ray`` mark is marked ``ray`` and ``slow`` here, at
collection, so no test file has to remember it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s: each report, registered checkpoint and
# the end of every fit waits for the next poll. Every Ray the tests start (and the processes
# they spawn) inherits this environment: 0.5 s saves ~2 s per training job.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# Fixtures that start Ray (or a process that does), directly or through what they train.
RAY_FIXTURES = frozenset({"ray_local", "ray_tune", "cluster", "demo_run", "asha_sweep"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        starts_ray = bool(RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())))
        if starts_ray and not item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)
        if (starts_ray or item.get_closest_marker("ray")) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread in the test process: on 2 cores shared with Ray workers, torch's
    default thread pool oversubscribes the CPU and small models run 10-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for this test module only, with its own short temp dir.

    Ray's socket paths must stay under ~107 chars, hence a short /tmp prefix rather than
    pytest's tmp_path.
    """
    import ray

    tmp = tempfile.mkdtemp(prefix="dvsa-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory) -> Path:
    """A small synthetic world (VG + Karpathy formats) shared by the whole session."""
    from dvsa.data.synth import SynthOptions, write_world

    out = tmp_path_factory.mktemp("world")
    write_world(out, SynthOptions(images=60, image_size=96, seed=0))
    return out


@pytest.fixture(scope="session")
def shards(synth_world, tmp_path_factory) -> Path:
    """VG (regions + groups) and Karpathy (sentences + proposals) shards of ``synth_world``,
    prepared once for the session (read-only to every test)."""
    from eval_fixtures import prepare_shards

    return prepare_shards(synth_world, tmp_path_factory.mktemp("shards"))


# What the demo test passes to `dvsa demo` (see demo_run). log_every=1: every step's loss is
# logged; max_val_images=4: a region captioner validates at most 4 x 4 regions, so the run's
# sample table (16 rows) holds every validation caption and its METEOR can be recomputed.
DEMO_OPTIONS = dict(images=48, image_size=64, num_cpus=2)
DEMO_OVERRIDES = ["train.epochs=1", "data.image_size=32", "data.batch_size=16", "data.max_val_images=4",
                  "train.log_every=1"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``dvsa demo`` once per session on a very small world: ``(options, DemoResult)``.

    Its three training jobs (region captioner, full-frame captioner, alignment model) are the
    session's trained models: tests/test_demo.py checks the demo, tests/test_train.py checks
    each job's run exactly (steps, checkpoints, MLflow contents, recomputed metrics). The demo
    reuses a Ray that is up (a module's ``ray_local``) and otherwise starts and stops its own.
    """
    from dvsa.demo import DemoOptions, run_demo

    opts = DemoOptions(out=tmp_path_factory.mktemp("demo") / "demo", overrides=list(DEMO_OVERRIDES),
                       **DEMO_OPTIONS)
    res = run_demo(opts)
    return opts, res
