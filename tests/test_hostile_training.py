"""Training survives bad samples (skipped, counted, named), says why it cannot start, and ends
its MLflow run KILLED on SIGTERM: the exact inputs of issue 11's training cases, no Ray."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dvsa.config import Config, ConfigError
from dvsa.errors import Terminated, raise_on_sigterm
from dvsa.ingest.builder import BatchBuilder, IngestSpec
from dvsa.ingest.samples import ERROR_COLUMN, LOST_COLUMN
from dvsa.ingest.shard_source import read_shard
from dvsa.text import Vocab
from dvsa.train import placement
from dvsa.train.skips import SkipPlan, SkipWatch, summary_lines

VOCAB = Vocab.build(Counter({"a": 5, "red": 5, "dog": 5}), 1, 10)


def _jpeg(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _meta(i: int, box=(4, 4, 40, 30)) -> dict:
    return {"image_id": i, "width": 64, "height": 48, "sentences": [{"tokens": ["a", "red", "dog"]}],
            "regions": [{"id": i, "box": list(box), "tokens": ["a", "red", "dog"]}]}


class ListCounter:
    """What a SkipCounter records, without Ray."""

    def __init__(self):
        self.counts, self.examples = Counter(), {}

    def add(self, counts, examples=None):
        self.counts.update(counts)
        for k, v in (examples or {}).items():
            self.examples.setdefault(k, v)


def _batch(rows: list[dict]) -> dict:
    """A raw read batch as Ray Data hands it to map_batches (object columns; a member the
    sample lacks is None, or NaN when pandas built the block)."""
    cols = sorted({k for r in rows for k in r})
    return {c: np.array([r.get(c) for r in rows], dtype=object) for c in cols}


@pytest.mark.parametrize("layout", ["caption_region", "align"])
def test_bad_samples_are_skipped_counted_and_named(layout):
    url = "/data/vg/train-000003.tar"
    good = {"__key__": "good", "__url__": url, "jpg": _jpeg(), "json": json.dumps(_meta(1)).encode()}
    rows = [
        good,
        {"__key__": "no_jpg", "__url__": url, "jpg": math.nan, "json": json.dumps(_meta(2)).encode()},
        {"__key__": "no_json", "__url__": url, "jpg": _jpeg(), "json": None},
        {"__key__": "nan_box", "__url__": url, "jpg": _jpeg(),
         "json": json.dumps(_meta(3, box=(math.nan,) * 4)).encode()},      # json.dumps writes NaN
        {"__key__": "abc_box", "__url__": url, "jpg": _jpeg(),
         "json": json.dumps(_meta(4, box=("abc", 1, 2, 3))).encode()},
        {"__key__": "regions_str", "__url__": url, "jpg": _jpeg(),
         "json": json.dumps({**_meta(5), "regions": "oops"}).encode()},
        {"__key__": "", "__url__": "/data/vg/train-000009.tar", ERROR_COLUMN: "ReadError: unexpected end of data",
         LOST_COLUMN: 37},
    ]
    counter = ListCounter()
    spec = IngestSpec(layout=layout, image_size=32, rows=2, max_len=6, randomize=False)
    out = BatchBuilder(spec, VOCAB, counter)(_batch(rows))
    assert out["image_id"].tolist() == [1]
    assert np.isfinite(out["boxes"]).all()
    assert counter.counts == {"missing_image": 1, "bad_json": 1, "bad_box": 2, "bad_fields": 1, "truncated_shard": 37}
    assert counter.examples["bad_box"] == f"nan_box ({url}): bad_box: regions[0].box = [nan, nan, nan, nan]"
    assert counter.examples["missing_image"].startswith(f"no_jpg ({url})")
    assert counter.examples["truncated_shard"] == "/data/vg/train-000009.tar: ReadError: unexpected end of data"


def _shard(path, n: int) -> bytes:
    with tarfile.open(path, "w") as t:
        for i in range(n):
            for ext, data in (("jpg", _jpeg()), ("json", json.dumps(_meta(i)).encode())):
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def _read(path, expected=None):
    with open(path, "rb") as f:
        frames = list(read_shard(f, str(path), ["jpg", "json"], expected))
    keys = [k for fr in frames if ERROR_COLUMN not in fr for k in fr["__key__"]]
    markers = [r for fr in frames if ERROR_COLUMN in fr for r in fr.to_dict("records")]
    return keys, markers


def test_a_truncated_shard_delivers_what_it_has_then_a_marker(tmp_path):
    path = tmp_path / "train-000000.tar"
    data = _shard(path, 6)
    assert _read(path, 6) == ([f"k{i:03d}" for i in range(6)], [])
    # cut inside the 4th sample's jpg: the samples before the one being grouped (webdataset yields
    # a sample when the next key starts), then the marker counting the other four
    offsets = [m.offset for m in tarfile.open(path).getmembers()]
    path.write_bytes(data[: offsets[6] + 700])
    keys, markers = _read(path, 6)
    assert keys == ["k000", "k001"]
    assert len(markers) == 1 and markers[0][LOST_COLUMN] == 4 and markers[0]["__url__"] == str(path)
    assert markers[0][ERROR_COLUMN] == "ReadError: unexpected end of data (after 2 samples)"
    # cut exactly between two samples: the tar reader sees a clean end; the manifest's count does not
    path.write_bytes(data[: offsets[8]])
    keys, markers = _read(path, 6)
    assert keys == ["k000", "k001", "k002", "k003"]
    assert markers[0][ERROR_COLUMN] == "the archive ends after 4 of its 6 samples" and markers[0][LOST_COLUMN] == 2
    # without a manifest count a tar error still counts (one sample at least)
    path.write_bytes(data[: offsets[6] + 700])
    assert _read(path)[1][0][LOST_COLUMN] == 1


class FakeCounter:
    def __init__(self, seq):
        self.seq, self.i = list(seq), 0

    def counts(self):
        c = self.seq[min(self.i, len(self.seq) - 1)]
        self.i += 1
        return dict(c)

    def examples(self):
        return {"corrupt_image": "k7 (train-000001.tar): broken JPEG", "missing_image": "k9 (train-000002.tar): x"}


def test_skips_are_logged_per_pass_and_too_many_stop_the_job():
    train = FakeCounter([{}, {"corrupt_image": 2}, {"corrupt_image": 3, "missing_image": 1}, {"corrupt_image": 9}])
    val = FakeCounter([{}, {}])
    watch = SkipWatch(SkipPlan({"train": train, "val": val}, {"train": 100, "val": 20}, 0.05))
    assert watch.pass_done("train") == ({"data/skipped_corrupt_image": 2.0, "data/skipped": 2.0}, None)
    assert watch.pass_done("val") == ({}, None)
    metrics, problem = watch.pass_done("train")        # per pass: 1 more corrupt, 1 missing
    assert metrics == {"data/skipped_corrupt_image": 1.0, "data/skipped_missing_image": 1.0, "data/skipped": 2.0}
    assert problem is None
    metrics, problem = watch.pass_done("train")        # 9 - 3 = 6 of 100 > 5 %
    assert metrics["data/skipped"] == 6.0
    assert problem == ("data.max_skip_fraction: 6 of 100 train samples (6.0%) were skipped in one pass, more "
                       "than 5.0%; mostly corrupt_image (6), first: k7 (train-000001.tar): broken JPEG (fix or "
                       "re-run `dvsa prepare`, or raise data.max_skip_fraction)")
    assert summary_lines({"train": train, "val": val}) == [
        "  skipped train samples (all passes): corrupt_image=9; first corrupt_image: "
        "k7 (train-000001.tar): broken JPEG"]


def test_a_request_that_cannot_fit_a_local_ray_is_refused():
    cfg = Config().replace(**{"train.num_workers": 3, "train.cpus_per_worker": 1.0})
    with pytest.raises(ConfigError) as e:
        placement.check_fits(cfg, {"CPU": 2.0, "memory": 1e9})
    assert str(e.value) == ("train.num_workers=3 x (CPU 1) + CPU 1 for decoding needs CPU 4; this local Ray has "
                            "CPU 2 (ray.num_cpus/ray.num_gpus): lower train.num_workers or train.cpus_per_worker, "
                            "or join a cluster (ray.address)")
    placement.check_fits(cfg.replace(**{"train.num_workers": 1}), {"CPU": 2.0})
    gpu = cfg.replace(**{"train.num_workers": 1, "train.use_gpu": True})
    with pytest.raises(ConfigError, match="needs CPU 2, GPU 1; this local Ray has CPU 2"):
        placement.check_fits(gpu, {"CPU": 2.0})


def test_the_startup_timeout_names_what_is_missing(monkeypatch):
    cfg = Config().replace(**{"train.num_workers": 4, "train.cpus_per_worker": 8.0, "train.use_gpu": True,
                              "train.start_timeout_s": 120.0})
    monkeypatch.delenv(placement.START_TIMEOUT_ENV, raising=False)
    placement.set_start_timeout(cfg)
    assert os.environ[placement.START_TIMEOUT_ENV] == "120"
    nodes = [{"CPU": 16.0, "GPU": 2.0, "memory": 1e10}, {"CPU": 4.0}]
    assert placement.startup_timeout_message(cfg, nodes, {"CPU": 2.0, "GPU": 0.0}) == (
        "train.start_timeout_s=120: the cluster could not place 4 worker(s) of {CPU 8, GPU 1} in time; its 2 "
        "node(s) have CPU 16, GPU 2 | CPU 4 (CPU 2, GPU 0 free now). Add nodes (or let the autoscaler), lower "
        "train.num_workers / train.cpus_per_worker / train.gpus_per_worker, or raise train.start_timeout_s")


def test_config_bounds_of_the_new_keys():
    from dvsa.config import load_config

    with pytest.raises(ConfigError, match=r"data.max_skip_fraction: must be in \[0, 1\], got 1.5"):
        load_config(None, ["data.max_skip_fraction=1.5"])
    with pytest.raises(ConfigError, match="train.start_timeout_s: must be >= 0"):
        load_config(None, ["train.start_timeout_s=-1"])


def test_sigterm_ends_the_run_killed(tmp_path):
    from dvsa import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, _ = tracking.start_run(uri, "sig", "r", {})
    before = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        with pytest.raises(Terminated):
            with tracking.ending(run):
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()     # the handler raises here at the latest
    finally:
        signal.signal(signal.SIGTERM, before)
    assert tracking.client(uri).get_run(run.run_id).info.status == "KILLED"
