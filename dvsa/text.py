"""Caption cleaning and the word vocabulary (paper, section 4 "Data Preprocessing").

Cleaning: Unicode case folding (``"ß"`` -> ``"ss"``) and NFKD with combining marks removed,
so accents are folded to ASCII (``"café"`` -> ``"cafe"``, ``"ﬁ"`` -> ``"fi"``); then every
character that is not an ASCII letter or digit (punctuation, CJK, emoji...) becomes a space,
and the text is split on whitespace.

The vocabulary is built from train-split token counts only: specials ``<pad>``=0,
``<start>``=1, ``<end>``=2, ``<unk>``=3, then every word seen at least ``min_count`` times,
by descending count (ties alphabetical, so the ids are deterministic).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from typing import Iterable, Mapping, Sequence

from dvsa.errors import DataError
from dvsa.files import load_json, write_bytes_atomic

PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def clean_caption(raw: str) -> list[str]:
    """Tokens of a caption: NFKD, accents folded, lowercase, non-alphanumerics -> spaces."""
    if not isinstance(raw, str):
        raise TypeError(f"caption must be a string, got {type(raw).__name__}")
    if raw.isascii():  # the common case, fast
        return _NON_ALNUM.sub(" ", raw.lower()).split()
    folded = "".join(c for c in unicodedata.normalize("NFKD", raw.casefold()) if not unicodedata.combining(c))
    return _NON_ALNUM.sub(" ", folded).split()


class Vocab:
    """Word <-> id mapping with the four specials first; counts kept for the softmax biases."""

    def __init__(self, itos: Sequence[str], counts: Sequence[int], min_count: int, num_captions: int):
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {tuple(itos[:4])}")
        if len(itos) != len(counts):
            raise ValueError("itos and counts differ in length")
        self.itos: list[str] = list(itos)
        self.counts: list[int] = [int(c) for c in counts]
        self.min_count = int(min_count)
        self.num_captions = int(num_captions)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocab has duplicate words")

    # ----------------------------------------------------------------- building
    @classmethod
    def build(cls, counter: Mapping[str, int], min_count: int, num_captions: int) -> "Vocab":
        """Words with count >= min_count; ``<unk>`` gets the summed count of the rest,
        ``<end>`` (and ``<start>``) one per caption."""
        kept = sorted(((w, c) for w, c in counter.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
        unk = sum(c for c in counter.values() if c < min_count)
        itos = list(SPECIALS) + [w for w, _ in kept]
        counts = [0, num_captions, num_captions, unk] + [c for _, c in kept]
        return cls(itos, counts, min_count, num_captions)

    @classmethod
    def from_captions(cls, captions: Iterable[Sequence[str]], min_count: int) -> "Vocab":
        counter: Counter = Counter()
        n = 0
        for toks in captions:
            counter.update(toks)
            n += 1
        return cls.build(counter, min_count, n)

    # ----------------------------------------------------------------- io
    def to_dict(self) -> dict:
        return {"itos": self.itos, "counts": self.counts, "min_count": self.min_count,
                "num_captions": self.num_captions}

    def save(self, path: str) -> None:
        """Write ``vocab.json`` atomically (temporary name, then rename): a reader never sees
        half a file, and a killed writer leaves the old one."""
        import fsspec

        fs, p = fsspec.core.url_to_fs(str(path))
        write_bytes_atomic(fs, p, json.dumps(self.to_dict()).encode())

    @classmethod
    def load(cls, path_or_url: str) -> "Vocab":
        d = load_json(path_or_url, "no such vocabulary file")
        try:
            return cls(d["itos"], d["counts"], d["min_count"], d["num_captions"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path_or_url}: not a dvsa vocab.json ({e})") from None

    # ----------------------------------------------------------------- use
    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def word_id(self, word: str) -> int:
        return self.stoi.get(word, UNK)

    def ids(self, tokens: Sequence[str]) -> list[int]:
        """Word ids only (no START/END), unknown words -> UNK."""
        get = self.stoi.get
        return [get(w, UNK) for w in tokens]

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        """``[START, w..., END]`` truncated to at most ``max_len`` ids, END kept."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (START and END), got {max_len}")
        return [START] + self.ids(tokens[: max_len - 2]) + [END]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` up to the first END; specials dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i < len(SPECIALS):
                continue
            out.append(self.itos[i])
        return out

    def log_frequencies(self) -> list[float]:
        """log(count / total) per id. END counts once per caption; ``<pad>``/``<start>``
        (never predicted) and an empty ``<unk>`` get a floor count of 1 so values stay finite."""
        counts = [max(c, 1) for c in self.counts]
        counts[PAD] = 1
        counts[START] = 1
        total = float(sum(counts))
        return [math.log(c / total) for c in counts]
