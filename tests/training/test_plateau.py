"""Unigram entropy (prepare + fallback for older prepared dirs), plateau exit, and their place in training output."""
import json
import math

import numpy as np
import pytest

from dwml.data.entropy import train_unigram_entropy, unigram_entropy
from dwml.training.plateau import describe, plateau_exit_step, valid_history
from dwml.data.shards import Shard, load_meta
from dwml.training.train import train

from runfixtures import make_cfg


def test_unigram_entropy_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    tokens = rng.zipf(1.3, size=5000) % 300 + 4
    counts: dict[int, int] = {}
    for t in tokens.tolist():
        counts[t] = counts.get(t, 0) + 1
    naive = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert unigram_entropy(tokens.astype(np.uint16), 400) == pytest.approx(naive, rel=1e-12)
    assert unigram_entropy(np.full(10, 7), 8) == 0.0  # one token: no uncertainty
    assert unigram_entropy(np.arange(4, 12), 12) == pytest.approx(math.log(8))  # uniform over 8


def test_prepare_records_it_and_older_dirs_get_it_computed(tiny_prepared, tmp_path):
    meta = load_meta(tiny_prepared)
    shard = Shard(tiny_prepared, "train")
    # over the train shard's document tokens: the labels MLM predicts (the shards hold no specials)
    assert meta["unigram_entropy"] == pytest.approx(unigram_entropy(shard.tokens, shard.vocab_size), rel=1e-12)
    assert 3.0 < meta["unigram_entropy"] < math.log(meta["vocab_size"])
    older = {k: v for k, v in meta.items() if k != "unigram_entropy"}
    assert train_unigram_entropy(tiny_prepared, older) == pytest.approx(meta["unigram_entropy"], rel=1e-12)


def test_plateau_exit_step():
    history = [(0, 9.0), (200, 6.9), (400, 6.4), (600, 6.2), (800, 6.25)]
    assert plateau_exit_step(history, 6.8) == 600  # 6.2 <= 6.8 - 0.5; 6.4 is not
    assert plateau_exit_step(list(reversed(history)), 6.8) == 600  # scanned in step order
    assert plateau_exit_step(history, 6.8, margin=0.3) == 400
    assert plateau_exit_step(history, 6.0) is None
    assert "never" in describe(6.79, 6.8, None) and "frequencies only" in describe(6.79, 6.8, None)
    assert "step 600" in describe(6.2, 6.8, 600) and "uses context" in describe(6.2, 6.8, 600)


def test_training_reports_entropy_and_plateau_exit(tiny_prepared, tmp_path):
    cfg = make_cfg(tiny_prepared, tmp_path / "run", train={"max_steps": 30, "eval_every": 10, "save_every": 30})
    summary = train(cfg)
    entropy = load_meta(tiny_prepared)["unigram_entropy"]
    assert summary["unigram_entropy"] == pytest.approx(entropy)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in valid] == [0, 10, 20, 30] and all(r["unigram_entropy"] == entropy for r in valid)
    history = valid_history(tmp_path / "run" / "metrics.jsonl", 1)[0]
    expected = next((s for s, v in history if v <= entropy - 0.5), None)
    assert summary["peers"][0]["plateau_exit_step"] == expected
    from dwml.training.cli import format_summary

    assert "plateau exit" in format_summary(summary) and f"{entropy:.4f} nats" in format_summary(summary)


def test_validation_masks_at_eval_mask_prob_whatever_the_training_rate(tiny_prepared, tmp_path):
    from dwml.training.runtime import compute_init
    from dwml.training.setup import make_batches

    rt = compute_init("cpu", 0, "fp32")
    vocab = load_meta(tiny_prepared)["vocab_size"]
    a = make_batches(make_cfg(tiny_prepared, tmp_path / "a"), tiny_prepared, vocab, rt, False)
    b = make_batches(make_cfg(tiny_prepared, tmp_path / "b", data={"mask_prob": 0.4}), tiny_prepared, vocab, rt,
                     False)
    c = make_batches(make_cfg(tiny_prepared, tmp_path / "c", data={"eval_mask_prob": 0.3}), tiny_prepared, vocab,
                     rt, False)
    for va, vb in zip(a.valid, b.valid):  # the same validation batches, masks included
        assert va.positions.equal(vb.positions) and va.input_ids.equal(vb.input_ids)
    assert not next(a.train).positions.equal(next(b.train).positions)  # while training masks at its own rate
    n = sum(v.positions.numel() for v in a.valid)
    assert sum(v.positions.numel() for v in c.valid) > 1.5 * n


def test_the_masking_schedule_spans_the_runs_micro_batches_and_leaves_validation_alone(tiny_prepared, tmp_path):
    from dwml.training.runtime import compute_init
    from dwml.training.setup import make_batches

    rt = compute_init("cpu", 0, "fp32")
    vocab = load_meta(tiny_prepared)["vocab_size"]
    cfg = make_cfg(tiny_prepared, tmp_path / "a", train={"max_steps": 10, "grad_accum": 2},
                   data={"mask_prob": 0.3, "mask_prob_end": 0.15, "eval_mask_prob": 0.15})
    plain = make_cfg(tiny_prepared, tmp_path / "b", data={"mask_prob": 0.3}, train={"max_steps": 10, "grad_accum": 2})
    a, b = (make_batches(c, tiny_prepared, vocab, rt, True) for c in (cfg, plain))
    assert a.train.rate(0) == 0.3 and a.train.rate(19) == pytest.approx(0.15) and a.train.rate(10) < 0.23
    assert b.train.rate(19) == 0.3 and a.heldout.rate(19) == 0.3  # the outer loop's held-out batches: mask_prob
    for va, vb in zip(a.valid, b.valid):
        assert va.positions.equal(vb.positions)


def test_the_corruption_split_reaches_training_and_held_out_batches_not_validation(tiny_prepared, tmp_path):
    from dwml.training.runtime import compute_init
    from dwml.training.setup import make_batches

    rt = compute_init("cpu", 0, "fp32")
    vocab = load_meta(tiny_prepared)["vocab_size"]
    nounmask = make_cfg(tiny_prepared, tmp_path / "a", data={"replace_mask": 1.0, "replace_random": 0.0})
    bert = make_cfg(tiny_prepared, tmp_path / "b")
    a, b = (make_batches(c, tiny_prepared, vocab, rt, True) for c in (nounmask, bert))
    for stream in (a.train, a.heldout):
        batch = next(stream)
        assert (batch.input_ids.flatten()[batch.positions] == 4).all()  # every selected token is <mask>
    batch = next(b.train)
    assert not (batch.input_ids.flatten()[batch.positions] == 4).all()
    for va, vb in zip(a.valid, b.valid):  # validation keeps BERT's 80/10/10
        assert va.input_ids.equal(vb.input_ids)
