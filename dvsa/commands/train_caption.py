"""``dvsa train-caption --config configs/tiny.yaml key=value ...``: see :mod:`dvsa.train.launch`."""

from __future__ import annotations

from dvsa.commands import _train

TASK = "caption"


def add_arguments(parser) -> None:
    _train.add_arguments(parser)


def run(args) -> int:
    return _train.run(args, TASK)
