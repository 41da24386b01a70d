"""Entity tracking, WUG and reading (`dwml.evaluation.babylm_tasks`) against a direct transcription of
babylm/evaluation-pipeline-2025's formulas (mlm backend): plain loops, one masked copy at a time through the full model,
on slices of the real shared files; then the task registry, the report columns and bad input."""
from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.linear_model import LinearRegression

from dwml.cli import main
from dwml.errors import DwmlError
from dwml.evaluation import babylm_tasks
from dwml.evaluation.babylm_data import load_babylm_task, metric_of, score_columns
from dwml.evaluation.evaldata import parse_tasks
from dwml.evaluation.evaluate import evaluate_path, format_report
from dwml.models.model import Arch, build_model
from evalfixtures import EVAL_DATA, make_tokenizer

pytestmark = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"shared eval data not found at {EVAL_DATA}")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # Entity-tracking prompts are ~300-550 tokens under the fixture's 600-token vocabulary.
    arch = Arch(layers=2, heads=2, hidden=32, intermediate=128, vocab_size=len(tok), max_positions=600)
    return build_model(arch, seed=0).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data root with slices of the real files: entity tracking (2 items of numops 0 and 1 from each file), WUG (8 +
    4 items), reading (the first 80 words, the word whose context was written out as an empty cell and two words
    without a frequency)."""
    root = tmp_path_factory.mktemp("babylm")
    (root / "entity_tracking").mkdir()
    for path in sorted((EVAL_DATA / "entity_tracking").glob("*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        keep = [line for ops in (0, 1) for line in [x for x in lines if json.loads(x)["numops"] == ops][:2]]
        (root / "entity_tracking" / path.name).write_text("\n".join(keep) + "\n", encoding="utf-8")
    for folder, n in (("wug_adj_nominalization", 8), ("wug_past_tense", 4)):
        (root / folder).mkdir()
        src = EVAL_DATA / folder / f"{folder}.jsonl"
        lines = src.read_text(encoding="utf-8").splitlines()[:n]
        (root / folder / src.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "reading").mkdir()
    with (EVAL_DATA / "reading" / "reading_data.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    item, freq = rows[0].index("item"), rows[0].index("Subtlex_log10")
    keep = rows[:81] + [r for r in rows[81:] if r[item] == ""] + [r for r in rows[81:] if r[freq] == ""][:2]
    with (root / "reading" / "reading_data.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(keep)
    return root


# ------------------------------------------------------------------ the pipeline's formulas, one sentence at a time


def pipeline_mlm_score(model, tok, sentence: str, completion: str) -> float:
    """compute_mlm_results: mask each token ending after the completion's first character, sum the log-probs.
    Summed in float64: the pipeline's float32 `torch.sum` is off from any other order by ~1e-5 nats on a 30-token
    sentence (rounding, not the formula), which a WUG softmax of two candidates 6 nats apart turns into 1e-5 of p."""
    enc = tok(sentence, return_offsets_mapping=True)
    ids, start_char = enc["input_ids"], len(sentence) - len(completion)
    terms = []
    for i, (_, end) in enumerate(enc["offset_mapping"]):
        if end > start_char:
            masked = torch.tensor(ids)
            masked[i] = tok.mask_token_id
            with torch.no_grad():
                logits = model(input_ids=masked[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            terms.append(torch.log_softmax(logits[0, i], dim=-1)[ids[i]])
    return math.fsum(float(t) for t in terms)


def pipeline_p_mlm(model, tok, sentence: str, word: str) -> float:
    """get_p_mlm: P(first token of `word`) at the first of 3 masks appended to `sentence`."""
    inputs = tok(sentence + tok.mask_token * 3, return_tensors="pt")
    at = -3 if inputs.input_ids[0, -1] == tok.mask_token_id else -4
    with torch.no_grad():
        logits = model(**inputs).logits[:, at, :]
    return torch.softmax(logits[0], dim=-1)[tok(word, add_special_tokens=False)["input_ids"][0]].item()


def pipeline_p2_mlm(model, tok, sentence: str, word: str) -> float:
    """get_p2_mlm: a word of several tokens multiplies its pieces' probabilities, decoding each into the context."""
    target = tok(word, add_special_tokens=False)["input_ids"]
    out = [pipeline_p_mlm(model, tok, sentence, word)]
    sentence = sentence + tok.decode(target[0])
    for token in target[1:]:
        t = tok.decode(token)
        out.append(pipeline_p_mlm(model, tok, sentence, t))
        sentence = sentence + t
    return float(np.prod(out))


def ols_rsquared(y, columns, plus=()) -> float:
    """statsmodels' `a + b + a:b (+ pred)` formula: intercept, main effects, pairwise products (and `plus` alone);
    R^2 by scikit-learn."""
    x = np.column_stack(columns + [a * b for a, b in itertools.combinations(columns, 2)] + list(plus))
    return LinearRegression().fit(x, y).score(x, y)


# ------------------------------------------------------------------ the tasks against them


def test_entity_tracking_matches_the_pipeline(tok, model, data, monkeypatch):
    items = load_babylm_task("entity_tracking", data)
    assert len(items) == 12 and {it.group for it in items} == {f"{f}_{k}_ops" for f in
                                                               ("ambiref", "move_contents", "regular") for k in (0, 1)}
    seen = []
    real = babylm_tasks.score_sentences
    monkeypatch.setattr(babylm_tasks, "score_sentences", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    res = babylm_tasks.entity_tracking(model, tok, items)
    ref_scores, correct, by_uid = [], [], {}
    for it in items:
        scores = [pipeline_mlm_score(model, tok, it.prefix + o, o) for o in it.options]
        ref_scores += scores
        right = torch.max(torch.tensor(scores), dim=0)[1].item() == 0  # rank_and_evaluate
        correct.append(right)
        by_uid.setdefault(f"{it.file}_{it.numops}_ops", []).append(right)
    np.testing.assert_allclose(seen[0], ref_scores, rtol=1e-5)
    acc = {uid: 100.0 * sum(v) / len(v) for uid, v in by_uid.items()}
    splits = [sum(a for k, a in acc.items() if k.startswith(s)) / 2 for s in ("regular", "ambiref", "move_contents")]
    assert res["items"]["correct"] == "".join("1" if c else "0" for c in correct)
    assert res["macro_accuracy"] == pytest.approx(sum(splits) / len(splits), abs=1e-9)
    assert {g: r["accuracy"] for g, r in res["groups"].items()} == pytest.approx(acc)
    assert res["ties"] == 0 and res["strict_macro_accuracy"] == res["macro_accuracy"]


@pytest.mark.parametrize("task,n", [("wug_adj", 8), ("wug_past", 4)])
def test_wug_matches_the_pipeline(tok, model, data, task, n):
    items = load_babylm_task(task, data)
    assert len(items) == n
    res = babylm_tasks.wug(model, tok, items, task=task)
    probs = []
    for it in items:
        scores = torch.tensor([pipeline_mlm_score(model, tok, s, s) for s in it.candidates])  # completion = sentence
        probs.append(torch.softmax(scores, dim=0)[0].item())  # rank_and_evaluate_wug
    human = [it.ratio for it in items]
    rho = np.corrcoef(rankdata(probs), rankdata(human))[0, 1]  # Spearman = Pearson of the ranks
    np.testing.assert_allclose(res["model_prob"], probs, rtol=1e-5)
    assert res["rho"] == pytest.approx(rho, abs=1e-6) and res["score"] == pytest.approx(100 * rho, abs=1e-4)


def test_reading_matches_the_pipeline(tok, model, data):
    words = load_babylm_task("reading", data)
    assert len(words) == 83 and words[80].context == "None"  # pandas reads the empty cell as NaN, fillna("None")
    assert math.isnan(words[-1].values["Subtlex_log10"])  # such rows drop out of the regressions
    res = babylm_tasks.reading(model, tok, words)
    with (data / "reading" / "reading_data.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    num = lambda r, k: float(r[k]) if r[k] != "" else math.nan  # noqa: E731
    pred = [-math.log(pipeline_p2_mlm(model, tok, r["item"] or "None", r["word"])) for r in rows]
    prev = [-math.log(pipeline_p2_mlm(model, tok, r["prev_item"], r["prev_word"])) if r["prev_item"] else math.nan
            for r in rows]
    np.testing.assert_allclose(res["surprisal"], pred, rtol=1e-5)
    np.testing.assert_allclose([math.nan if v is None else v for v in res["prev_surprisal"]], prev, rtol=1e-5)
    col = {k: np.array([num(r, k) for r in rows]) for k in rows[0] if k in (
        "Subtlex_log10", "length", "context_length", "prev_length", "RTfirstfix", "RTfirstpass", "RTgopast",
        "RTrightbound", "self_paced_reading_time")}
    col["pred"], col["prev_pred"] = np.array(pred), np.array(prev)

    def gain(dv, base):
        keep = np.isfinite(np.column_stack([col[c] for c in [dv, *base, "pred"]])).all(axis=1)
        r2_base = ols_rsquared(col[dv][keep], [col[c][keep] for c in base])
        r2_model = ols_rsquared(col[dv][keep], [col[c][keep] for c in base], plus=[col["pred"][keep]])
        return ((r2_model - r2_base) / (1 - r2_base)) * 100

    eye = [gain(dv, ["Subtlex_log10", "length", "context_length"])
           for dv in ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")]
    spr = gain("self_paced_reading_time", ["Subtlex_log10", "length", "context_length", "prev_length", "prev_pred"])
    assert res["scores"]["reading_eye_tracking"] == pytest.approx(sum(eye) / 4, abs=1e-6)
    assert res["scores"]["reading_self_paced"] == pytest.approx(spr, abs=1e-6)


# ------------------------------------------------------------------ registry, summary columns, report


def test_tasks_flow_into_summary_and_report(tok, model, data, tmp_path):
    assert parse_tasks("entity_tracking,wug_adj_nominalization,wug_past,reading") == [
        "entity_tracking", "wug_adj", "wug_past", "reading"]
    assert score_columns(["blimp_fast", "reading", "wug_adj"]) == [
        "blimp_fast", "reading_eye_tracking", "reading_self_paced", "wug_adj"]
    assert [metric_of(c) for c in ("entity_tracking", "wug_past", "reading_self_paced")] == [
        "accuracy", "spearman_rho", "r2_gain"]
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    res = evaluate_path(folder, "entity_tracking,wug_past,reading", data_dir=data, device="cpu", limit=2)
    model_res = res["models"]["m"]
    n = {t: r["n"] for t, r in model_res["tasks"].items()}
    assert n == {"entity_tracking": 6, "wug_past": 2, "reading": 83}  # reading ignores --limit
    assert list(model_res["summary"]) == ["entity_tracking", "wug_past", "reading_eye_tracking", "reading_self_paced"]
    assert list(model_res["strict_summary"]) == list(model_res["ties"]) == ["entity_tracking"]
    assert model_res["summary"]["wug_past"] == model_res["tasks"]["wug_past"]["score"]
    assert res["metrics"] == {"entity_tracking": "accuracy", "wug_past": "spearman_rho",
                              "reading_eye_tracking": "r2_gain", "reading_self_paced": "r2_gain"}
    json.dumps(res, allow_nan=False)
    report = format_report(res)
    assert "== reading" in report and "not in the means" in report and "[regular]" in report
    # Tables: every column shown, the zero-shot mean over accuracies only.
    from dwml.experiments.analysis import model_rows

    row = model_rows({"peers": [{"params": 1, "valid_loss": 1.0}], "omega": [1.0]},
                     {"models": {"peer0": model_res}}, None)[0]
    assert row["zero_shot"] == model_res["summary"]
    assert row["zero_shot_mean"] == pytest.approx(model_res["summary"]["entity_tracking"])


def test_a_prompt_longer_than_the_model_is_refused_naming_the_task(tok, data):
    short = build_model(Arch(layers=1, heads=2, hidden=16, intermediate=32, vocab_size=len(tok)), seed=0)  # 128 tokens
    with pytest.raises(DwmlError, match=r"^entity_tracking: text of \d+ tokens exceeds the model's 128"):
        babylm_tasks.evaluate_babylm_task(short, tok, "entity_tracking", load_babylm_task("entity_tracking", data, 1))


# ------------------------------------------------------------------ bad input


def _edit(root, rel: str, change) -> None:
    path = root / rel
    path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")


def _drop_options(text: str) -> str:
    lines = text.splitlines()
    row = json.loads(lines[1])
    del row["options"]
    return "\n".join([lines[0], json.dumps(row)] + lines[2:]) + "\n"


BAD = [  # (task, file to mangle, change, what the message must name)
    ("entity_tracking", "entity_tracking/regular.jsonl", _drop_options, "regular.jsonl:2: field 'options'"),
    ("entity_tracking", "entity_tracking/ambiref.jsonl", lambda t: t.replace("}", "", 1),
     "ambiref.jsonl:1: invalid JSON"),
    ("wug_adj", "wug_adj_nominalization/wug_adj_nominalization.jsonl",
     lambda t: json.dumps({"sentences": "a\tb", "ratio": "lots"}) + "\n" + t,
     "wug_adj_nominalization.jsonl:1: field 'ratio'"),
    ("wug_past", "wug_past_tense/wug_past_tense.jsonl", lambda t: '{"sentences": "only one", "ratio": 0.5}\n',
     "wug_past_tense.jsonl:1: field 'sentences'"),
    ("reading", "reading/reading_data.csv", lambda t: t.replace(",word,", ",wort,", 1),
     "reading_data.csv: missing column(s) ['word']"),
    ("reading", "reading/reading_data.csv", lambda t: t.replace(",14.222246857765809,", ",fourteen,", 1),
     "reading_data.csv:2: field 'Subtlex_log10': expected a number, got 'fourteen'"),
]


@pytest.mark.parametrize("task,rel,change,needle", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_a_mangled_file_is_a_one_line_error(tok, data, tmp_path, capsys, task, rel, change, needle):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    _edit(root, rel, change)
    argv = ["eval", str(tmp_path / "no-model-needed"), "--tasks", task, "--data-dir", str(root), "--device", "cpu"]
    assert main(argv) == 2  # the data is read (and refused) before any model is loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dwml: error: ") and needle in err[0], err
    with pytest.raises(DwmlError, match="no data folder found"):
        load_babylm_task(task, tmp_path / "empty")
