"""Initialise a word embedding ``W_w`` (eq. 2) from a text vectors file ("word v1 v2 ... vD").

The word2vec/GloVe text format: one word per line followed by its D numbers, separated by
spaces; an optional first line ``"<count> <D>"`` (word2vec's header) is skipped. Words of the
vocabulary that the file lacks keep their random initialisation; the count is logged.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from dvsa.errors import DataError, DvsaError

log = logging.getLogger(__name__)


def read_word_vectors(path: str, words: Sequence[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors for ``words`` (indexed by id): ``(float[V, dim], found bool[V])``.

    Raises DataError naming the file and line for a row whose length is not ``dim``
    or whose values are not numbers.
    """
    index = {w: i for i, w in enumerate(words)}
    vectors = torch.zeros(len(words), dim)
    found = torch.zeros(len(words), dtype=torch.bool)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DvsaError(f"model.word_vectors: cannot open {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if not parts or parts == [""]:
                continue
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header "count dim"
            word, values = parts[0], parts[1:]
            if len(values) != dim:
                raise DataError(f"{path}:{lineno}: word {word!r} has {len(values)} values, "
                                f"model.word_dim is {dim}")
            i = index.get(word)
            if i is None:
                continue
            try:
                vectors[i] = torch.tensor([float(v) for v in values])
            except ValueError:
                raise DataError(f"{path}:{lineno}: word {word!r} has a value that is not a number") from None
            found[i] = True
    return vectors, found


def init_embedding(embedding: nn.Embedding, path: str, words: Sequence[str], freeze: bool = False) -> int:
    """Copy the file's vectors into ``embedding`` rows of the words it has; return how many."""
    if len(words) != embedding.num_embeddings:
        raise DvsaError(f"model.word_vectors: {len(words)} vocabulary words for an embedding of "
                        f"{embedding.num_embeddings} rows")
    vectors, found = read_word_vectors(path, words, embedding.embedding_dim)
    with torch.no_grad():
        embedding.weight[found] = vectors[found].to(embedding.weight)
    n = int(found.sum())
    log.info("model.word_vectors: %d of %d vocabulary words initialised from %s", n, len(words), path)
    if freeze:
        embedding.weight.requires_grad_(False)
    return n
