from __future__ import annotations

import numpy as np
import pytest
import torch

from dwml.errors import DwmlError
from dwml.data.masking import BatchStream, MaskedBatch, Prefetcher, collate, mask_tokens, sequence_noise
from dwml.data.shards import PackedSequences

V = 30000  # large, so a "random" replacement rarely equals the original token


def test_collate_pads_to_longest():
    ids, mask = collate([np.array([0, 7, 2]), [0, 9, 9, 9, 2], torch.tensor([0, 2])], pad_id=1)
    assert ids.tolist() == [[0, 7, 2, 1, 1], [0, 9, 9, 9, 2], [0, 2, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def big_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(128):
        n = int(rng.integers(50, 512))
        body = rng.integers(5, V, size=n)
        body[rng.random(n) < 0.05] = 2  # document separators inside packed sequences
        seqs.append(np.concatenate([[0], body, [2]]))
    return collate(seqs)


def test_mask_statistics():
    ids, att = big_batch()
    batch = mask_tokens(ids, att, generator=torch.Generator().manual_seed(0), vocab_size=V)
    check_mask_statistics(ids, att, batch)
    assert torch.equal(ids, big_batch()[0]) and torch.equal(batch.attention_mask, att)  # inputs not modified


def test_stream_mask_statistics():
    """The stream's counter-based noise gives the same 15% / 80-10-10 corruption as mask_tokens."""
    ids, att = big_batch()
    seqs = [row[: int(n)].numpy() for row, n in zip(ids, att.sum(1))]
    batch = next(BatchStream(seqs, len(seqs), seed=4, vocab_size=V))
    order = BatchStream(seqs, len(seqs), seed=4, vocab_size=V).epoch_indices(0)
    check_mask_statistics(ids[order], att[order], batch)


def check_mask_statistics(ids, att, batch, replace=(0.8, 0.1)):
    flat_in, flat_out = ids.flatten(), batch.input_ids.flatten()
    candidates = (att.flatten() == 1) & (flat_in >= 5)
    pos = batch.positions
    assert candidates[pos].all()  # never a special or pad token
    assert torch.equal(batch.labels, flat_in[pos])
    assert pos.unique().numel() == pos.numel() and torch.equal(pos, pos.sort().values)
    rate = pos.numel() / int(candidates.sum())
    assert abs(rate - 0.15) < 0.005
    out = flat_out[pos]
    masked = (out == 4).float().mean().item()
    unchanged = (out == batch.labels).float().mean().item()
    random = ((out != 4) & (out != batch.labels)).float().mean().item()
    keep_share = 1.0 - replace[0] - replace[1]
    assert abs(masked - replace[0]) < 0.015 and abs(random - replace[1]) < 0.01 and abs(unchanged - keep_share) < 0.01
    if (out != 4).any():
        assert out[(out != 4)].min() >= 5
    assert out.max() < V
    # Outside the selected positions nothing changes.
    keep = torch.ones_like(flat_in, dtype=torch.bool)
    keep[pos] = False
    assert torch.equal(flat_out[keep], flat_in[keep]) and torch.equal(batch.attention_mask, att)


def test_mask_deterministic_given_generator():
    ids, att = big_batch()
    a = mask_tokens(ids, att, generator=torch.Generator().manual_seed(5), vocab_size=V)
    b = mask_tokens(ids, att, generator=torch.Generator().manual_seed(5), vocab_size=V)
    c = mask_tokens(ids, att, generator=torch.Generator().manual_seed(6), vocab_size=V)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
    assert not torch.equal(a.positions, c.positions)


def test_at_least_one_position_and_no_candidates():
    ids, att = collate([[0, 17, 2], [0, 2]])
    for seed in range(20):
        batch = mask_tokens(ids, att, generator=torch.Generator().manual_seed(seed), vocab_size=100, mask_prob=0.01)
        assert batch.positions.tolist() == [1] and batch.labels.tolist() == [17]
    ids, att = collate([[0, 2], [0, 4, 2]])
    with pytest.raises(DwmlError, match="no maskable"):
        mask_tokens(ids, att, generator=torch.Generator(), vocab_size=100)


def test_masked_batch_to():
    ids, att = collate([[0, 17, 18, 2]])
    batch = mask_tokens(ids, att, generator=torch.Generator().manual_seed(0), vocab_size=100)
    moved = batch.to("cpu")
    assert isinstance(moved, MaskedBatch) and torch.equal(moved.labels, batch.labels)


def toy_sequences(n: int = 103) -> list[np.ndarray]:
    """Sequence i is <s> (5 + i) ... </s>: its content identifies it."""
    return [np.array([0] + [5 + i] * (3 + i % 7) + [2]) for i in range(n)]


def assert_same(a: MaskedBatch, b: MaskedBatch) -> None:
    for name in ("input_ids", "attention_mask", "positions", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("world_size, rank", [(1, 0), (3, 2)])
def test_resume_is_bit_identical(world_size, rank):
    kw = dict(seed=11, vocab_size=200, rank=rank, world_size=world_size)
    seqs = toy_sequences()
    reference = BatchStream(seqs, 4, **kw)
    per_epoch = reference.batches_per_epoch  # 25 with one rank, 8 with three
    total, cut = 3 * per_epoch + 2, per_epoch + 5  # resume mid-epoch, then cross two epoch boundaries
    expected = [next(reference) for _ in range(total)]
    first = BatchStream(seqs, 4, **kw)
    for _ in range(cut):
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["cursor"] == 5
    resumed = BatchStream(seqs, 4, **kw)
    resumed.load_state_dict(state)
    assert resumed.tokens_seen == first.tokens_seen
    for k in range(cut, total):
        assert_same(next(resumed), expected[k])
    assert resumed.epoch == 3 and resumed.step == total
    assert reference.tokens_seen == resumed.tokens_seen


def test_ranks_are_disjoint_and_batches_match_their_indices():
    seqs = toy_sequences()
    streams = [BatchStream(seqs, 5, seed=3, vocab_size=200, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        idx = [s.epoch_indices(epoch) for s in streams]
        assert len(idx[0]) == len(idx[1]) == 51 and not set(idx[0]) & set(idx[1])
    assert not np.array_equal(streams[0].epoch_indices(0), streams[0].epoch_indices(1))
    for r, stream in enumerate(streams):
        order = stream.epoch_indices(0)
        for b in range(stream.batches_per_epoch):
            batch = next(stream)
            # Unmasked labels identify the sequences: token 5 + i belongs to sequence i.
            ids = batch.input_ids.clone().flatten()
            ids[batch.positions] = batch.labels
            firsts = ids.view(batch.input_ids.shape)[:, 1] - 5
            assert firsts.tolist() == order[b * 5 : (b + 1) * 5].tolist()
        assert stream.epoch == 1


def test_tokens_seen_and_errors():
    seqs = toy_sequences(10)
    stream = BatchStream(seqs, 3, seed=0, vocab_size=200, drop_last=False)
    assert stream.batches_per_epoch == 4
    sizes = [next(stream).input_ids.shape[0] for _ in range(4)]
    assert sizes == [3, 3, 3, 1] and stream.epoch == 1
    assert stream.tokens_seen == sum(len(s) for s in seqs)
    with pytest.raises(DwmlError, match="batch_size"):
        BatchStream(seqs, 11, seed=0, vocab_size=200)
    with pytest.raises(DwmlError, match="seed=1"):
        BatchStream(seqs, 3, seed=0, vocab_size=200).load_state_dict({**stream.state_dict(), "seed": 1})


def test_stream_over_prepared_data(tiny_prepared):
    seqs = PackedSequences(tiny_prepared, "train", 64)
    stream = BatchStream(seqs, 8, seed=0, vocab_size=seqs.shard.vocab_size)
    batch = next(stream)
    assert batch.input_ids.shape[0] == 8 and batch.input_ids.shape[1] <= 64
    assert (batch.input_ids[:, 0] == 0).all() and batch.positions.numel() > 0


def test_batch_head_keeps_the_masked_positions_of_its_rows():
    from dwml.data.masking import MaskedBatch

    ids = torch.arange(24).view(4, 6)
    batch = MaskedBatch(ids, torch.ones_like(ids), torch.tensor([1, 5, 7, 13, 20]), torch.tensor([1, 5, 7, 13, 20]))
    head = batch.head(2)
    assert head.input_ids.shape == (2, 6)
    assert head.positions.tolist() == [1, 5, 7] and head.labels.tolist() == [1, 5, 7]
    assert torch.equal(head.input_ids.flatten()[head.positions], head.labels)
    assert batch.head(9) is batch


def test_gather_equals_per_sequence_collate(tiny_prepared):
    seqs = PackedSequences(tiny_prepared, "train", 48)
    rng = np.random.default_rng(0)
    for size in (1, 7, len(seqs)):
        idx = rng.permutation(len(seqs))[:size]
        ids, lengths = seqs.gather(idx, pad_id=1)
        ref_ids, ref_mask = collate([seqs[int(i)] for i in idx], pad_id=1)
        assert np.array_equal(ids, ref_ids.numpy()) and np.array_equal(lengths, ref_mask.sum(1).numpy())
    with pytest.raises(IndexError):
        seqs.gather(np.array([len(seqs)]), pad_id=1)


def test_newline_separator_replaces_inner_eos_only(tiny_prepared):
    """data.separator = "newline": the tokenizer's one-token newline ends every utterance of a packed sequence but the
    last, which keeps </s>; everything else (tokens, lengths) is the </s> packing's, and gather agrees with [i]."""
    from dwml.data.tokenizer import load_raw, newline_id

    nl = newline_id(tiny_prepared / "tokenizer")
    assert load_raw(tiny_prepared / "tokenizer").decode([nl]) == "\n" and nl >= 4
    plain, sep = PackedSequences(tiny_prepared, "train", 48), PackedSequences(tiny_prepared, "train", 48, nl)
    assert not any(np.any(plain[i] == nl) for i in range(len(plain)))  # the prepared text holds no newline
    inner = 0
    for i in range(len(plain)):
        a, b = plain[i], sep[i]
        assert len(a) == len(b) and b[0] == 0 and b[-1] == 2 and not np.any(b[1:-1] == 2)
        assert np.array_equal(b == nl, (a == 2) & (np.arange(len(a)) < len(a) - 1))
        assert np.array_equal(np.where(b == nl, 2, b), a)
        inner += int((b == nl).sum())
    assert inner > len(plain) // 2  # many sequences hold several utterances
    idx = np.random.default_rng(1).permutation(len(sep))[:9]
    ids, lengths = sep.gather(idx, pad_id=1)
    ref_ids, ref_mask = collate([sep[int(i)] for i in idx], pad_id=1)
    assert np.array_equal(ids, ref_ids.numpy()) and np.array_equal(lengths, ref_mask.sum(1).numpy())


def test_mixed_separator_ends_the_hashed_half_of_utterances_with_a_newline(tiny_prepared):
    """A share of 0.5 (data.separator = "mixed"): an inner utterance ends with the newline exactly when
    `takes_separator` picks its piece index, with </s> otherwise; about half do, the choice does not depend on the
    sequence a piece lands in, and gather agrees with [i]."""
    from dwml.data.shards import takes_separator
    from dwml.data.tokenizer import newline_id

    nl = newline_id(tiny_prepared / "tokenizer")
    plain, mixed = PackedSequences(tiny_prepared, "train", 48), PackedSequences(tiny_prepared, "train", 48, nl, 0.5)
    picked = takes_separator(np.arange(plain.piece_lengths.size), 0.5)
    newlines = eos = 0
    for i in range(len(plain)):
        a, b = plain[i], mixed[i]
        assert len(a) == len(b) and np.array_equal(np.where(b == nl, 2, b), a) and b[-1] == 2
        inner = np.flatnonzero(a[:-1] == 2)  # the inner boundaries, in piece order
        expect = np.where(picked[plain.bounds[i]:plain.bounds[i + 1] - 1], nl, 2)
        assert np.array_equal(b[inner], expect)
        newlines, eos = newlines + int((b == nl).sum()), eos + int((b[:-1] == 2).sum())
    assert 0.35 < newlines / (newlines + eos) < 0.65 and newlines > 20
    for share in (0.0, 1.0):  # the ends of the range: all </s> / all newline
        assert np.array_equal(takes_separator(np.arange(1000), share), np.full(1000, share == 1.0))
    assert abs(takes_separator(np.arange(100_000), 0.3).mean() - 0.3) < 0.01
    idx = np.random.default_rng(2).permutation(len(mixed))[:9]
    ids, lengths = mixed.gather(idx, pad_id=1)
    ref_ids, ref_mask = collate([mixed[int(i)] for i in idx], pad_id=1)
    assert np.array_equal(ids, ref_ids.numpy()) and np.array_equal(lengths, ref_mask.sum(1).numpy())
    with pytest.raises(DwmlError, match="separator share"):
        PackedSequences(tiny_prepared, "train", 48, nl, 1.5)


def test_separator_sources_put_the_newline_only_after_utterances_of_those_sources(tiny_prepared):
    """data.separator_sources: an inner utterance ends with the newline exactly when its document belongs to one of
    the named sources (found here by a plain search of each piece's document in the shard header's ranges), </s>
    otherwise; with "mixed" the hash's half of those; gather agrees with [i]; a name the data lacks fails loudly."""
    from dwml.config import load_config
    from dwml.data.shards import takes_separator
    from dwml.data.tokenizer import newline_id
    from dwml.training.setup import separator_args

    nl = newline_id(tiny_prepared / "tokenizer")
    plain = PackedSequences(tiny_prepared, "train", 48)
    names = ("switchboard", "aochildes")
    header = plain.shard.header["sources"]
    assert {s["name"] for s in header} > set(names)
    doc = np.searchsorted(plain.shard.offsets, plain.piece_offsets, side="right") - 1
    source = np.array([next(s["name"] for s in header if s["first_doc"] <= d < s["first_doc"] + s["n_docs"])
                       for d in doc])
    dialogue = np.isin(source, names)
    for share, picked in ((1.0, dialogue), (0.5, dialogue & takes_separator(np.arange(doc.size), 0.5))):
        seqs = PackedSequences(tiny_prepared, "train", 48, nl, share, names)
        counts = [0, 0]
        for i in range(len(plain)):
            a, b = plain[i], seqs[i]
            inner = np.flatnonzero(a[:-1] == 2)
            want = picked[plain.bounds[i]:plain.bounds[i + 1] - 1]
            assert np.array_equal(b[inner], np.where(want, nl, 2)) and np.array_equal(np.where(b == nl, 2, b), a)
            counts[0], counts[1] = counts[0] + int(want.sum()), counts[1] + int((~want).sum())
        assert min(counts) > 20  # both kinds of boundary occur
        idx = np.random.default_rng(3).permutation(len(seqs))[:9]
        ids, lengths = seqs.gather(idx, pad_id=1)
        ref_ids, ref_mask = collate([seqs[int(i)] for i in idx], pad_id=1)
        assert np.array_equal(ids, ref_ids.numpy()) and np.array_equal(lengths, ref_mask.sum(1).numpy())
    cfg = load_config(None, ["data.separator='newline'", "data.separator_sources=['cbt', 'novels']"])
    with pytest.raises(DwmlError, match="data.separator_sources: 'novels' is not a source of .*its sources: .*cbt"):
        separator_args(cfg, tiny_prepared)
    cfg = load_config(None, ["data.separator='newline'", "data.separator_sources=['cbt']"])
    assert separator_args(cfg, tiny_prepared)["sources"] == ("cbt",)


def test_masks_depend_on_the_sequence_not_the_batch(tiny_prepared):
    """A sequence is masked the same way in any batch size or padded width (hence on any DDP rank split)."""
    seqs = PackedSequences(tiny_prepared, "train", 48)
    small = BatchStream(seqs, 4, seed=9, vocab_size=seqs.shard.vocab_size)
    large = BatchStream(seqs, 6, seed=9, vocab_size=seqs.shard.vocab_size)

    def rows(batches):  # per sequence: (corrupted ids, selected flags), trimmed to its length
        out = []
        for b in batches:
            selected = torch.zeros(b.input_ids.numel(), dtype=torch.bool)
            selected[b.positions] = True
            for r, n in enumerate(b.attention_mask.sum(1).tolist()):
                out.append((b.input_ids[r, :n], selected.view(b.input_ids.shape)[r, :n]))
        return out

    for _ in range(5):  # 12 sequences per round: 3 batches of 4 = 2 batches of 6, same permutation
        for (a_ids, a_sel), (b_ids, b_sel) in zip(rows([next(small) for _ in range(3)]),
                                                  rows([next(large) for _ in range(2)]), strict=True):
            assert torch.equal(a_ids, b_ids) and torch.equal(a_sel, b_sel)
    u0 = sequence_noise(9, 0, np.arange(8), 48, 1000, 5)[0]
    assert not np.array_equal(u0, sequence_noise(9, 1, np.arange(8), 48, 1000, 5)[0])  # new masks every epoch
    assert np.array_equal(u0, sequence_noise(9, 0, np.arange(8), 48, 1000, 5)[0])


def test_prefetcher_keeps_order_and_resumes_at_the_consumed_batch():
    seqs = toy_sequences()
    reference = [next(s) for s in [BatchStream(seqs, 4, seed=2, vocab_size=200)] for _ in range(60)]
    pre = Prefetcher(BatchStream(seqs, 4, seed=2, vocab_size=200), depth=3)
    for k in range(30):
        assert_same(next(pre), reference[k])
    state = pre.state_dict()  # the thread has read ahead; the state is that of the 30 batches handed out
    assert (state["epoch"], state["cursor"]) == (1, 5)
    assert pre.tokens_seen == sum(r.n_tokens for r in reference[:30])
    for k in range(30, 40):
        assert_same(next(pre), reference[k])
    pre.load_state_dict(state)  # rewind: the stream continues from batch 30 again
    for k in range(30, 60):
        assert_same(next(pre), reference[k])
    pre.close()
    resumed = Prefetcher(BatchStream(seqs, 4, seed=2, vocab_size=200))
    resumed.load_state_dict(state)
    assert_same(next(resumed), reference[30])
    resumed.close()


def test_prefetcher_raises_the_streams_error():
    class Broken(list):
        def __getitem__(self, i):
            raise DwmlError("shard unreadable")

    pre = Prefetcher(BatchStream(Broken(toy_sequences(8)), 4, seed=0, vocab_size=200))
    with pytest.raises(DwmlError, match="shard unreadable"):
        next(pre)
    pre.close()


def test_masking_schedule_goes_linearly_from_mask_prob_to_mask_prob_end_and_resumes_exactly():
    """data.mask_prob_end: batch k masks at rate 0.3 + (0.15 - 0.3) * k / (n - 1), measured on the batches
    themselves; every batch of the constant-rate stream at the same uniforms is a superset (the noise is shared);
    a resumed stream continues the schedule where it stopped."""
    ids, att = big_batch()
    seqs = [row[: int(n)].numpy() for row, n in zip(ids, att.sum(1))] * 3
    n = 5
    kw = dict(seed=4, vocab_size=V, mask_prob=0.3, mask_prob_end=0.15, schedule_batches=n)
    stream, flat = BatchStream(seqs, len(seqs) // 3, **kw), BatchStream(seqs, len(seqs) // 3, seed=4, vocab_size=V,
                                                                          mask_prob=0.3)
    rates = []
    for k in range(n + 1):
        batch, wide = next(stream), next(flat)
        # candidates: the selected tokens plus the unselected real, non-special ones (unselected tokens are unchanged)
        keep = torch.ones(batch.input_ids.numel(), dtype=torch.bool)
        keep[batch.positions] = False
        real = (batch.attention_mask.flatten() == 1) & (batch.input_ids.flatten() >= 5)
        rates.append(batch.positions.numel() / (batch.positions.numel() + int((real & keep).sum())))
        assert set(batch.positions.tolist()) <= set(wide.positions.tolist())
    expected = [0.3 - 0.15 * min(k / (n - 1), 1) for k in range(n + 1)]
    assert rates == pytest.approx(expected, abs=0.006)
    assert stream.rate(n) == stream.rate(100) == pytest.approx(0.15)
    resumed, again = BatchStream(seqs, len(seqs) // 3, **kw), BatchStream(seqs, len(seqs) // 3, **kw)
    for _ in range(2):
        next(again)
    resumed.load_state_dict(again.state_dict())
    reference = BatchStream(seqs, len(seqs) // 3, **kw)
    expected_batches = [next(reference) for _ in range(n)]
    for k in range(2, n):
        assert_same(next(resumed), expected_batches[k])
    with pytest.raises(DwmlError, match="schedule_batches"):
        BatchStream(seqs, 4, seed=0, vocab_size=V, mask_prob=0.3, mask_prob_end=0.15)
    with pytest.raises(DwmlError, match="mask_prob"):
        BatchStream(seqs, 4, seed=0, vocab_size=V, mask_prob=0.3, mask_prob_end=1.5, schedule_batches=3)


@pytest.mark.parametrize("replace", [(1.0, 0.0), (0.5, 0.3), (0.0, 0.0)])
def test_corruption_split_replaces_the_configured_shares_of_the_same_selection(replace):
    """data.replace_mask / replace_random: the measured shares of <mask>, random and kept tokens follow the split
    (BabyBERTa's (1, 0): every selected token is <mask>); the selected positions are those of BERT's 80/10/10 at the
    same noise, so a split changes what the model sees, never what it predicts."""
    ids, att = big_batch()
    seqs = [row[: int(n)].numpy() for row, n in zip(ids, att.sum(1))]
    batch = next(BatchStream(seqs, len(seqs), seed=4, vocab_size=V, replace=replace))
    bert = next(BatchStream(seqs, len(seqs), seed=4, vocab_size=V))
    order = BatchStream(seqs, len(seqs), seed=4, vocab_size=V).epoch_indices(0)
    check_mask_statistics(ids[order], att[order], batch, replace)
    assert batch.positions.equal(bert.positions) and batch.labels.equal(bert.labels)
    via_generator = mask_tokens(ids, att, generator=torch.Generator().manual_seed(0), vocab_size=V, replace=replace)
    check_mask_statistics(ids, att, via_generator, replace)


@pytest.mark.parametrize("replace", [(0.8, 0.3), (-0.1, 0.0), (1.2, 0.0), (True, 0.0), ("0.8", 0.1)])
def test_a_corruption_split_outside_the_simplex_is_refused(replace):
    ids, att = big_batch()
    seqs = [row[: int(n)].numpy() for row, n in zip(ids, att.sum(1))]
    with pytest.raises(DwmlError, match="replace"):
        BatchStream(seqs, 4, seed=0, vocab_size=V, replace=replace)
