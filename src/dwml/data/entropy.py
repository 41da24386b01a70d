"""The unigram entropy of a prepared train split: the loss of a masked LM that knows token frequencies and nothing else.

A masked LM that has learned only token frequencies predicts every masked token with the training split's unigram
distribution; its expected loss is then H = -sum_v p(v) log p(v) (nats). The entropy is taken over the token ids the
MLM predicts: the document tokens of the train shard (the shards hold no specials; packing adds <s>/</s>, and masking
never selects a special). `dwml prepare` writes it into meta.json; `dwml.training.plateau` compares losses with it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .shards import Shard


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the empirical unigram distribution of `tokens` (ids < vocab_size)."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def train_unigram_entropy(prepared_dir: str | Path, meta: dict) -> float:
    """meta.json's `unigram_entropy` (written by `dwml prepare`), else computed from the train shard.

    Prepared directories written before the field existed get it computed on load: one bincount over the memmap
    (a fraction of a second for millions of tokens), nothing written back.
    """
    value = meta.get("unigram_entropy")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    shard = Shard(prepared_dir, "train", check_values=False)
    return unigram_entropy(shard.tokens, shard.vocab_size)
