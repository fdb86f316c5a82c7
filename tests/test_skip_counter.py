"""dvsa.ingest.counter.SkipCounter: one count for the whole job, whichever process adds to it."""

from __future__ import annotations

import logging
import pickle

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_counts_from_every_handle_add_up(ray_local, caplog):
    from dvsa.ingest.counter import SkipCounter

    counter = SkipCounter()
    assert counter.counts() == {} and counter.total() == 0
    worker_copy = pickle.loads(pickle.dumps(counter))      # what a map_batches worker holds
    counter.add({"corrupt_image": 1, "no_sentence": 0}, {"corrupt_image": "k1 (train-000000.tar): truncated"})
    worker_copy.add({"corrupt_image": 2, "bad_json": 1}, {"corrupt_image": "k9: other", "bad_json": "k3: not json"})

    @ray_local.remote
    def from_a_task(c):
        c.add({"no_sentence": 4})
        return c.counts()

    assert ray_local.get(from_a_task.remote(counter)) == {"corrupt_image": 3, "bad_json": 1, "no_sentence": 4}
    assert counter.total() == 8
    assert counter.examples() == {"corrupt_image": "k1 (train-000000.tar): truncated", "bad_json": "k3: not json"}
    with caplog.at_level(logging.WARNING, logger="dvsa.ingest.counter"):
        assert counter.log("val") == counter.counts()
    assert "val: skipped 8 samples: bad_json=1, corrupt_image=3, no_sentence=4" in caplog.text


def test_scoped_handles_share_one_actor_and_count_apart(ray_local):
    """A training job's train and val splits: one actor, two counts (the job's skip lines and the
    per-split abort threshold read each split alone)."""
    from dvsa.ingest.counter import SkipCounter

    job = SkipCounter()
    train, val = job.scoped("train"), job.scoped("val")
    train.add({"corrupt_image": 2}, {"corrupt_image": "k1: truncated"})
    pickle.loads(pickle.dumps(val)).add({"corrupt_image": 1, "no_sentence": 1}, {"corrupt_image": "k7: bad"})
    assert train.counts() == {"corrupt_image": 2} and train.examples() == {"corrupt_image": "k1: truncated"}
    assert val.counts() == {"corrupt_image": 1, "no_sentence": 1} and val.examples()["corrupt_image"] == "k7: bad"
    assert job.counts() == {} and train._actor is val._actor is job._actor
