"""Masked-LM scorers: batched vs naive parity, PLL vs PLL-word-l2r on a hand-built model, prefixes, the ensemble."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.modeling_outputs import MaskedLMOutput

from dwml.errors import DwmlError
from dwml.evaluation.scoring import (PeerEnsemble, _no_tf32, _pack, build_masked_copies, cached_masked_copies, masked_log_probs,
                          score_sentences, score_sentences_naive)
from evalfixtures import EVAL_DATA, blimp_sentences, make_model, make_tokenizer

pytestmark = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"shared eval data not found at {EVAL_DATA}")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok, seed=0)


@pytest.fixture(scope="module")
def sentences():
    return blimp_sentences(n_pairs=5, files=2)  # 20 real BLiMP sentences


# ------------------------------------------------------------------------------------------- batched vs naive


@pytest.mark.parametrize("method", ["pll", "pll_word_l2r"])
@pytest.mark.parametrize("budget", [None, 60])  # 60 tokens: many small batches with padding
def test_batched_matches_naive(model, tok, sentences, method, budget):
    fast = score_sentences(model, tok, sentences, method=method, token_budget=budget)
    slow = score_sentences_naive(model, tok, sentences, method=method)
    assert len(fast) == len(slow) == 20
    assert max(abs(a - b) for a, b in zip(fast, slow)) < 1e-4
    assert len(set(slow)) > 10  # real, distinct scores, not a degenerate constant


def test_batched_matches_naive_with_prefixes(model, tok, sentences):
    prefixes = [sentences[(i + 3) % len(sentences)] if i % 3 else None for i in range(len(sentences))]
    for method in ("pll", "pll_word_l2r"):
        fast = score_sentences(model, tok, sentences, method=method, prefixes=prefixes, token_budget=100)
        slow = score_sentences_naive(model, tok, sentences, method=method, prefixes=prefixes)
        assert max(abs(a - b) for a, b in zip(fast, slow)) < 1e-4


def test_any_masked_lm_uses_the_full_logits_path(tok, sentences):
    """A non-RoBERTa AutoModelForMaskedLM (BERT): batched scorer == naive, through the generic full-logits gather."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, pad_token_id=1)).eval()
    assert not hasattr(bert, "roberta")
    fast = score_sentences(bert, tok, sentences, method="pll_word_l2r", token_budget=80)
    slow = score_sentences_naive(bert, tok, sentences, method="pll_word_l2r")
    assert max(abs(a - b) for a, b in zip(fast, slow)) < 1e-4


def test_score_is_sum_of_single_token_log_probs(model, tok):
    """PLL by hand for one sentence: mask each non-special token, read log p(true token) from the full model."""
    text = "the dog saw a cat."
    ids = tok(text)["input_ids"]
    expected = 0.0
    for t in range(1, len(ids) - 1):
        masked = torch.tensor([ids])
        masked[0, t] = tok.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=masked).logits[0, t]
        expected += torch.log_softmax(logits, -1)[ids[t]].item()
    assert score_sentences(model, tok, [text])[0] == pytest.approx(expected, abs=1e-4)


def test_duplicates_score_identically_and_order_is_kept(model, tok, sentences):
    batch = [sentences[0], sentences[1], sentences[0]]
    scores = score_sentences(model, tok, batch)
    assert scores[0] == scores[2]
    assert scores[1] == score_sentences(model, tok, [sentences[1]])[0]


def test_masked_log_probs_fast_path_equals_full_logits(model, tok, sentences):
    enc = tok(sentences[:4], padding=True, return_tensors="pt")
    positions = torch.tensor([1, enc.input_ids.shape[1] + 2, 3 * enc.input_ids.shape[1] + 1])
    with torch.no_grad():
        fast = masked_log_probs(model, enc.input_ids, enc.attention_mask, positions)
        full = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        ref = torch.log_softmax(full.reshape(-1, full.shape[-1])[positions], -1)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_batches_hold_one_length_within_the_budget():
    lengths = [3] * 5 + [4] * 7 + [9] + [20] * 2
    batches = _pack(lengths, budget=12)
    assert [(a, b) for a, b, _ in batches] == [(0, 4), (4, 5), (5, 8), (8, 11), (11, 12), (12, 13), (13, 14), (14, 15)]
    for start, stop, width in batches:
        assert set(lengths[start:stop]) == {width}  # no padding
        assert stop - start == 1 or (stop - start) * width <= 12  # a row longer than the budget goes alone
    assert _pack([], 5) == []


# ------------------------------------------------------------------------------------------- precision


def test_fp32_is_true_fp32_even_inside_an_outer_autocast(model, tok, sentences):
    ref = score_sentences_naive(model, tok, sentences[:6])
    fp32 = score_sentences(model, tok, sentences[:6], precision="fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. called from a bf16 training loop
        inside = score_sentences(model, tok, sentences[:6], precision="fp32")
    assert inside == fp32 and max(abs(a - b) for a, b in zip(fp32, ref)) < 1e-4


def test_no_tf32_switches_cublas_and_cudnn_to_ieee_and_restores_them():
    """What fp32 scoring does on CUDA (the switches exist in CPU builds too): after `dwml.training.runtime` enabled TF32 with
    the legacy flags, the matmul and convolution precision is IEEE inside and TF32 again afterwards."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with _no_tf32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bf16_is_close_to_fp32_but_not_equal(model, tok, sentences):
    fp32 = score_sentences(model, tok, sentences, precision="fp32")
    bf16 = score_sentences(model, tok, sentences, precision="bf16")
    diff = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    assert max(diff) < 0.05 and max(diff) > 1e-6  # bf16 rounding is visible, and small
    with pytest.raises(DwmlError, match="precision"):
        score_sentences(model, tok, sentences, precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_per_batch_on_cuda(model, tok, sentences):
    """The device loop launches work only: the host syncs as often with 40 batches as with 3 (the copies' transfer to
    the device and the one read-back), and fp32 runs without TF32."""
    import warnings

    gpu = make_model(tok, seed=0).cuda()

    def syncs(budget: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                score_sentences(gpu, tok, sentences, token_budget=budget)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    score_sentences(gpu, tok, sentences)  # warm-up (and fill the copy cache)
    assert syncs(4096) == syncs(20)
    torch.backends.cuda.matmul.allow_tf32 = True
    fp32 = score_sentences(gpu, tok, sentences, precision="fp32")
    assert torch.backends.cuda.matmul.allow_tf32  # restored
    assert max(abs(a - b) for a, b in zip(fp32, score_sentences(model, tok, sentences))) < 1e-4


# ------------------------------------------------------------------------------------------- cached copies


def test_copies_are_built_once_per_tokenizer_and_texts(model, tok, sentences):
    a = cached_masked_copies(tok, sentences, [0] * len(sentences), "pll", 128)
    assert cached_masked_copies(tok, list(sentences), [0] * len(sentences), "pll", 128) is a
    assert cached_masked_copies(make_tokenizer(), sentences, [0] * len(sentences), "pll", 128) is a  # same definition
    other_tok = make_tokenizer(vocab_size=500)
    b = cached_masked_copies(other_tok, sentences, [0] * len(sentences), "pll", 128)
    assert b is not a and not torch.equal(a.ids, b.ids)
    assert cached_masked_copies(tok, sentences, [0] * len(sentences), "pll_word_l2r", 128) is not a
    assert cached_masked_copies(tok, sentences[1:], [0] * (len(sentences) - 1), "pll", 128) is not a
    fresh = build_masked_copies(tok, sentences, [0] * len(sentences), "pll", 128)
    assert all(torch.equal(getattr(a, f), getattr(fresh, f)) for f in ("ids", "lengths", "sent", "pos", "end"))
    # Two models scored through the cache get their own (different) scores.
    other = make_model(tok, seed=9)
    assert score_sentences(other, tok, sentences) != score_sentences(model, tok, sentences)


# ------------------------------------------------------------------------------------------- which tokens are scored


def test_prefix_scores_only_the_continuation(tok):
    prefix, target = "the dog is in the house.", "the cat sat."
    copies = build_masked_copies(tok, [prefix + " " + target], [len(prefix)], "pll")
    enc = tok(prefix + " " + target)
    n_target = len(tok(" " + target, add_special_tokens=False)["input_ids"])
    assert copies.pos.tolist() == list(range(len(enc.input_ids) - 1 - n_target, len(enc.input_ids) - 1))
    assert copies.target.tolist() == enc.input_ids[-1 - n_target:-1]


def pipeline_indices(tokenizer, sentence: str, completion: str) -> list[int]:
    """babylm/evaluation-pipeline-2025 `process_mlm_sentences`, transcribed: the positions it masks and scores are
    the tokens whose character span ends after the completion starts."""
    out = tokenizer(sentence, return_offsets_mapping=True)
    start = len(sentence) - len(completion)
    return [i for i, (_, end) in enumerate(out["offset_mapping"]) if end > start]


def test_scored_tokens_are_the_pipelines_even_a_line_end(tok, sentences, tmp_path):
    """With an exported eos-run tokenizer a line break is </s>; the pipeline masks and scores that </s> (its span is
    the line break), and so does dwml, while the added <s> ... </s> are never scored."""
    from dwml.data.tokenizer import copy_tokenizer, load_tokenizer

    tok.save_pretrained(tmp_path / "plain")
    lines = load_tokenizer(copy_tokenizer(tmp_path / "plain", tmp_path / "lines", line_ends=True))
    dialogue = ["What did you get?\nI got a chair.", "A: Who cleaned?\nB: The patio.", "one line only."]
    for tokenizer in (tok, lines):
        texts = dialogue + sentences[:4]
        for prefix in (0, 5):  # a whole text, and a completion after the first 5 characters
            copies = build_masked_copies(tokenizer, texts, [prefix] * len(texts), "pll")
            for j, text in enumerate(texts):
                mine = copies.pos[copies.sent == j].tolist()
                assert sorted(mine) == pipeline_indices(tokenizer, text, text[prefix:]), (text, prefix)
    enc = lines(dialogue[0])["input_ids"]
    assert enc.count(2) == 2 and enc[-1] == 2  # the line end and the closing </s>
    scored = build_masked_copies(lines, dialogue[:1], [0], "pll")
    assert 2 in scored.target.tolist() and 0 not in scored.target.tolist()
    assert scored.pos.tolist().count(len(enc) - 1) == 0  # the closing </s> is not scored


def test_l2r_masks_the_rest_of_the_word(tok):
    text = "Who should Derek hug after shocking Richard?"
    enc = tok(text)
    words = enc.word_ids()
    copies = build_masked_copies(tok, [text], [0], "pll_word_l2r")
    pll = build_masked_copies(tok, [text], [0], "pll")
    assert pll.end.tolist() == [p + 1 for p in pll.pos.tolist()]
    assert copies.pos.tolist() == pll.pos.tolist() == list(range(1, len(enc.input_ids) - 1))
    for p, e in zip(copies.pos.tolist(), copies.end.tolist()):
        assert all(words[q] == words[p] for q in range(p, e))  # masks only its own word ...
        assert e == len(words) or words[e] != words[p]  # ... up to the word's end
    assert any(e > p + 1 for p, e in zip(copies.pos.tolist(), copies.end.tolist()))  # the fixture splits words


# ------------------------------------------------------------------------------------------- PLL vs l2r, closed form


class PreviousPieceOracle(torch.nn.Module):
    """Hand-built masked LM: at any position whose right neighbour is visible and listed in `table`, it puts logit L
    on table[neighbour]; everywhere else all logits are 0 (uniform). With table[next piece] = previous piece of the
    same word, it can recover a word's piece exactly when the rest of the word is visible - the leak PLL-word-l2r
    closes (Kauf & Ivanova 2023)."""

    def __init__(self, vocab: int, mask_id: int, table: dict[int, int], L: float = 6.0):
        super().__init__()
        self.vocab, self.mask_id, self.L = vocab, mask_id, L
        self.table = torch.full((vocab,), -1, dtype=torch.long)
        for k, v in table.items():
            self.table[k] = v

    def forward(self, input_ids, attention_mask=None, **kwargs):
        B, T = input_ids.shape
        right = torch.cat([input_ids[:, 1:], torch.full((B, 1), self.mask_id)], dim=1)
        pred = self.table[right]
        hit = (right != self.mask_id) & (pred >= 0)
        logits = torch.zeros(B, T, self.vocab)
        b, t = hit.nonzero(as_tuple=True)
        logits[b, t, pred[b, t]] = self.L
        return MaskedLMOutput(logits=logits)


def test_pll_exceeds_l2r_by_the_closed_form_amount(tok):
    text = "Who should Derek hug after shocking Richard?"
    enc = tok(text)
    ids, words = enc.input_ids, enc.word_ids()
    inner = [t for t in range(1, len(ids) - 2) if words[t] is not None and words[t + 1] == words[t]]
    table = {ids[t + 1]: ids[t] for t in inner}  # a piece that follows two different pieces keeps the last one
    V, L = len(tok), 6.0
    oracle = PreviousPieceOracle(V, tok.mask_token_id, table, L)
    hit, miss, uniform = L - math.log(math.exp(L) + V - 1), -math.log(math.exp(L) + V - 1), -math.log(V)

    def expected(method: str) -> float:
        total = 0.0
        for t in range(1, len(ids) - 1):
            right_masked = method == "pll_word_l2r" and words[t + 1] == words[t]
            guess = table.get(ids[t + 1], -1)
            total += uniform if right_masked or guess < 0 else (hit if guess == ids[t] else miss)
        return total

    for method in ("pll", "pll_word_l2r"):
        assert score_sentences(oracle, tok, [text], method=method, token_budget=50)[0] == pytest.approx(
            expected(method), abs=1e-4)
        assert score_sentences_naive(oracle, tok, [text], method=method)[0] == pytest.approx(expected(method), abs=1e-4)
    # Only a word's inner pieces differ: PLL sees the next piece (hit, or miss where the lookup is ambiguous),
    # l2r has it masked (uniform). The hits make PLL higher: the leak inflates PLL.
    n_hit = sum(table[ids[t + 1]] == ids[t] for t in inner)
    assert n_hit >= 5
    pll = score_sentences(oracle, tok, [text], method="pll")[0]
    l2r = score_sentences(oracle, tok, [text], method="pll_word_l2r")[0]
    assert pll - l2r == pytest.approx(n_hit * (hit - uniform) + (len(inner) - n_hit) * (miss - uniform), abs=1e-4)
    assert pll > l2r


def test_l2r_equals_pll_when_every_word_is_one_token(model, tok):
    text = "you want to look at that."
    words = tok(text).word_ids()
    assert len(set(w for w in words if w is not None)) == len(words) - 2  # precondition: one piece per word
    a = score_sentences(model, tok, [text], method="pll")[0]
    b = score_sentences(model, tok, [text], method="pll_word_l2r")[0]
    assert a == b


# ------------------------------------------------------------------------------------------- ensemble


def test_one_hot_omega_equals_that_peer(tok, sentences):
    p0, p1 = make_model(tok, seed=1), make_model(tok, seed=2)
    for w, peer in (([1.0, 0.0], p0), ([0.0, 3.0], p1)):
        ens = PeerEnsemble([p0, p1], w)
        assert score_sentences(ens, tok, sentences) == score_sentences(peer, tok, sentences)
        naive = score_sentences_naive(ens, tok, sentences[:4])
        assert max(abs(a - b) for a, b in zip(naive, score_sentences_naive(peer, tok, sentences[:4]))) < 1e-5


def test_identical_peers_equal_one_peer(tok, sentences):
    peer = make_model(tok, seed=3)
    ens = PeerEnsemble([peer, make_model(tok, seed=3), make_model(tok, seed=3)], [0.2, 0.5, 0.3])
    one = score_sentences(peer, tok, sentences)
    assert max(abs(a - b) for a, b in zip(score_sentences(ens, tok, sentences), one)) < 1e-4


def test_ensemble_is_a_mixture_of_distributions(tok, sentences):
    """log(0.25 p0 + 0.75 p1) at every masked position; batched and naive ensemble scorers agree."""
    p0, p1 = make_model(tok, seed=4), make_model(tok, seed=5)
    ens = PeerEnsemble([p0, p1], [1.0, 3.0])
    enc = tok(sentences[:3], padding=True, return_tensors="pt")
    positions = torch.tensor([2, enc.input_ids.shape[1] + 3])
    with torch.no_grad():
        mix = ens.masked_log_probs(enc.input_ids, enc.attention_mask, positions)
        q0 = masked_log_probs(p0, enc.input_ids, enc.attention_mask, positions).exp()
        q1 = masked_log_probs(p1, enc.input_ids, enc.attention_mask, positions).exp()
    torch.testing.assert_close(mix, torch.log(0.25 * q0 + 0.75 * q1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mix.exp().sum(-1), torch.ones(2))
    fast = score_sentences(ens, tok, sentences[:6], method="pll_word_l2r")
    slow = score_sentences_naive(ens, tok, sentences[:6], method="pll_word_l2r")
    assert max(abs(a - b) for a, b in zip(fast, slow)) < 1e-4


@pytest.mark.parametrize("omega", [[1.0], [1.0, -1.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_bad_omega_is_a_user_error(tok, omega):
    with pytest.raises(DwmlError, match="omega"):
        PeerEnsemble([make_model(tok, seed=0), make_model(tok, seed=1)], omega)


# ------------------------------------------------------------------------------------------- user errors


def test_user_errors(model, tok):
    with pytest.raises(DwmlError, match="method"):
        score_sentences(model, tok, ["a cat."], method="pppl")
    with pytest.raises(DwmlError, match="exceeds"):
        score_sentences(model, tok, [" ".join(["hippopotamus"] * 60)])
    with pytest.raises(DwmlError, match="token-budget"):
        score_sentences(model, tok, ["a cat."], token_budget=0)
    with pytest.raises(DwmlError, match="prefixes"):
        score_sentences(model, tok, ["a cat.", "a dog."], prefixes=["x"])
