"""Token shards on disk and their packing into fixed-length training sequences.

A prepared split SPLIT is three files:

* `SPLIT.bin`     the token ids of all documents, concatenated, raw little-endian `uint16` (vocab <= 65536) or
                  `uint32`; no special tokens (they are added by `PackedSequences`). Read back with `np.memmap`.
* `SPLIT.idx.npy` int64 document offsets into SPLIT.bin, length n_docs + 1 (document i is tokens[off[i]:off[i+1]]).
* `SPLIT.json`    header: format, dtype, itemsize, vocab_size, n_tokens, n_docs, per-source document ranges.

Every file is written atomically and the header last, so a header always describes complete data files. Reading
checks the byte size of SPLIT.bin against the header: a file of the wrong dtype or a text dump of the ids (the bug
class of writing `str(ids)` and reading its bytes back as uint16 tokens) fails loudly instead of training on noise.
"""
from __future__ import annotations

import bisect
import itertools
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from ..errors import DwmlError
from ..io import atomic_path, read_json, write_json
from .tokenizer import BOS_ID, EOS_ID, N_SPECIAL, text_pieces

FORMAT = "dwml-shard-v1"
META_FORMAT = "dwml-prepared-v1"  # meta.json of a prepared directory (written by dwml.data.prepare)
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int, dtype: str | None = None) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; a forced dtype too small is an error."""
    if dtype is None:
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in DTYPES:
        raise DwmlError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    dt = np.dtype(DTYPES[dtype])
    if vocab_size > np.iinfo(dt).max + 1:
        limit = np.iinfo(dt).max + 1
        raise DwmlError(f"dtype: {dtype} holds ids < {limit}, but vocab_size is {vocab_size}; use uint32")
    return dt


def _batches(texts: Sequence[str], batch_size: int, max_chars: int):
    """(document index of each piece, pieces) in batches of at most `batch_size` pieces and about `max_chars`
    characters: long documents are cut by `text_pieces`, so memory stays bounded whatever the line length."""
    owners: list[int] = []
    pieces: list[str] = []
    chars = 0
    for i, text in enumerate(texts):
        for piece in text_pieces(text):
            owners.append(i)
            pieces.append(piece)
            chars += len(piece)
            if len(pieces) >= batch_size or chars >= max_chars:
                yield owners, pieces
                owners, pieces, chars = [], [], 0
    if pieces:
        yield owners, pieces


def encode_documents(
    tok: Tokenizer, texts: Sequence[str], *, dtype: np.dtype = np.uint32, batch_size: int = 8192,
    max_batch_chars: int = 1 << 21,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (concatenated, no specials) and int64 offsets (len n+1) of `texts`, via `encode_batch`."""
    chunks: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    # Literal "<mask>" or "<s>" inside a document is text, not a control token: encode it as bytes.
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        for owners, pieces in _batches(texts, batch_size, max_batch_chars):
            encodings = tok.encode_batch(pieces, add_special_tokens=False)
            ids = [e.ids for e in encodings]
            del encodings
            lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            np.add.at(lengths, np.asarray(owners, dtype=np.int64), lens)
            chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum())))
    finally:
        tok.encode_special_tokens = previous
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if tokens.size and int(tokens.min()) < N_SPECIAL:
        raise RuntimeError("a special token id was produced inside a document")  # a bug, not a user error
    return tokens, offsets


def write_shard(
    out_dir: str | Path,
    split: str,
    tokens: np.ndarray,
    offsets: np.ndarray,
    *,
    vocab_size: int,
    dtype: str | None = None,
    sources: Sequence[dict] = (),
) -> dict:
    """Write SPLIT.bin / SPLIT.idx.npy / SPLIT.json into `out_dir` and return the header."""
    out_dir = Path(out_dir)
    dt = dtype_for_vocab(vocab_size, dtype)
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != tokens.size:
        raise ValueError("offsets must start at 0 and end at len(tokens)")
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DwmlError(f"{split}: token id {int(tokens.max())} >= vocab_size {vocab_size}")
    with atomic_path(out_dir / f"{split}.bin") as tmp:
        np.ascontiguousarray(tokens, dtype=dt.newbyteorder("<")).tofile(tmp)
    with atomic_path(out_dir / f"{split}.idx.npy") as tmp:
        with open(tmp, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
            np.save(f, offsets)
    header = {
        "format": FORMAT,
        "split": split,
        "dtype": dt.name,
        "itemsize": dt.itemsize,
        "vocab_size": int(vocab_size),
        "n_tokens": int(tokens.size),
        "n_docs": int(offsets.size - 1),
        "sources": list(sources),
    }
    write_json(out_dir / f"{split}.json", header)
    return header


def load_meta(prepared_dir: str | Path) -> dict:
    """meta.json of a prepared directory: vocab_size, dtype, per-split/per-source counts (see dwml.data.prepare)."""
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DwmlError(f"{path}: not found (expected a directory written by `dwml prepare`)")
    meta = read_json(path, "meta.json")
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DwmlError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                        f"expected {META_FORMAT!r}")
    v = meta.get("vocab_size")
    if not isinstance(v, int) or isinstance(v, bool) or v <= N_SPECIAL:
        raise DwmlError(f"{path}: field 'vocab_size' missing or not an integer > {N_SPECIAL}, got {v!r}")
    return meta


class Shard:
    """A memory-mapped split: `tokens` (uint16/uint32 memmap), `offsets` (int64), `header` (dict)."""

    def __init__(self, directory: str | Path, split: str, *, check_values: bool = True):
        self.directory = Path(directory)
        self.split = split
        header_path = self.directory / f"{split}.json"
        bin_path = self.directory / f"{split}.bin"
        idx_path = self.directory / f"{split}.idx.npy"
        for p in (header_path, bin_path, idx_path):
            if not p.is_file():
                raise DwmlError(f"{p}: shard file not found (expected output of `dwml prepare`)")
        header = read_json(header_path, "shard header")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DwmlError(f"{header_path}: not a {FORMAT} header")
        if header.get("dtype") not in DTYPES:
            raise DwmlError(f"{header_path}: dtype {header.get('dtype')!r}, expected one of {sorted(DTYPES)}")
        self.header = header
        self.vocab_size = int(header["vocab_size"])
        self.dtype = dtype_for_vocab(self.vocab_size, header["dtype"]).newbyteorder("<")
        self.n_tokens = int(header["n_tokens"])
        self.n_docs = int(header["n_docs"])

        size = bin_path.stat().st_size
        expected = self.n_tokens * self.dtype.itemsize
        if size != expected:
            raise DwmlError(
                f"{bin_path}: {size} bytes, but the header says {self.n_tokens} {self.dtype.name} tokens "
                f"= {expected} bytes (corrupt, truncated or not a binary token file)"
            )
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
            if self.n_tokens
            else np.zeros(0, dtype=self.dtype)
        )
        try:
            offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DwmlError(f"{idx_path}: unreadable offsets ({e})") from None
        if (
            offsets.dtype != np.int64
            or offsets.shape != (self.n_docs + 1,)
            or offsets[0] != 0
            or offsets[-1] != self.n_tokens
            or (self.n_docs and np.any(np.diff(offsets) < 0))
        ):
            raise DwmlError(
                f"{idx_path}: expected {self.n_docs + 1} non-decreasing int64 offsets from 0 to {self.n_tokens}"
            )
        self.offsets = offsets
        if check_values and self.n_tokens:
            lo, hi = int(self.tokens.min()), int(self.tokens.max())
            if lo < N_SPECIAL or hi >= self.vocab_size:
                raise DwmlError(
                    f"{bin_path}: token ids span [{lo}, {hi}], expected [{N_SPECIAL}, {self.vocab_size}) "
                    f"(corrupt shard or wrong dtype)"
                )

    def __len__(self) -> int:
        return self.n_docs

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document i (a view into the memmap)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def pack_index(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy in-order packing of documents into sequences `<s> d1 </s> d2 </s> ...` of at most seq_len tokens.

    Documents longer than seq_len - 2 are first cut into pieces of seq_len - 2 tokens; every other document stays
    whole. Returns (piece_offsets, piece_lengths, seq_bounds): sequence k holds pieces seq_bounds[k]:seq_bounds[k+1],
    and the pieces are contiguous in the shard (piece_offsets[p + 1] = piece_offsets[p] + piece_lengths[p]).

    Fast for ~1e8 tokens: the pieces are built with whole-array numpy ops (only long documents get extra pieces),
    and the greedy walk costs one bisection per *sequence* over the cumulative piece cost (length + its </s>),
    restricted to the at most (seq_len - 1) // 2 pieces a sequence can hold.
    """
    if not isinstance(seq_len, int) or seq_len < 3:
        raise DwmlError(f"seq_len: expected an integer >= 3 (<s>, a token and </s>), got {seq_len!r}")
    offsets = np.asarray(offsets, dtype=np.int64)
    room = seq_len - 2
    lengths = np.diff(offsets)
    keep = lengths > 0  # empty documents would only add a stray </s>
    starts, lengths = offsets[:-1][keep], lengths[keep]
    extra = (lengths - 1) // room  # additional pieces of each long document
    long_docs = np.flatnonzero(extra)
    if long_docs.size:
        reps = extra[long_docs]
        k = np.arange(1, reps.sum() + 1) - np.repeat(np.cumsum(reps) - reps, reps)
        starts = np.insert(starts, np.repeat(long_docs + 1, reps), np.repeat(starts[long_docs], reps) + k * room)
    piece_offsets = starts
    piece_lengths = np.diff(np.append(starts, offsets[-1]))

    n = piece_lengths.size
    budget = seq_len - 1  # everything but <s>
    window = budget // 2 + 1  # a piece costs at least 2 (a token and </s>)
    # Cumulative cost, padded with a sentinel larger than any query so that i + window is always a valid bound.
    cost_end = np.cumsum(piece_lengths + 1)
    cost_end = memoryview(np.append(cost_end, np.full(window, np.iinfo(np.int64).max)))  # indexing -> Python int
    bounds = []
    i, used = 0, 0
    while i < n:
        bounds.append(i)
        i = bisect.bisect_right(cost_end, used + budget, i, i + window)
        used = cost_end[i - 1]
    bounds.append(n)
    return piece_offsets, piece_lengths, np.array(bounds, dtype=np.int64)


def takes_separator(pieces: np.ndarray, share: float) -> np.ndarray:
    """Whether each piece index falls in the `share` of pieces that end with the separator: a multiplicative hash
    (Fibonacci hashing, 64-bit wrap-around) of the index mapped to [0, 1), so neighbouring pieces are independent
    and the choice needs no state to resume."""
    h = np.asarray(pieces, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < share


class PackedSequences:
    """Training sequences of one prepared split; `seqs[i]` is an int64 array `<s> doc </s> doc </s> ...`.

    `separator` (a token id) ends every piece but a sequence's last in its place: `<s> doc \n doc \n doc </s>` with
    the tokenizer's newline token, the form BabyLM's dialogue pairs take ("What did you get?\nI got a chair."; see
    `dwml.data.tokenizer.newline_id`). With `share` < 1 only that share of the pieces ends with `separator`, the rest
    with `</s>`: which ones is a fixed hash of the piece's index in the split (`takes_separator`), so a sequence is
    the same in every epoch, run and rank. With `sources` (names of the split's sources, `dwml prepare`'s per-file
    sources) only their pieces do (newline between the turns of the dialogue corpora, </s> between the sentences of
    prose); names the split lacks select nothing. The sequences' lengths do not change.
    """

    def __init__(self, prepared_dir: str | Path, split: str, seq_len: int, separator: int | None = None,
                 share: float = 1.0, sources: Sequence[str] = ()):
        t0 = time.perf_counter()
        self.shard = Shard(prepared_dir, split)
        self.seq_len = seq_len
        self.separator = EOS_ID if separator is None else int(separator)
        if not 0.0 <= share <= 1.0:
            raise DwmlError(f"separator share: expected [0, 1], got {share}")
        self.piece_offsets, self.piece_lengths, self.bounds = pack_index(self.shard.offsets, seq_len)
        # Which pieces end with the separator (None: all); fixed at build time, so resuming changes nothing.
        self.takes = None if share >= 1.0 else takes_separator(np.arange(self.piece_offsets.size), share)
        if sources:
            chosen = self._in_sources(set(sources))
            self.takes = chosen if self.takes is None else self.takes & chosen
        self.build_seconds = time.perf_counter() - t0
        if len(self) == 0:
            raise DwmlError(f"{self.shard.directory / split}.bin: split has no tokens to pack")

    def __len__(self) -> int:
        return self.bounds.size - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        p0, p1 = self.bounds[i], self.bounds[i + 1]
        start = self.piece_offsets[p0]
        stop = self.piece_offsets[p1 - 1] + self.piece_lengths[p1 - 1]
        tokens = np.asarray(self.shard.tokens[start:stop], dtype=np.int64)
        # Pieces of a sequence are contiguous in the shard: put <s> in front and </s> after every piece.
        where = np.concatenate([[0], np.cumsum(self.piece_lengths[p0:p1])])
        values = np.empty(where.size, dtype=np.int64)
        values[1:-1] = self._ends(np.arange(p0, p1 - 1))
        values[0], values[-1] = BOS_ID, EOS_ID
        return np.insert(tokens, where, values)

    def gather(self, indices: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequences `indices`, right-padded with `pad_id` to the longest: (ids (B, T) int64, lengths (B,) int64).

        Row b equals `self[indices[b]]`, built for the whole batch with array ops (no per-sequence Python), so batch
        construction stays off a GPU's critical path.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"gather: sequence indices must be in [0, {len(self)}), got {idx.size} indices")
        p0, p1 = self.bounds[idx], self.bounds[idx + 1]
        per_row = p1 - p0
        rows = np.repeat(np.arange(idx.size), per_row)  # the row of every piece, pieces in row order
        piece = np.arange(per_row.sum()) + np.repeat(p0 - (np.cumsum(per_row) - per_row), per_row)
        plen = self.piece_lengths[piece]
        # A piece's first column: after <s> and the earlier pieces of its row, each followed by its </s>.
        cost_before = np.cumsum(plen + 1) - (plen + 1)
        col = 1 + cost_before - np.repeat(cost_before[np.cumsum(per_row) - per_row], per_row)
        lengths = np.bincount(rows, weights=plen + 1, minlength=idx.size).astype(np.int64) + 1
        within = np.arange(plen.sum()) - np.repeat(np.cumsum(plen) - plen, plen)
        ids = np.full((idx.size, int(lengths.max())), pad_id, dtype=np.int64)
        ids[:, 0] = BOS_ID
        ids[np.repeat(rows, plen), np.repeat(col, plen) + within] = \
            self.shard.tokens[np.repeat(self.piece_offsets[piece], plen) + within]
        last = np.zeros(rows.size, dtype=bool)
        last[np.cumsum(per_row) - 1] = True  # a row's last piece ends with </s>, the others with the separator
        ids[rows, col + plen] = np.where(last, EOS_ID, self._ends(piece))
        return ids, lengths

    def _in_sources(self, names: set[str]) -> np.ndarray:
        """Whether each piece lies in a document of one of the sources `names` (the shard header's doc ranges)."""
        chosen = np.zeros(self.piece_offsets.size, dtype=bool)
        for src in self.shard.header.get("sources", []):
            if src["name"] in names:
                lo, hi = self.shard.offsets[[src["first_doc"], src["first_doc"] + src["n_docs"]]]
                chosen |= (self.piece_offsets >= lo) & (self.piece_offsets < hi)
        return chosen

    def _ends(self, pieces: np.ndarray) -> np.ndarray:
        """The token after each of `pieces` (piece indices of the split) when it is not its sequence's last."""
        if self.takes is None:
            return np.full(pieces.shape, self.separator, dtype=np.int64)
        return np.where(self.takes[pieces], self.separator, EOS_ID).astype(np.int64)

    def lengths(self) -> np.ndarray:
        """Length (with specials) of every sequence."""
        per_piece = np.concatenate([[0], np.cumsum(self.piece_lengths + 1)])
        return per_piece[self.bounds[1:]] - per_piece[self.bounds[:-1]] + 1

    @property
    def n_tokens(self) -> int:
        """Tokens over all sequences, specials included."""
        return int(self.piece_lengths.sum() + self.piece_lengths.size + len(self))
