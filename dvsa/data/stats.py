"""Region-level vs full-image caption statistics of prepared shards (the paper's contrast:
region captions are short and many per image, full-image sentences longer and few)."""

from __future__ import annotations

import statistics
from collections import Counter

from dvsa.data.shards import iter_samples

KINDS = {"region": "region captions", "full_image": "full-image sentences"}


def caption_stats(captions: list[list[str]], images: int, top: int = 20) -> dict:
    """Statistics of token lists ``captions`` drawn from ``images`` images."""
    lengths = [len(c) for c in captions]
    words = Counter(w for c in captions for w in c)
    hist = Counter(lengths)
    return {
        "captions": len(captions),
        "images": images,
        "captions_per_image": len(captions) / images if images else 0.0,
        "length_mean": statistics.fmean(lengths) if lengths else 0.0,
        "length_median": statistics.median(lengths) if lengths else 0.0,
        "length_max": max(lengths, default=0),
        "length_histogram": {str(k): hist[k] for k in sorted(hist)},
        "vocabulary": len(words),
        "vocabulary_min5": sum(1 for c in words.values() if c >= 5),
        "words_per_image": sum(lengths) / images if images else 0.0,
        "top_words": words.most_common(top),
    }


def collect(roots: list[str], split: str | None = "train", top: int = 20) -> dict:
    """``{"region": stats, "full_image": stats}`` over every sample of ``roots`` (one split)."""
    caps = {"region": [], "full_image": []}
    imgs = {"region": 0, "full_image": 0}
    for root in roots:
        for _, _, meta in iter_samples(root, split):
            if meta.get("regions"):
                imgs["region"] += 1
                caps["region"].extend(r["tokens"] for r in meta["regions"])
            if meta.get("sentences"):
                imgs["full_image"] += 1
                caps["full_image"].extend(s["tokens"] for s in meta["sentences"])
    return {k: caption_stats(caps[k], imgs[k], top) for k in caps}


def table(stats: dict, top: int = 10) -> str:
    rows = [("captions", "captions", "{:,}"), ("images", "images", "{:,}"),
            ("captions per image", "captions_per_image", "{:.2f}"), ("mean length (words)", "length_mean", "{:.2f}"),
            ("median length", "length_median", "{:g}"), ("max length", "length_max", "{}"),
            ("vocabulary (distinct words)", "vocabulary", "{:,}"), ("vocabulary (count >= 5)", "vocabulary_min5", "{:,}"),
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

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind, label in KINDS.items():
        h = stats[kind]["length_histogram"]
        n = max(stats[kind]["captions"], 1)
        xs = sorted(int(k) for k in h)
        axes[0].plot(xs, [h[str(x)] / n for x in xs], marker="o", label=label)
    axes[0].set(title="caption length", xlabel="words", ylabel="fraction of captions")
    axes[0].legend()
    for ax, kind in zip(axes[1:], KINDS):
        words = stats[kind]["top_words"][:top]
        ax.barh([w for w, _ in reversed(words)], [c for _, c in reversed(words)])
        ax.set(title=f"top words: {KINDS[kind]}", xlabel="count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
