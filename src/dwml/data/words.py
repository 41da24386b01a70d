"""Whitespace words per training sequence: the unit of BabyLM's exposure rules.

BabyLM sizes its corpora in whitespace words (`wc -w`, `len(line.split())`) and caps what a model may see in words
(strict-small: 100M words over at most 10 epochs). dwml trains on token ids packed into sequences, so the words a
sequence holds are counted on its tokens: with the byte-level pre-tokenizer (`dwml.data.tokenizer`) every word
after a space starts with a token whose first character is `Ġ` (the space byte), and a document's first word has
no space in front (add_prefix_space=False). So the words of a span of a document are the tokens that start with
`Ġ` plus one if the span is the start of a document. This equals `len(text.split())` for dwml's cleaned documents
(one line each, single spaces; `tests/data/test_words.py` checks it on the real corpus against meta.json's counts);
a document cut into several pieces by packing has its words counted once, in the piece holding the word's first
token.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DwmlError
from .shards import PackedSequences

SPACE_BYTE = "\u0120"  # `Ġ`: how the byte-level BPE writes a space


def word_start_table(tokenizer_file: str | Path, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: which token ids begin a word that follows a space."""
    path = Path(tokenizer_file)
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DwmlError(f"{path}: cannot read the tokenizer's vocabulary ({e})") from None
    table = np.zeros(vocab_size, dtype=bool)
    for piece, i in vocab.items():
        if 0 <= int(i) < vocab_size and piece.startswith(SPACE_BYTE):
            table[int(i)] = True
    return table


def sequence_words(seqs: PackedSequences, table: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """(len(seqs),) int64: whitespace words of every packed sequence (specials hold none)."""
    shard = seqs.shard
    n = int(shard.offsets[-1])
    # flags[t] = 1 if token t starts a word: a `Ġ` token, or the first token of a (non-empty) document
    flags = np.empty(n, dtype=np.uint8)
    for lo in range(0, n, chunk):
        flags[lo:lo + chunk] = table[np.asarray(shard.tokens[lo:lo + chunk], dtype=np.int64)]
    starts = np.asarray(shard.offsets[:-1], dtype=np.int64)
    flags[starts[starts < np.asarray(shard.offsets[1:], dtype=np.int64)]] = 1
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(flags, out=cum[1:])
    piece_words = cum[seqs.piece_offsets + seqs.piece_lengths] - cum[seqs.piece_offsets]
    return np.add.reduceat(piece_words, seqs.bounds[:-1]).astype(np.int64)


def split_words(prepared: str | Path, split: str, seq_len: int, vocab_size: int) -> np.ndarray:
    """`sequence_words` of a prepared split packed at `seq_len`, with the prepared tokenizer's table."""
    prepared = Path(prepared)
    table = word_start_table(prepared / "tokenizer" / "tokenizer.json", vocab_size)
    return sequence_words(PackedSequences(prepared, split, seq_len), table)
