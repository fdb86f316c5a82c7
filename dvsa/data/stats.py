"""Region-level vs full-image caption statistics of prepared shards (the paper's contrast:
region captions are short and many per image, full-image sentences longer and few).

Counts are streamed: a length histogram and a word counter per kind, never the captions, so
4.1M region phrases take the memory of their vocabulary only.
"""

from __future__ import annotations

import io
from bisect import bisect_left
from collections import Counter
from itertools import accumulate
from typing import Iterable

import fsspec

from dvsa.data.shards import iter_samples

KINDS = {"region": "region captions", "full_image": "full-image sentences"}


class Tally:
    """Running counts of one kind of caption: images, a length histogram, word counts."""

    def __init__(self):
        self.images = 0
        self.lengths: Counter = Counter()
        self.words: Counter = Counter()

    def add(self, captions: Iterable[list[str]], images: int = 1) -> None:
        """Count ``captions`` (token lists) drawn from ``images`` images (one, when scanning)."""
        self.images += images
        for c in captions:
            self.lengths[len(c)] += 1
            self.words.update(c)

    def stats(self, top: int = 20) -> dict:
        n = sum(self.lengths.values())
        total_words = sum(k * v for k, v in self.lengths.items())
        return {
            "captions": n,
            "images": self.images,
            "captions_per_image": n / self.images if self.images else 0.0,
            "length_mean": total_words / n if n else 0.0,
            "length_median": _median(self.lengths),
            "length_max": max(self.lengths, default=0),
            "length_histogram": {str(k): self.lengths[k] for k in sorted(self.lengths)},
            "vocabulary": len(self.words),
            "vocabulary_min5": sum(1 for c in self.words.values() if c >= 5),
            "words_per_image": total_words / self.images if self.images else 0.0,
            "top_words": self.words.most_common(top),
        }


def _median(hist: Counter[int]) -> float:
    """The median of the values counted in ``hist`` (mean of the two middle ones for an even count)."""
    n = sum(hist.values())
    if not n:
        return 0.0
    values = sorted(hist)
    seen = list(accumulate(hist[v] for v in values))   # seen[i]: how many counted values are <= values[i]
    lo = values[bisect_left(seen, (n + 1) // 2)]       # the ((n+1)//2)-th smallest
    hi = values[bisect_left(seen, n // 2 + 1)]         # the (n//2+1)-th smallest
    return lo if n % 2 else (lo + hi) / 2


def caption_stats(captions: list[list[str]], images: int, top: int = 20) -> dict:
    """Statistics of token lists ``captions`` drawn from ``images`` images."""
    t = Tally()
    t.add(captions, images)
    return t.stats(top)


def collect(roots: list[str], split: str | None = "train", top: int = 20) -> dict:
    """``{"region": stats, "full_image": stats}`` over every sample of ``roots`` (one split)."""
    tallies = {"region": Tally(), "full_image": Tally()}
    for root in roots:
        for _, _, meta in iter_samples(root, split):
            if meta.get("regions"):
                tallies["region"].add(r["tokens"] for r in meta["regions"])
            if meta.get("sentences"):
                tallies["full_image"].add(s["tokens"] for s in meta["sentences"])
    return {k: t.stats(top) for k, t in tallies.items()}


def table(stats: dict, top: int = 10) -> str:
    rows = [("captions", "captions", "{:,}"), ("images", "images", "{:,}"),
            ("captions per image", "captions_per_image", "{:.2f}"), ("mean length (words)", "length_mean", "{:.2f}"),
            ("median length", "length_median", "{:g}"), ("max length", "length_max", "{}"),
            ("vocabulary (distinct words)", "vocabulary", "{:,}"),
            ("vocabulary (count >= 5)", "vocabulary_min5", "{:,}"),
            ("words per image", "words_per_image", "{:.1f}")]
    w = 28
    lines = [f"{'':<{w}} {'region':>16} {'full image':>16}"]
    for label, key, fmt in rows:
        lines.append(f"{label:<{w}} {fmt.format(stats['region'][key]):>16} {fmt.format(stats['full_image'][key]):>16}")
    lines.append(f"top words (region):     {', '.join(x for x, _ in stats['region']['top_words'][:top])}")
    lines.append(f"top words (full image): {', '.join(x for x, _ in stats['full_image']['top_words'][:top])}")
    return "\n".join(lines)


def plot(stats: dict, path: str, top: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for kind, label in KINDS.items():
        h = stats[kind]["length_histogram"]
        n = max(stats[kind]["captions"], 1)
        xs = sorted(int(k) for k in h)
        axes[0].plot(xs, [h[str(x)] / n for x in xs], marker="o", label=label)
    axes[0].set(title="caption length", xlabel="words", ylabel="fraction of captions")
    axes[0].legend()
    for ax, kind in zip(axes[1:3], KINDS):
        words = stats[kind]["top_words"][:top]
        ax.barh([w for w, _ in reversed(words)], [c for _, c in reversed(words)])
        ax.set(title=f"top words: {KINDS[kind]}", xlabel="count")
    # the per-image and vocabulary contrast, side by side per kind
    ax = axes[3]
    measures = [("captions / image", "captions_per_image"), ("words / image", "words_per_image"),
                ("vocabulary / 100", "vocabulary")]
    xs = list(range(len(measures)))
    for i, (kind, label) in enumerate(KINDS.items()):
        vals = [stats[kind][key] / (100 if key == "vocabulary" else 1) for _, key in measures]
        ax.bar([x + 0.4 * i for x in xs], vals, width=0.4, label=label)
    ax.set_xticks([x + 0.2 for x in xs], [m for m, _ in measures])
    ax.set(title="per image and vocabulary")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with fsspec.open(str(path), "wb") as f:       # a local path or any fsspec URL
        f.write(buf.getvalue())
