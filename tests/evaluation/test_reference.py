"""Reference lines of token counts: the KN trigram and the unigram against a direct dict-and-formula
implementation, normalisation, the per-prepared-directory cache, and the lines in `dwml eval`'s table."""
import itertools
import math
from collections import Counter

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


def test_eval_table_shows_the_reference_lines(tiny_prepared, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    from dwml.cli import main
    from evalfixtures import make_model

    prepared = tmp_path / "data"  # a private copy: the lines are cached inside the prepared directory
    shutil.copytree(tiny_prepared, prepared)
    tok = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    folder = tmp_path / "model"
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert main(["eval", str(folder), "--tasks", "blimp_fast", "--limit", "2", "--reference-data",
                 str(prepared), "--no-groups"]) == 0
    out = capsys.readouterr().out
    assert "unigram (train counts)" in out and "KN trigram" in out


# ----------------------------------------------------------------------------------------------------------------
# Pairs end to end (prefixes, </s>, exact ties), the cache following the eval files, a run's own data found through
# its summary, the CLI switches, and the rows of the demo and the report.

PAIRS = [
    ("the dog saw the cat.", "the cat saw the dog.", None, None),  # the same tokens: an exact unigram tie
    ("These books are old.", "These books is old.", None, None),
    ("He ate it.", "He ate it.", None, None),  # identical: a tie for both lines
    ("The ball is in the box.", "The box is in the ball.", "Ana put a ball in a box.", "Ana put a ball in a box."),
    ("It is wet.", "It is wet.", "It rained.", "It was sunny."),  # EWoK contexts: the same target after two contexts
    ("What did you get?\nI got a chair.", "What did you get?\nI got a teacher.", None, None),  # a supplement dialogue
]


def _direct(prepared):
    """(p3, unigram) of the train split, with dicts (naive_kn above), and the log-probs of a text computed from the
    tokenizer's ids and offsets: tokens ending after the prefix (+ </s> for the trigram), contexts <s> <s> first."""
    from dwml.data.shards import Shard

    shard = Shard(prepared, "train")
    docs = [[int(x) for x in shard.doc(i)] for i in range(len(shard)) if shard.doc(i).size]
    p3, _ = naive_kn(docs, shard.vocab_size)
    counts = Counter(t for d in docs for t in d)
    n = sum(counts.values())

    def score(tok, text, prefix):
        enc = tok(prefix + " " + text if prefix else text, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        scored = [i for i in range(1, len(ids) - 1) if offs[i][1] > (len(prefix) if prefix else 0)]
        ctx = lambda i: (ids[i - 2] if i >= 2 else BOS_ID, ids[i - 1])  # noqa: E731
        uni = math.fsum(math.log((counts[ids[i]] + 1) / (n + shard.vocab_size - N_SPECIAL)) for i in scored
                        if ids[i] != EOS_ID)  # a line end read as </s>: no unigram term (the same on both sides)
        return uni, math.fsum(math.log(p3(*ctx(i), ids[i])) for i in scored + [len(ids) - 1])

    return score


@pytest.mark.parametrize("line_ends", [False, True], ids=["prepared", "line-ends"])
def test_pair_scores_equal_a_direct_implementation_with_prefixes_and_ties(tiny_prepared, line_ends):
    from dwml.data.tokenizer import load_tokenizer
    from dwml.evaluation.evaldata import MinimalPair
    from dwml.evaluation.outcomes import summarize

    tokens, stream, vocab = ref.train_stream(tiny_prepared)
    tok = load_tokenizer(tiny_prepared / "tokenizer", line_ends=line_ends)  # the dialogue's line break: </s> or not
    assert tok(PAIRS[-1][0])["input_ids"].count(EOS_ID) == (2 if line_ends else 1)
    pairs = [MinimalPair(g, b, "grp", "f", good_prefix=gp, bad_prefix=bp) for g, b, gp, bp in PAIRS]
    scores = ref.score_reference(ref.Unigram(tokens, vocab), ref.KneserNeyTrigram(stream, vocab), tok, pairs)
    direct = _direct(tiny_prepared)
    for side in (0, 1):
        for i, p in enumerate(PAIRS):
            uni, tri = direct(tok, p[side], p[2 + side])
            assert math.isclose(scores["unigram"][side][i], uni, rel_tol=1e-9)
            assert math.isclose(scores["kn_trigram"][side][i], tri, rel_tol=1e-9)
    res = summarize(pairs, *scores["unigram"])
    assert res["ties"] >= 2 and res["accuracy"] - res["strict_accuracy"] == pytest.approx(100 * res["ties"] / 6)


def _eval_dir(root):
    """A tiny eval root: blimp_fast with 2 paradigms and an unpacked ewok_fast."""
    import json

    (root / "blimp_fast").mkdir(parents=True)
    rows = [("the dog saw the cat.", "the cat saw the dog."), ("These books are old.", "These books is old."),
            ("She has eaten.", "She has ate."), ("Many people left.", "People many left.")]
    for k, uid in enumerate(("p_one", "p_two")):
        (root / "blimp_fast" / f"{uid}.jsonl").write_text("".join(json.dumps(
            {"sentence_good": g, "sentence_bad": b, "UID": uid, "field": "syntax"}) + "\n" for g, b in rows[k:k + 2]))
    (root / "ewok_fast").mkdir()
    (root / "ewok_fast" / "physical.jsonl").write_text("".join(json.dumps(
        {"Context1": c, "Context2": "x", "Target1": t1, "Target2": t2, "Domain": "physical"}) + "\n"
        for c, t1, t2 in [("A cup fell.", "It broke.", "It sang."), ("Ana is tall.", "She is tall.", "He is.")]))
    return root


@pytest.fixture
def own_prepared(tiny_prepared, tmp_path):
    """A private copy of the tiny prepared data: the cache is written inside it."""
    import shutil

    shutil.copytree(tiny_prepared, tmp_path / "prepared", ignore=shutil.ignore_patterns("reference"))  # no cache
    return tmp_path / "prepared"


def test_cache_is_invalidated_when_an_eval_file_changes(own_prepared, tmp_path, monkeypatch):
    import json

    data = _eval_dir(tmp_path / "eval")
    first = ref.reference_results(own_prepared, "blimp_fast,ewok_fast,wug_adj", data_dir=data)
    assert set(first["models"]["kn_trigram"]["tasks"]) == {"blimp_fast", "ewok_fast"}  # wug is not pairs
    r = first["models"]["unigram"]["tasks"]["blimp_fast"]
    assert set(r["groups"]) == {"p_one", "p_two"} and r["ties"] >= 1 and "items" not in r
    assert r["interval"]["low"] <= r["macro_accuracy"] <= r["interval"]["high"]
    assert ref.reference_results(own_prepared, "wug_adj", data_dir=data) is None
    monkeypatch.setattr(ref, "train_stream", lambda *a, **k: pytest.fail("counted again"))
    assert ref.reference_results(own_prepared, "blimp_fast", data_dir=data)["cached"] == ["blimp_fast"]
    path = data / "blimp_fast" / "p_two.jsonl"
    path.write_text(path.read_text() + json.dumps({"sentence_good": "A cat sat.", "sentence_bad": "A sat cat.",
                                                   "UID": "p_two"}) + "\n")
    with pytest.raises(BaseException, match="counted again"):
        ref.reference_results(own_prepared, "blimp_fast", data_dir=data)
    monkeypatch.undo()
    third = ref.reference_results(own_prepared, "blimp_fast", data_dir=data)
    assert third["cached"] == [] and third["models"]["unigram"]["tasks"]["blimp_fast"]["n"] == r["n"] + 1
    assert len(list((own_prepared / "reference").glob("blimp_fast-*.json"))) == 2


def test_a_runs_own_data_gives_the_lines_in_eval_demo_and_report(own_prepared, tmp_path, capsys):
    import json

    from evalfixtures import make_model

    from dwml.checks import tokenizer_fingerprint
    from dwml.cli import main
    from dwml.data.tokenizer import load_tokenizer
    from dwml.errors import DwmlError
    from dwml.evaluation.evaluate import evaluate_path, format_report
    from dwml.experiments.demo import results_table
    from dwml.experiments.report import main_table, reference_text

    data = _eval_dir(tmp_path / "eval")
    tok = load_tokenizer(own_prepared / "tokenizer")
    final = tmp_path / "run" / "final"
    make_model(tok).save_pretrained(final / "peer0")
    tok.save_pretrained(final / "peer0")
    (final / "summary.json").write_text(json.dumps({"method": "mlm", "omega": [1.0],
                                                    "tokenizer": str(own_prepared / "tokenizer"),
                                                    "tokenizer_sha256": tokenizer_fingerprint(own_prepared / "tokenizer")}))
    res = evaluate_path(tmp_path / "run", "blimp_fast,ewok_fast", device="cpu", data_dir=data)
    assert res["reference"]["prepared"] == str(own_prepared)  # found through the run's summary
    line = next(x for x in format_report(res, groups=False).splitlines() if x.startswith("KN trigram"))
    assert f"{res['reference']['models']['kn_trigram']['summary']['blimp_fast']:.2f}" in line
    assert "reference" not in evaluate_path(tmp_path / "run", "blimp_fast", device="cpu", data_dir=data,
                                            reference=False)
    args = ["eval", str(final / "peer0"), "--tasks", "blimp_fast", "--device", "cpu", "--data-dir", str(data),
            "--no-groups"]
    assert main(args) == 0 and "KN trigram" not in capsys.readouterr().out  # a plain folder: no known data
    assert main(args + ["--reference-data", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(DwmlError):
        ref.reference_results(tmp_path, "blimp_fast", data_dir=data)

    peer = {"name": "peer0", "params": 1, "valid_loss": 1.0, "plateau_exit_step": None}
    run = {"peers": [peer], "omega": [1.0], "initial_valid_loss": [2.0], "valid_ensemble_loss": 1.0}
    table = results_table(run, run, {"mlm": res})
    assert "unigram (train counts)" in table and "KN trigram" in table
    results = {"eval": {"tasks": ["blimp_fast", "ewok_fast"]}, "runs": [], "reference": res["reference"]}
    row = next(x for x in main_table(results).splitlines() if "KN trigram" in x)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["reference", "no learning", "KN trigram"] and len(cells) == 5 + 2 + 3 + 2
    assert cells[5] == f"{res['reference']['models']['kn_trigram']['summary']['blimp_fast']:.1f}"
    assert "BLiMP (fast) [" in reference_text(results)
