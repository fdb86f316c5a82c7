"""Shared test fixtures: quiet environment, one local Ray per test module."""

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
