"""Skipped samples in a training job: per epoch into MLflow, at the end on the console, and the
job stopped when a split is mostly bad.

The ingest counts every sample it drops by reason (:class:`dvsa.ingest.SkipCounter`, one per
split, cumulative over passes). Rank 0 turns the counts into per-epoch figures:
``data/skipped`` (train samples skipped this epoch, 0 included), ``data/skipped_<reason>`` and
``data/val_skipped_<reason>``. When one pass skips more than ``data.max_skip_fraction`` of a
split's images (the manifest's count; validation: the capped count), the job ends with one line
naming the split, the fraction, the main reason and the first sample (or shard) it was seen on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


@dataclass
class SkipPlan:
    """What the driver hands the workers: the counters and each split's image count."""

    counters: Mapping[str, Any]          # split -> SkipCounter (picklable actor handle)
    images: Mapping[str, int]            # split -> images one pass reads
    max_fraction: float

    def to_dict(self) -> dict:
        return {"counters": dict(self.counters), "images": dict(self.images), "max_fraction": self.max_fraction}


@dataclass
class SkipWatch:
    """Rank 0's view: counts at the start of this worker's life, and per-pass deltas."""

    plan: SkipPlan
    seen: dict[str, Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split, counter in self.plan.counters.items():
            self.seen[split] = Counter(counter.counts())

    def pass_done(self, split: str) -> tuple[dict[str, float], Optional[str]]:
        """After a pass over ``split``: ``(metrics, abort line or None)``."""
        counter = self.plan.counters.get(split)
        if counter is None:
            return {}, None
        now = Counter(counter.counts())
        delta = now - self.seen.get(split, Counter())
        self.seen[split] = now
        prefix = "data/skipped_" if split == "train" else f"data/{split}_skipped_"
        metrics: dict[str, float] = {f"{prefix}{reason}": float(n) for reason, n in sorted(delta.items())}
        total = sum(delta.values())
        if split == "train":
            metrics["data/skipped"] = float(total)
        return metrics, self._too_many(split, delta, total, counter)

    def _too_many(self, split: str, delta: Counter, total: int, counter) -> Optional[str]:
        images = int(self.plan.images.get(split) or 0)
        if not total or images <= 0 or total <= self.plan.max_fraction * images:
            return None
        reason, n = delta.most_common(1)[0]
        first = counter.examples().get(reason, "")
        return (f"data.max_skip_fraction: {total} of {images} {split} samples ({total / images:.1%}) were "
                f"skipped in one pass, more than {self.plan.max_fraction:.1%}; mostly {reason} ({n}), "
                f"first: {first} (fix or re-run `dvsa prepare`, or raise data.max_skip_fraction)")


def summary_lines(counters: Mapping[str, Any]) -> list[str]:
    """One console line per split with skips: the totals (over every pass) by reason, and the
    first sample seen for the main one."""
    lines = []
    for split, counter in counters.items():
        counts = counter.counts()
        if not counts:
            continue
        main = max(counts, key=lambda r: counts[r])
        shown = ", ".join(f"{r}={n}" for r, n in sorted(counts.items()))
        lines.append(f"  skipped {split} samples (all passes): {shown}; first {main}: "
                     f"{counter.examples().get(main, '?')}")
    return lines
