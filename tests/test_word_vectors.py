"""dvsa.models.word_vectors: a word2vec/GloVe text file -> the rows of W_w (eq. 2) of the
vocabulary words it has; the others keep their initialisation; bad rows name file and line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dvsa.errors import DataError, DvsaError
from dvsa.models.word_vectors import init_embedding, read_word_vectors

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "red", "circle", "blue"]


def test_read_word_vectors_known_rows_header_and_unknown_words(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("3 2\nred 1.5 -2\nzebra 9 9\n\nblue 0.25 5e-1 \n")   # word2vec header, a blank line
    vectors, found = read_word_vectors(str(f), WORDS, 2)
    assert found.tolist() == [False, False, False, False, True, False, True]
    assert vectors.tolist() == [[0, 0], [0, 0], [0, 0], [0, 0], [1.5, -2.0], [0, 0], [0.25, 0.5]]


def test_a_first_line_of_two_numbers_is_a_header_only_on_line_one(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("red 1\n2 3\n")                 # dim 1: "2 3" on line 2 is the word "2"
    vectors, found = read_word_vectors(str(f), ["red", "2"], 1)
    assert found.tolist() == [True, True] and vectors.tolist() == [[1.0], [3.0]]


def test_bad_rows_name_the_file_and_line(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("red 1 2\nblue 1 2 3\n")
    with pytest.raises(DataError, match=r"v.txt:2: word 'blue' has 3 values, model.word_dim is 2"):
        read_word_vectors(str(f), WORDS, 2)
    f.write_text("red 1 x\n")
    with pytest.raises(DataError, match=r"v.txt:1: word 'red' has a value that is not a number"):
        read_word_vectors(str(f), WORDS, 2)
    with pytest.raises(DvsaError, match="model.word_vectors: cannot open"):
        read_word_vectors(str(tmp_path / "missing.txt"), WORDS, 2)


def test_init_embedding_copies_found_rows_keeps_the_rest_and_freezes(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("circle 1 2 3\nred -1 0 1\n")
    torch.manual_seed(0)
    emb = nn.Embedding(len(WORDS), 3)
    before = emb.weight.detach().clone()
    assert init_embedding(emb, str(f), WORDS, freeze=True) == 2
    w = emb.weight.detach()
    assert w[5].tolist() == [1.0, 2.0, 3.0] and w[4].tolist() == [-1.0, 0.0, 1.0]
    keep = [0, 1, 2, 3, 6]
    assert torch.equal(w[keep], before[keep])
    assert not emb.weight.requires_grad
    emb2 = nn.Embedding(len(WORDS), 3)
    init_embedding(emb2, str(f), WORDS)
    assert emb2.weight.requires_grad
    with pytest.raises(DvsaError, match="6 vocabulary words for an embedding of 7 rows"):
        init_embedding(nn.Embedding(7, 3), str(f), WORDS[:6])
