"""Reference lines of token counts: the KN trigram and the unigram against a direct dict-and-formula
implementation, normalisation, the per-prepared-directory cache, and the lines in `dwml eval`'s table."""
import itertools
import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from dwml.data.tokenizer import BOS_ID, EOS_ID, N_SPECIAL
from dwml.evaluation import reference as ref

D = 0.75


def naive_kn(docs, V):
    """Interpolated KN with one discount, written out with dicts (docs as <s> <s> d </s>)."""
    tri = Counter()
    for d in docs:
        s = [BOS_ID, BOS_ID, *d, EOS_ID]
        for i in range(2, len(s)):
            tri[tuple(s[i - 2:i + 1])] += 1
    uv_c, uv_n = Counter(), Counter()
    for (u, v, w), c in tri.items():
        uv_c[u, v] += c
        uv_n[u, v] += 1
    vw_n = Counter((v, w) for (u, v, w) in tri)  # N1+(. v w)
    v_n, v_types = Counter(), Counter()
    for (v, w), n in vw_n.items():
        v_n[v] += n
        v_types[v] += 1
    cont = Counter(w for (v, w) in vw_n)  # N1+(. w)
    total = sum(cont.values())
    Z = [w for w in range(V) if w >= N_SPECIAL or w == EOS_ID]

    def p1(w):
        return (max(cont[w] - D, 0) + D * len(cont) / len(Z)) / total

    def p2(v, w):
        if v_n[v] == 0:
            return p1(w)
        return (max(vw_n[v, w] - D, 0) + D * v_types[v] * p1(w)) / v_n[v]

    def p3(u, v, w):
        if uv_c[u, v] == 0:
            return p2(v, w)
        return (max(tri[u, v, w] - D, 0) + D * uv_n[u, v] * p2(v, w)) / uv_c[u, v]

    return p3, Z


def test_kn_trigram_and_unigram_equal_the_formulas_and_sum_to_one():
    rng = np.random.default_rng(0)
    V = 14
    docs = [list(rng.integers(N_SPECIAL, V, rng.integers(1, 7))) for _ in range(40)]
    stream = np.concatenate([[BOS_ID, BOS_ID, *d, EOS_ID] for d in docs]).astype(np.int64)
    kn = ref.KneserNeyTrigram(stream, V)
    p3, Z = naive_kn(docs, V)
    contexts = list(itertools.product([BOS_ID, *range(N_SPECIAL, V)], repeat=2))
    for u, v in contexts:
        ours = kn.prob(np.full(len(Z), u), np.full(len(Z), v), np.array(Z))
        np.testing.assert_allclose(ours, [p3(u, v, w) for w in Z], rtol=1e-12, atol=1e-15)
        assert math.isclose(float(ours.sum()), 1.0, rel_tol=1e-12)
    tokens = np.concatenate([np.array(d) for d in docs]).astype(np.int64)
    uni = ref.Unigram(tokens, V)
    counts = Counter(tokens.tolist())
    for w in range(N_SPECIAL, V):
        assert math.isclose(math.exp(uni.log_prob(np.array([w]))[0]),
                            (counts[w] + 1) / (tokens.size + V - N_SPECIAL), rel_tol=1e-12)


def test_reference_lines_are_cached_and_recomputed_when_the_pairs_change(tiny_prepared, tmp_path, monkeypatch):
    import shutil

    prepared = tmp_path / "data"
    shutil.copytree(tiny_prepared, prepared)
    first = ref.reference_results(prepared, "blimp_fast,ewok_fast", limit=3)
    assert first["cached"] == [] and len(list((prepared / "reference").glob("*.json"))) == 2
    for m in first["models"].values():
        for task, acc in m["summary"].items():
            assert 0 <= m["strict_summary"][task] <= acc <= 100
    monkeypatch.setattr(ref, "KneserNeyTrigram", lambda *a, **k: pytest.fail("counted again"))
    again = ref.reference_results(prepared, "blimp_fast,ewok_fast", limit=3)
    assert again["cached"] == ["blimp_fast", "ewok_fast"] and again["models"] == first["models"]
    with pytest.raises(BaseException, match="counted again"):  # other pairs: another cache key
        ref.reference_results(prepared, "blimp_fast", limit=4)


def test_word_order_pairs_tie_under_the_unigram(tiny_prepared):
    """Same tokens in another order: the unigram scores tie exactly (the artefact behind the 59.9)."""
    from dwml.data.tokenizer import load_tokenizer
    from dwml.evaluation.evaldata import MinimalPair

    tokens, stream, vocab = ref.train_stream(tiny_prepared)
    pair = MinimalPair(good="the cat sat on the mat", bad="the mat sat on the cat", group="g", field="f")
    scores = ref.score_reference(ref.Unigram(tokens, vocab), ref.KneserNeyTrigram(stream, vocab),
                                 load_tokenizer(tiny_prepared / "tokenizer"), [pair])
    assert scores["unigram"][0] == scores["unigram"][1]
    assert scores["kn_trigram"][0] != scores["kn_trigram"][1]


def test_eval_table_shows_the_reference_lines(tiny_prepared, capsys):
    from transformers import AutoTokenizer

    from dwml.cli import main
    from evalfixtures import make_model

    tok = AutoTokenizer.from_pretrained(tiny_prepared / "tokenizer")
    folder = tiny_prepared.parent / "model_for_reference"
    if not folder.exists():
        make_model(tok).save_pretrained(folder)
        tok.save_pretrained(folder)
    assert main(["eval", str(folder), "--tasks", "blimp_fast", "--limit", "2", "--reference-data",
                 str(tiny_prepared), "--no-groups"]) == 0
    out = capsys.readouterr().out
    assert "unigram (train counts)" in out and "KN trigram" in out
