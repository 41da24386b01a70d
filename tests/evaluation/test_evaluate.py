"""`dwml eval`: scoring rules (BabyLM form: a tie counts correct; ties and the strict accuracy reported beside it),
BabyLM-style aggregation, EWoK pairings, model folders vs DWML runs (peers + omega-weighted ensemble), JSON output and
the CLI."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from transformers.modeling_outputs import MaskedLMOutput

from dwml.errors import DwmlError
from dwml.evaluation import evaluate as evaluate_mod
from dwml.evaluation.evaldata import MinimalPair, load_task
from dwml.evaluation.evaluate import evaluate_model, evaluate_path, find_models, format_report, register, score_pairs
from dwml.evaluation.outcomes import summarize
from evalfixtures import EVAL_DATA, make_model, make_tokenizer, save_run

pytestmark = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"shared eval data not found at {EVAL_DATA}")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


class UniformLM(torch.nn.Module):
    """Ignores its input: every token has probability 1/V, so a text scores -(number of scored tokens) * log V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return MaskedLMOutput(logits=torch.zeros(*input_ids.shape, self.vocab))


# ------------------------------------------------------------------------------------------- scoring rules


def test_ties_count_correct_and_are_reported(tok):
    """A degenerate model: good wins only with fewer tokens; equal lengths tie. BabyLM's argmax credits ties (the good
    sentence comes first); the strict accuracy does not."""
    pairs = load_task("blimp_fast", EVAL_DATA, limit=3)
    n_tok = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    wins = sum(n_tok(p.good) < n_tok(p.bad) for p in pairs)
    ties = sum(n_tok(p.good) == n_tok(p.bad) for p in pairs)
    assert ties > 50  # many BLiMP pairs are re-orderings of the same words
    good, bad = score_pairs(UniformLM(len(tok)), tok, pairs)
    assert good[0] == pytest.approx(-n_tok(pairs[0].good) * math.log(len(tok)))
    res = summarize(pairs, good, bad)
    assert (res["n"], res["correct"], res["ties"], res["strict_correct"]) == (len(pairs), wins + ties, ties, wins)
    assert res["accuracy"] == pytest.approx(100 * (wins + ties) / len(pairs))
    assert res["strict_accuracy"] == pytest.approx(100 * wins / len(pairs))


def test_identical_sentences_tie_correct_in_babylm_form_wrong_in_strict(tok):
    model = make_model(tok, seed=0)
    pairs = [MinimalPair("the dog saw a cat.", "the dog saw a cat.", "g", "f"),
             MinimalPair("you want to go?", "you want to go?", "g", "f")]
    for method in ("pll", "pll_word_l2r"):
        good, bad = score_pairs(model, tok, pairs, method=method)
        res = summarize(pairs, good, bad)
        assert (res["correct"], res["ties"], res["accuracy"]) == (2, 2, 100.0)
        assert (res["strict_correct"], res["strict_accuracy"], res["strict_macro_accuracy"]) == (0, 0.0, 0.0)


def test_ewok_pairings(tok):
    """targets (BabyLM): Target1 vs Target2 after Context1 - an input-blind model prefers the shorter target and ties
    on equal lengths. contexts: the same target after each context - the input-blind model ties on every item."""
    uniform = UniformLM(len(tok))
    n_tok = lambda s: len(tok(" " + s, add_special_tokens=False).input_ids)  # noqa: E731
    pairs = load_task("ewok_fast", EVAL_DATA, limit=2)
    assert all(p.good_prefix == p.bad_prefix and p.good != p.bad for p in pairs)
    res = evaluate_model(uniform, tok, ["ewok_fast"], task_pairs={"ewok_fast": pairs})["ewok_fast"]
    ties = sum(n_tok(p.good) == n_tok(p.bad) for p in pairs)
    wins = sum(n_tok(p.good) < n_tok(p.bad) for p in pairs)
    assert 0 < ties < len(pairs) and (res["ties"], res["correct"], res["strict_correct"]) == (ties, wins + ties, wins)
    good, bad = score_pairs(uniform, tok, pairs)
    assert good[0] == pytest.approx(-n_tok(pairs[0].good) * math.log(len(tok)))  # only the target's tokens count

    ctx = load_task("ewok_fast", EVAL_DATA, limit=2, ewok_pairing="contexts")
    res = evaluate_model(uniform, tok, ["ewok_fast"], task_pairs={"ewok_fast": ctx})["ewok_fast"]
    assert (res["ties"], res["correct"], res["strict_macro_accuracy"], res["macro_accuracy"]) == (22, 22, 0.0, 100.0)
    good, bad = score_pairs(make_model(tok, seed=1), tok, ctx)  # a real model: context changes the target's score
    assert all(g != b for g, b in zip(good, bad))


def test_summarize_macro_micro_fields():
    pairs = [MinimalPair("a", "b", "p1", "syntax")] * 3 + [MinimalPair("a", "b", "p2", "morphology")]
    res = summarize(pairs, good=[1.0, 0.0, 2.0, 5.0], bad=[0.0, 0.0, 3.0, 1.0])
    assert res["groups"]["p1"] == {"n": 3, "correct": 2, "ties": 1, "accuracy": pytest.approx(200 / 3),
                                   "strict_correct": 1, "strict_accuracy": pytest.approx(100 / 3)}
    assert res["groups"]["p2"]["accuracy"] == 100.0
    assert res["macro_accuracy"] == pytest.approx((200 / 3 + 100) / 2)  # BabyLM: mean over paradigms
    assert res["strict_macro_accuracy"] == pytest.approx((100 / 3 + 100) / 2)
    assert res["accuracy"] == 75.0 and res["strict_accuracy"] == 50.0 and res["ties"] == 1  # micro
    assert res["fields"]["syntax"]["correct"] == 2 and res["fields"]["morphology"]["correct"] == 1


# ------------------------------------------------------------------------------------------- model folder and run


def test_evaluate_model_folder(tmp_path, tok):
    folder = tmp_path / "mymodel"
    make_model(tok, seed=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    res = evaluate_path(folder, "blimp_fast,supplement_fast,ewok_fast", limit=2, device="cpu", data_dir=EVAL_DATA,
                        out_file=tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {"dwml_result": "eval", **json.loads(json.dumps(res))}
    assert res["kind"] == "model" and list(res["models"]) == ["mymodel"]
    tasks = res["models"]["mymodel"]["tasks"]
    assert (tasks["blimp_fast"]["n"], len(tasks["blimp_fast"]["groups"]), len(tasks["blimp_fast"]["fields"])) == (
        134, 67, 4)
    assert (tasks["supplement_fast"]["n"], len(tasks["supplement_fast"]["groups"])) == (10, 5)
    assert (tasks["ewok_fast"]["n"], len(tasks["ewok_fast"]["groups"])) == (22, 11)
    for t in tasks.values():
        assert 0 <= t["strict_macro_accuracy"] <= t["macro_accuracy"] <= 100 and t["ties"] <= t["correct"] <= t["n"]
    assert (res["precision"], res["ewok_pairing"], res["ties_count_as"]) == ("fp32", "targets", "correct")
    model = res["models"]["mymodel"]
    assert model["strict_summary"]["blimp_fast"] == tasks["blimp_fast"]["strict_macro_accuracy"]
    assert model["ties"] == {t: r["ties"] for t, r in tasks.items()}
    json.dumps(res, allow_nan=False)  # plain JSON
    report = format_report(res)
    assert "== ewok_fast" in report and "MACRO strict" in report and "spatial-relations" in report
    assert "strict mean" in report and "ewok_pairing=targets" in report


def test_run_with_ensemble(tmp_path, tok):
    run = save_run(tmp_path / "run", tok, seeds=[3, 4], omega=[1.0, 0.0])
    res = evaluate_path(run, ["supplement_fast", "ewok_fast"], limit=3, device="cpu", data_dir=EVAL_DATA,
                        method="pll_word_l2r")
    assert res["kind"] == "run" and res["omega"] == [1.0, 0.0]
    assert list(res["models"]) == ["peer0", "peer1", "ensemble"]
    peer0, ens = res["models"]["peer0"]["tasks"], res["models"]["ensemble"]["tasks"]
    for task in ("supplement_fast", "ewok_fast"):  # one-hot omega: the ensemble is peer0
        assert ens[task]["groups"] == peer0[task]["groups"]
    assert find_models(run / "final")[1] == [1.0, 0.0]  # RUN/final/ works as well
    assert list(evaluate_path(run, "supplement_fast", limit=1, ensemble=False, data_dir=EVAL_DATA)["models"]) == [
        "peer0", "peer1"]


def test_models_selects_peers_of_a_run(tmp_path, tok):
    """`models` scores only the named peers, with the same scores as a full evaluation; the ensemble needs them all."""
    run = save_run(tmp_path / "run", tok, seeds=[3, 4], omega=[0.5, 0.5])
    full = evaluate_path(run, "supplement_fast", limit=2, device="cpu", data_dir=EVAL_DATA)
    one = evaluate_path(run, "supplement_fast", limit=2, device="cpu", data_dir=EVAL_DATA, models=["peer1"])
    assert list(one["models"]) == ["peer1"]
    for res in (one, full):
        res["models"]["peer1"]["tasks"]["supplement_fast"].pop("seconds")
    assert one["models"]["peer1"]["tasks"] == full["models"]["peer1"]["tasks"]
    both = evaluate_path(run, "supplement_fast", limit=1, device="cpu", data_dir=EVAL_DATA, models=["peer1", "peer0"])
    assert list(both["models"]) == ["peer0", "peer1", "ensemble"]
    for bad in (["peer2"], [], ["peer0", "peer0"]):
        with pytest.raises(DwmlError, match="--models"):
            evaluate_path(run, "supplement_fast", limit=1, device="cpu", data_dir=EVAL_DATA, models=bad)


def test_texts_are_tokenised_once_for_all_models_of_a_run(tmp_path, tok, monkeypatch):
    """Peers and ensemble of one evaluation share the masked copies: one tokenisation per task, not per model."""
    import dwml.evaluation.scoring as scoring

    calls = []
    encode = scoring._encode
    monkeypatch.setattr(scoring, "_encode", lambda t, texts: calls.append(len(texts)) or encode(t, texts))
    scoring.clear_copy_cache()
    run = save_run(tmp_path / "run", tok, seeds=[3, 4], omega=[0.5, 0.5])
    res = evaluate_path(run, "supplement_fast,ewok_fast", limit=2, device="cpu", data_dir=EVAL_DATA)
    assert len(res["models"]) == 3 and len(calls) == 2  # 3 models x 2 tasks, two tokenisations


def test_ensemble_needs_one_vocabulary(tmp_path, tok):
    run = save_run(tmp_path / "run", tok, seeds=[5, 6], omega=[0.5, 0.5])
    other = make_tokenizer(vocab_size=500)
    make_model(other, seed=7).save_pretrained(run / "final" / "peer1")
    other.save_pretrained(run / "final" / "peer1")
    with pytest.raises(DwmlError, match="peer1's tokenizer differs"):
        evaluate_path(run, "supplement_fast", limit=1, data_dir=EVAL_DATA)


def test_path_errors(tmp_path, tok):
    with pytest.raises(DwmlError, match="no such"):
        find_models(tmp_path / "missing")
    with pytest.raises(DwmlError, match="expected a DWML run"):
        find_models(tmp_path)
    run = save_run(tmp_path / "run", tok, seeds=[1], omega=[0.3, 0.7])
    with pytest.raises(DwmlError, match="missing peer folder"):
        find_models(run)
    (run / "final" / "summary.json").write_text(json.dumps({"omega": "x"}))
    with pytest.raises(DwmlError, match="omega"):
        find_models(run)
    with pytest.raises(DwmlError, match="method"):
        evaluate_path(run, "blimp_fast", method="ppl")


def test_bf16_scoring_on_a_cpu_without_bf16_kernels_is_refused(tmp_path, tok, monkeypatch):
    """bf16 scoring where the CPU has no bf16 matmul would be slower than fp32 by orders of magnitude: refused
    before any model is scored, naming the flag."""
    monkeypatch.setattr(evaluate_mod, "cpu_has_bf16_kernels", lambda: False)
    folder = tmp_path / "m"
    make_model(tok, seed=8).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(DwmlError, match="--precision bf16: this CPU has no bf16 matmul kernels"):
        evaluate_path(folder, "blimp_fast", device="cpu", precision="bf16", data_dir=EVAL_DATA)


def test_cli_prints_table_and_writes_json(tmp_path, tok, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_mod, "cpu_has_bf16_kernels", lambda: True)  # bf16 scoring, on any CPU
    folder = tmp_path / "m"
    make_model(tok, seed=8).save_pretrained(folder)
    tok.save_pretrained(folder)
    parser = argparse.ArgumentParser(prog="dwml")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "res" / "eval.json"
    args = parser.parse_args(["eval", str(folder), "--tasks", "supplement_fast,ewok_fast", "--limit", "2",
                              "--out", str(out), "--data-dir", str(EVAL_DATA), "--token-budget", "256", "--device",
                              "cpu", "--precision", "bf16", "--ewok-pairing", "contexts"])
    assert args.func(args) == 0
    saved = json.loads(out.read_text())
    assert saved["models"]["m"]["tasks"]["supplement_fast"]["n"] == 10 and saved["token_budget"] == 256
    assert (saved["precision"], saved["ewok_pairing"]) == ("bf16", "contexts")
    printed = capsys.readouterr().out
    assert "supplement_fast" in printed and "turn_taking" in printed
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # atomic write leaves no temp files


def test_item_record_round_trips_outcomes_in_pair_order():
    from dwml.evaluation.evaldata import MinimalPair
    from dwml.evaluation.outcomes import item_outcomes, summarize

    pairs = [MinimalPair(good=f"g{i}", bad=f"b{i}", group="ab"[i % 2], field="f") for i in range(5)]
    good, bad = [1.0, 0.0, 2.0, 1.0, -1.0], [0.0, 0.0, 3.0, 0.5, -2.0]
    res = summarize(pairs, good, bad)
    correct, tie, group, names = item_outcomes(res)
    assert correct.tolist() == [True, True, False, True, True]  # BabyLM form: the tie counts correct
    assert tie.tolist() == [False, True, False, False, False]
    assert [names[g] for g in group] == ["a", "b", "a", "b", "a"]
    assert int(correct.sum()) == res["correct"] and int((correct & ~tie).sum()) == res["strict_correct"]
    # A record written when `correct` was strict reads back in the BabyLM form as well.
    old = {"items": {**res["items"], "correct": "10011"}}
    del old["items"]["ties_correct"]
    assert item_outcomes(old)[0].tolist() == correct.tolist()
