"""dvsa.inference.device: the one device choice for inference and Train workers."""

from __future__ import annotations

import torch

from dvsa.inference.device import pick_device, worker_device


def test_pick_device_auto_follows_cuda_and_passes_explicit_choices(monkeypatch):
    for has_cuda, want in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda has_cuda=has_cuda: has_cuda)
        assert pick_device() == torch.device(want)
        assert pick_device("auto") == torch.device(want)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)       # as given, even without a GPU


def test_worker_device_outside_a_train_worker_is_the_auto_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device() == torch.device("cpu")
