from __future__ import annotations

import json

import numpy as np
import pytest

from dwml.errors import DwmlError
from dwml.data.shards import (
    PackedSequences,
    Shard,
    dtype_for_vocab,
    encode_documents,
    load_meta,
    pack_index,
    write_shard,
)
from dwml.data.tokenizer import load_raw


def random_docs(rng: np.random.Generator, n_docs: int, vocab: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(1, max_len, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return rng.integers(5, vocab, size=int(offsets[-1])), offsets


def test_dtype_for_vocab():
    assert dtype_for_vocab(8192) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    assert dtype_for_vocab(1000, "uint32") == np.uint32
    with pytest.raises(DwmlError, match="uint16.*70000"):
        dtype_for_vocab(70000, "uint16")
    with pytest.raises(DwmlError, match="dtype"):
        dtype_for_vocab(1000, "int8")


@pytest.mark.parametrize("vocab", [1000, 65536, 100_000])
def test_binary_layout_and_exact_read(tmp_path, vocab):
    rng = np.random.default_rng(0)
    tokens, offsets = random_docs(rng, 50, vocab, 40)
    tokens[0] = vocab - 1  # the largest id must survive the round trip
    header = write_shard(tmp_path, "train", tokens, offsets, vocab_size=vocab)
    itemsize = 2 if vocab <= 65536 else 4
    # Raw binary ids, nothing else: n_tokens * itemsize bytes, little-endian.
    assert (tmp_path / "train.bin").stat().st_size == tokens.size * itemsize == header["n_tokens"] * itemsize
    raw = np.frombuffer((tmp_path / "train.bin").read_bytes(), dtype=f"<u{itemsize}")
    assert np.array_equal(raw, tokens)
    shard = Shard(tmp_path, "train")
    assert isinstance(shard.tokens, np.memmap)
    assert np.array_equal(shard.tokens, tokens) and np.array_equal(shard.offsets, offsets)
    assert np.array_equal(shard.doc(3), tokens[offsets[3] : offsets[4]])
    assert shard.n_docs == 50 and json.loads((tmp_path / "train.json").read_text())["dtype"] == f"uint{itemsize * 8}"


def test_text_dump_of_ids_is_rejected(tmp_path):
    """The reference bug: `str(ids)` written as text, then the text's bytes read back as uint16 tokens."""
    tokens = np.arange(5, 105)
    offsets = np.array([0, 60, 100])
    write_shard(tmp_path, "train", tokens, offsets, vocab_size=1000)
    (tmp_path / "train.bin").write_text(str(tokens.tolist()))
    with pytest.raises(DwmlError, match=r"train\.bin: \d+ bytes, but the header says 100 uint16 tokens = 200 bytes"):
        Shard(tmp_path, "train")
    # Even a text dump that happens to have the right size is caught: its bytes are not valid ids.
    text = " 7".encode() * 100  # 200 bytes; as uint16 each " 7" reads 0x3720 = 14112 >= vocab_size
    (tmp_path / "train.bin").write_bytes(text)
    with pytest.raises(DwmlError, match="token ids span"):
        Shard(tmp_path, "train")


def test_corrupt_shards_fail_loudly(tmp_path):
    tokens = np.arange(5, 105)
    write_shard(tmp_path, "valid", tokens, np.array([0, 60, 100]), vocab_size=1000)
    data = (tmp_path / "valid.bin").read_bytes()
    (tmp_path / "valid.bin").write_bytes(data[:-2])  # truncated
    with pytest.raises(DwmlError, match="198 bytes"):
        Shard(tmp_path, "valid")
    (tmp_path / "valid.bin").write_bytes(data)
    header = json.loads((tmp_path / "valid.json").read_text())
    (tmp_path / "valid.json").write_text(json.dumps({**header, "dtype": "uint32"}))  # header/data dtype mismatch
    with pytest.raises(DwmlError, match="400 bytes"):
        Shard(tmp_path, "valid")
    (tmp_path / "valid.json").write_text(json.dumps(header))
    np.save(tmp_path / "valid.idx.npy", np.array([0, 70, 90]))
    with pytest.raises(DwmlError, match="offsets"):
        Shard(tmp_path, "valid")
    (tmp_path / "valid.idx.npy").unlink()
    with pytest.raises(DwmlError, match=r"valid\.idx\.npy: shard file not found"):
        Shard(tmp_path, "valid")


def test_out_of_vocab_ids_rejected(tmp_path):
    with pytest.raises(DwmlError, match="vocab_size"):
        write_shard(tmp_path, "train", np.array([5, 1000]), np.array([0, 2]), vocab_size=1000)


def test_encode_documents_has_no_specials(tiny_prepared):
    tok = load_raw(tiny_prepared / "tokenizer")
    texts = ["plain text", "a literal <mask> and <s> in text", "x"]
    tokens, offsets = encode_documents(tok, texts)
    assert offsets.tolist()[0] == 0 and offsets[-1] == tokens.size and tokens.min() >= 5
    for i, text in enumerate(texts):
        assert tok.decode(tokens[offsets[i] : offsets[i + 1]].tolist()) == text


def test_real_shard_decodes_to_source_text(tiny_prepared):
    tok = load_raw(tiny_prepared / "tokenizer")
    for split in ("valid", "train"):
        shard = Shard(tiny_prepared, split)
        lines = (tiny_prepared / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert shard.n_docs == len(lines)
        docs = range(shard.n_docs) if split == "valid" else range(0, shard.n_docs, 37)
        decoded = tok.decode_batch([shard.doc(i).tolist() for i in docs], skip_special_tokens=False)
        assert decoded == [lines[i] for i in docs]


# ---------------------------------------------------------------------------------------------------- packing


def naive_pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Reference: greedy packing of (possibly chunked) documents, as lists of piece lengths per sequence."""
    room = seq_len - 2
    pieces = []
    for n in lengths:
        while n > room:
            pieces.append(room)
            n -= room
        if n:
            pieces.append(n)
    seqs, current, used = [], [], 1
    for p in pieces:
        if current and used + p + 1 > seq_len:
            seqs.append(current)
            current, used = [], 1
        current.append(p)
        used += p + 1
    return seqs + ([current] if current else [])


@pytest.mark.parametrize("seq_len", [3, 8, 64])
def test_pack_index_matches_naive_greedy(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(0, 3 * seq_len, size=500)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    piece_offsets, piece_lengths, bounds = pack_index(offsets, seq_len)
    got = [piece_lengths[bounds[k] : bounds[k + 1]].tolist() for k in range(bounds.size - 1)]
    assert got == naive_pack(lengths.tolist(), seq_len)
    assert np.array_equal(piece_offsets[1:], piece_offsets[:-1] + piece_lengths[:-1])  # contiguous pieces


def test_packed_sequences_invariants(tmp_path):
    rng = np.random.default_rng(1)
    seq_len = 32
    tokens, offsets = random_docs(rng, 400, 500, 70)  # many documents longer than seq_len - 2
    write_shard(tmp_path, "train", tokens, offsets, vocab_size=500)
    seqs = PackedSequences(tmp_path, "train", seq_len)
    stream, lengths = [], []
    for k in range(len(seqs)):
        s = seqs[k]
        assert s.dtype == np.int64 and len(s) <= seq_len and s[0] == 0 and s[-1] == 2
        assert not np.any(s[1:] == 0) and not np.any(s == 1)
        lengths.append(len(s))
        # Split at </s>: each part is a whole document or a (seq_len - 2)-token chunk of a long one.
        parts = np.split(s[1:], np.flatnonzero(s[1:] == 2) + 1)[:-1]
        stream.extend(p[:-1] for p in parts)
    assert np.array_equal(seqs.lengths(), lengths) and seqs.n_tokens == sum(lengths)
    assert np.array_equal(np.concatenate(stream), tokens)
    docs = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    expected = []
    for d in docs:
        expected.extend(d[i : i + seq_len - 2] for i in range(0, len(d), seq_len - 2))
    assert len(stream) == len(expected) and all(np.array_equal(a, b) for a, b in zip(stream, expected))
    assert np.array_equal(seqs[-1], seqs[len(seqs) - 1])
    with pytest.raises(IndexError):
        seqs[len(seqs)]


def test_packed_real_split(tiny_prepared):
    seqs = PackedSequences(tiny_prepared, "train", 128)
    shard = seqs.shard
    lengths = seqs.lengths()
    assert lengths.max() <= 128 and seqs[0][0] == 0
    # Every document fits in 126 tokens or is cut; nothing is lost: tokens + one </s> per piece + <s> per sequence.
    assert seqs.n_tokens == shard.n_tokens + seqs.piece_lengths.size + len(seqs)
    assert lengths.mean() > 100  # greedy packing fills sequences
    meta = load_meta(tiny_prepared)
    assert meta["vocab_size"] == shard.vocab_size and meta["splits"]["train"]["tokens"] == shard.n_tokens
    with pytest.raises(DwmlError, match="seq_len"):
        PackedSequences(tiny_prepared, "train", 2)
