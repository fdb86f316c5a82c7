import math
from collections import Counter

import pytest

from dvsa.text import END, PAD, START, UNK, Vocab, clean_caption


@pytest.mark.parametrize("raw, tokens", [
    ("A man riding a horse.", ["a", "man", "riding", "a", "horse"]),
    ("  Two   dogs\tplaying\n", ["two", "dogs", "playing"]),
    ("Café crème brûlée", ["cafe", "creme", "brulee"]),          # accents folded
    ("naïve Ångström", ["naive", "angstrom"]),
    ("man's hat-trick, (red)!!", ["man", "s", "hat", "trick", "red"]),  # punctuation -> space
    ("!!!...???", []),
    ("ﬁne ２ cats", ["fine", "2", "cats"]),                          # NFKD compatibility forms
    ("Straße dog東京cat 🐱", ["strasse", "dog", "cat"]),                # no ASCII form: a space
    ("", []),
])
def test_clean_caption(raw, tokens):
    assert clean_caption(raw) == tokens


def test_clean_caption_rejects_non_string():
    with pytest.raises(TypeError):
        clean_caption(None)


def make_vocab():
    caps = [["a", "red", "circle"], ["a", "blue", "square"], ["a", "red", "square"], ["rare"]]
    return Vocab.from_captions(caps, min_count=2), caps


def test_vocab_order_and_specials():
    v, _ = make_vocab()
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    # a:3, red:2, square:2 (tie broken alphabetically); blue, circle, rare below 2
    assert v.itos[4:] == ["a", "red", "square"]
    assert len(v) == 7
    assert v.counts == [0, 4, 4, 3, 3, 2, 2]  # unk = blue + circle + rare


def test_encode_decode():
    v, _ = make_vocab()
    assert v.encode(["a", "red", "blue", "square"], max_len=10) == [START, 4, 5, UNK, 6, END]
    assert v.encode(["a", "red", "blue", "square"], max_len=4) == [START, 4, 5, END]
    assert v.encode([], max_len=3) == [START, END]
    assert v.decode([START, 4, 5, 6, END, 4, 4]) == ["a", "red", "square"]
    assert v.decode([START, 4, UNK, PAD, 6]) == ["a", "square"]
    with pytest.raises(ValueError):
        v.encode(["a"], max_len=1)


def test_log_frequencies():
    v, _ = make_vocab()
    lf = v.log_frequencies()
    counts = [1, 1, 4, 3, 3, 2, 2]  # pad/start floored at 1; END once per caption
    total = sum(counts)
    assert lf == pytest.approx([math.log(c / total) for c in counts])


def test_save_load_roundtrip(tmp_path):
    v, _ = make_vocab()
    p = tmp_path / "vocab.json"
    v.save(str(p))
    assert Vocab.load(str(p)) == v
    v.save("memory://vocab-test/vocab.json")
    assert Vocab.load("memory://vocab-test/vocab.json") == v


def test_build_threshold_from_counter():
    v = Vocab.build(Counter({"x": 15, "y": 14}), min_count=15, num_captions=20)
    assert v.itos[4:] == ["x"] and v.counts[UNK] == 14 and v.counts[END] == 20
