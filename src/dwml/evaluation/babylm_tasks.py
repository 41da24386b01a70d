"""Scoring the rest of BabyLM 2025's zero-shot suite the way babylm/evaluation-pipeline-2025's `mlm` backend does
(read at bf55c11; items from `dwml.evaluation.babylm_data`).

- Entity tracking (`sentence_zero_shot`): every option is scored given its prefix: the sum of the log-probs of the
  tokens overlapping the option's characters, each masked in its own copy with the prefix and the special tokens
  visible (`dwml.evaluation.scoring.score_sentences`, prefix joined without separator). An item is right when option
  0 has the highest score, the first maximum winning a tie (torch.max); scores are compared in float32, as the
  pipeline's tensors hold them. Accuracy (%) per group `<file>_<numops>_ops`, the mean over a file's groups is the
  file's number, the task's number is the mean over files (`macro_accuracy`). Ties and the strict accuracy (a tie
  counts wrong) are reported beside it, as for BLiMP.
- WUG (`sentence_zero_shot`, `rank_and_evaluate_wug`): every candidate sentence is scored whole (PLL); the model's
  number for an item is the softmax over its candidates' scores (float32) at candidate 0; the task's number is
  Spearman's rho between those and the human ratios over all items of the task, reported as `score` = 100 rho
  (BabyLM's results tables) beside `rho`. The pipeline's leaderboard pools wug_adj and wug_past into one rho; dwml
  keeps them apart (as its `run.py` reports them).
- Reading (`reading/run.py`, `get_p2_mlm` with 3 masks): P(word | context) is read at the first of three mask tokens
  appended to the context (`tokenizer(context + "<mask>" * 3)`, specials added); a word of several tokens multiplies
  the probabilities of its pieces, each piece's text decoded and appended to the context before the next one is
  predicted (`tokenizer(decoded piece)[0]` is the target); surprisal = -ln P. Then OLS (intercept, main effects and
  all pairwise products, `statsmodels` formulas there, `numpy.linalg.lstsq` here):
  eye tracking, for each of RTfirstfix, RTfirstpass, RTgopast, RTrightbound: baseline = Subtlex_log10, length,
  context_length; model = baseline + surprisal; gain = 100 (R2_model - R2_base) / (1 - R2_base); the column
  `reading_eye_tracking` is the mean of the four gains. Self-paced reading (`reading_self_paced`): the same gain for
  self_paced_reading_time with the spillover baseline Subtlex_log10, length, context_length, prev_length,
  prev_surprisal (and their pairwise products). Each fit uses the rows where its variables are all present.
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from ..checks import check_finite_scores
from ..errors import DwmlError
from .babylm_data import EYE_TRACKING, REGRESSORS, SELF_PACED, EntityItem, ReadingWord, WugItem
from .evaldata import TASK_ALIASES, TASKS
from .scoring import DEFAULT_TOKEN_BUDGET, _precision, check_precision, masked_log_probs, score_sentences

N_MASKS = 3  # the pipeline's --number_of_mask_tokens_to_append


def evaluate_babylm_task(model, tokenizer, task: str, items: Sequence, *, method: str = "pll",
                         token_budget: int | None = None, device=None, precision: str = "fp32") -> dict:
    """The result dict of one task (see the module docstring), with `metric` and `seconds`."""
    kind = TASKS[TASK_ALIASES.get(task, task)].kind
    start = time.perf_counter()
    kw = {"token_budget": token_budget, "device": device, "precision": precision}
    try:
        if kind == "entity_tracking":
            out = entity_tracking(model, tokenizer, items, method=method, **kw)
        elif kind == "wug":
            out = wug(model, tokenizer, items, method=method, task=task, **kw)
        else:
            out = reading(model, tokenizer, items, **kw)
    except DwmlError as e:  # e.g. a 400-token entity-tracking prompt for a model of 128 positions: name the task
        raise DwmlError(str(e) if str(e).startswith(task) else f"{task}: {e}") from None
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def describe(task: str, result: dict) -> str:
    """One log line's worth of a result."""
    if result["metric"] == "spearman_rho":
        rho = result["rho"]
        return f"rho {'n/a' if rho is None else f'{rho:.4f}'} over {result['n']} items"
    if result["metric"] == "r2_gain":
        s = result["scores"]
        return (f"R^2 gain {_num(s['reading_eye_tracking'])}% eye tracking, {_num(s['reading_self_paced'])}% "
                f"self-paced reading, {result['n']} words")
    return (f"{result['macro_accuracy']:.2f}% macro over files ({result['strict_macro_accuracy']:.2f}% with ties "
            f"wrong), {result['ties']} ties, {result['n']} items")


def detail_rows(result: dict) -> list[tuple[str, str]]:
    """(label, formatted number) rows of a WUG or reading result for the text report."""
    if result["metric"] == "spearman_rho":
        return [("rho x 100", _num(result["score"])), ("items", str(result["n"]))]
    rows = [(f"{k} (R^2 gain %)", _num(v)) for k, v in result["scores"].items()]
    for dv, m in result["measures"].items():
        rows += [(f"{dv}: gain %", _num(m["gain"])), (f"{dv}: R^2 base", f"{m['r2_baseline']:.5f}"),
                 (f"{dv}: R^2 + surprisal", f"{m['r2_model']:.5f}"), (f"{dv}: rows", str(m["n"]))]
    return rows


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# ---------------------------------------------------------------------------------------------- entity tracking


def entity_tracking(model, tokenizer, items: Sequence[EntityItem], *, method: str = "pll", **kw) -> dict:
    sentences = [o for it in items for o in it.options]
    prefixes = [it.prefix for it in items for _ in it.options]
    scores = score_sentences(model, tokenizer, sentences, method=method, prefixes=prefixes, prefix_sep="", **kw)
    check_finite_scores(scores, "entity_tracking")
    s32 = np.asarray(scores, dtype=np.float32)  # the pipeline compares float32 sums
    outcomes, k = [], 0
    for it in items:
        gold, best_other = s32[k], s32[k + 1: k + len(it.options)].max()
        outcomes.append((bool(gold >= best_other), bool(gold == best_other)))  # (right, tie)
        k += len(it.options)
    by_group: dict[str, list] = defaultdict(list)
    file_groups: dict[str, set] = defaultdict(set)
    for it, o in zip(items, outcomes):
        by_group[it.group].append(o)
        file_groups[it.file].add(it.group)
    groups = {g: _counts(v) for g, v in sorted(by_group.items())}
    files = {}
    for f, names in sorted(file_groups.items()):  # a file's number: the mean over its numops groups
        per = [groups[g] for g in sorted(names)]
        files[f] = {"n": sum(g["n"] for g in per), "groups": len(per),
                    "accuracy": sum(g["accuracy"] for g in per) / len(per),
                    "strict_accuracy": sum(g["strict_accuracy"] for g in per) / len(per)}
    out = {"metric": "accuracy", **_counts(outcomes)}
    names = list(groups)
    index = {g: i for i, g in enumerate(names)}
    out["items"] = {"correct": "".join("1" if c else "0" for c, _ in outcomes),
                    "tie": "".join("1" if t else "0" for _, t in outcomes), "ties_correct": True,
                    "group_names": names, "group": [index[it.group] for it in items]}
    out["macro_accuracy"] = sum(f["accuracy"] for f in files.values()) / len(files)
    out["strict_macro_accuracy"] = sum(f["strict_accuracy"] for f in files.values()) / len(files)
    out["groups"] = groups
    out["fields"] = files  # a "field" of entity tracking is a file: the mean of its groups (BabyLM's per-split number)
    return out


def _counts(outcomes: list[tuple[bool, bool]]) -> dict:
    n, correct, ties = len(outcomes), sum(c for c, _ in outcomes), sum(t for _, t in outcomes)
    return {"n": n, "correct": correct, "ties": ties, "accuracy": 100.0 * correct / n,
            "strict_correct": correct - ties, "strict_accuracy": 100.0 * (correct - ties) / n}


# ---------------------------------------------------------------------------------------------- WUG


def wug(model, tokenizer, items: Sequence[WugItem], *, method: str = "pll", task: str = "wug", **kw) -> dict:
    sentences = [c for it in items for c in it.candidates]
    scores = score_sentences(model, tokenizer, sentences, method=method, **kw)
    check_finite_scores(scores, task)
    probs, k = [], 0
    for it in items:
        z = torch.tensor(scores[k: k + len(it.candidates)], dtype=torch.float32)  # float32 as in the pipeline
        probs.append(float(torch.softmax(z, dim=0)[0]))
        k += len(it.candidates)
    rho = spearman(probs, [it.ratio for it in items])
    return {"metric": "spearman_rho", "n": len(items), "rho": rho, "score": None if rho is None else 100.0 * rho,
            "model_prob": probs}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (scipy); None where it is undefined (fewer than 2 items, a constant variable)."""
    from scipy.stats import spearmanr

    if len(x) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(spearmanr(x, y)[0])
    return rho if math.isfinite(rho) else None


# ---------------------------------------------------------------------------------------------- reading


def reading(model, tokenizer, words: Sequence[ReadingWord], **kw) -> dict:
    queries = [(w.context, w.word) for w in words] + [(w.prev_context, w.prev_word) for w in words if w.prev_context]
    values = word_surprisals(model, tokenizer, queries, **kw)
    check_finite_scores(values, "reading")
    pred = np.asarray(values[: len(words)])
    rest = iter(values[len(words):])
    prev = np.asarray([next(rest) if w.prev_context else math.nan for w in words])
    out = {"metric": "r2_gain", "n": len(words), **reading_scores(words, pred, prev)}
    out["surprisal"], out["prev_surprisal"] = pred.tolist(), [None if math.isnan(v) else v for v in prev.tolist()]
    return out


def word_surprisals(model, tokenizer, queries: Sequence[tuple[str, str]], *, token_budget: int | None = None,
                    device=None, precision: str = "fp32") -> list[float]:
    """-ln P(word | context) of every (context, word), the pipeline's `get_p2_mlm` (see the module docstring)."""
    check_precision(precision)
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise DwmlError("tokenizer has no mask token; masked-LM scoring needs one")
    texts: dict[str, int] = {}
    plan = []  # per query: [(text index, target id)] for its pieces
    for context, word in queries:
        pieces = _first_ids(tokenizer, word, None)
        steps = [(texts.setdefault(context, len(texts)), pieces[0])]
        text = context + tokenizer.decode(pieces[0])
        for piece in pieces[1:]:
            t = tokenizer.decode(piece)
            steps.append((texts.setdefault(text, len(texts)), _first_ids(tokenizer, t, word)[0]))
            text += t
        plan.append(steps)
    enc = tokenizer([t + tokenizer.mask_token * N_MASKS for t in texts], add_special_tokens=True)["input_ids"]
    pos = [len(ids) - N_MASKS - (0 if ids[-1] == mask_id else 1) for ids in enc]
    need: dict[int, set[int]] = defaultdict(set)
    for steps in plan:
        for i, target in steps:
            need[i].add(target)
    logp = _log_probs_at(model, enc, pos, need, token_budget, device, precision)
    return [-math.fsum(logp[step] for step in steps) for steps in plan]


def _first_ids(tokenizer, text: str, word: str | None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DwmlError(f"reading: {text!r}{f' (a piece of {word!r})' if word else ''} tokenizes to nothing")
    return ids


def _log_probs_at(model, enc: list[list[int]], pos: list[int], need: dict[int, set[int]],
                  token_budget: int | None, device, precision: str) -> dict[tuple[int, int], float]:
    """{(text, target): log P(target) at position pos[text] of text} in fp32, in single-length batches."""
    if device is not None:
        model.to(device)
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    budget = token_budget or DEFAULT_TOKEN_BUDGET.get(dev.type, DEFAULT_TOKEN_BUDGET["cpu"])
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: dict[tuple[int, int], float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _precision(precision, dev):
            start = 0
            while start < len(order):
                width = len(enc[order[start]])
                stop = start + 1
                while stop < len(order) and len(enc[order[stop]]) == width and (stop - start + 1) * width <= budget:
                    stop += 1
                rows = order[start:stop]
                ids = torch.tensor([enc[i] for i in rows], dtype=torch.long, device=dev)
                flat = torch.tensor([r * width + pos[i] for r, i in enumerate(rows)], dtype=torch.long, device=dev)
                lp = masked_log_probs(model, ids, None, flat).float().cpu()
                for r, i in enumerate(rows):
                    for target in need[i]:
                        out[(i, target)] = float(lp[r, target])
                start = stop
    finally:
        model.train(was_training)
    return out


def reading_scores(words: Sequence[ReadingWord], pred: np.ndarray, prev_pred: np.ndarray) -> dict:
    """The R^2 gains of surprisal `pred` over the pipeline's baselines (see the module docstring)."""
    col = {name: np.asarray([w.values[name] for w in words], dtype=np.float64) for name in words[0].values}
    col["pred"], col["prev_pred"] = pred, prev_pred
    measures = {dv: r2_gain(col[dv], [col[c] for c in REGRESSORS[:3]], pred, dv) for dv in EYE_TRACKING}
    spill = [col[c] for c in REGRESSORS] + [prev_pred]
    measures[f"{SELF_PACED} (spillover)"] = r2_gain(col[SELF_PACED], spill, pred, SELF_PACED)
    et = [measures[dv]["gain"] for dv in EYE_TRACKING]
    return {"scores": {"reading_eye_tracking": sum(et) / len(et),
                       "reading_self_paced": measures[f"{SELF_PACED} (spillover)"]["gain"]},
            "measures": measures}


def r2_gain(y: np.ndarray, regressors: list[np.ndarray], pred: np.ndarray, name: str) -> dict:
    """R^2 of y on the regressors and their pairwise products (baseline), then with `pred` added; the gain in % of
    the largest possible gain, 100 (R2_model - R2_base) / (1 - R2_base)."""
    base = np.column_stack(regressors + [a * b for a, b in itertools.combinations(regressors, 2)])
    rows_base = np.isfinite(y) & np.isfinite(base).all(axis=1)
    rows_model = rows_base & np.isfinite(pred)
    r2_base = ols_r2(y[rows_base], base[rows_base], name)
    r2_model = ols_r2(y[rows_model], np.column_stack([base, pred])[rows_model], name)
    return {"n_baseline": int(rows_base.sum()), "n": int(rows_model.sum()), "r2_baseline": r2_base,
            "r2_model": r2_model, "gain": 100.0 * (r2_model - r2_base) / (1.0 - r2_base)}


def ols_r2(y: np.ndarray, x: np.ndarray, name: str = "y") -> float:
    """R^2 (centred: the model has an intercept) of the least-squares fit of y on [1, x]."""
    a = np.column_stack([np.ones(len(y)), x])
    tss = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    if len(y) <= a.shape[1] or tss <= 0:
        raise DwmlError(f"reading: {len(y)} usable rows for {name} cannot fit {a.shape[1]} coefficients "
                        f"(too few words, or a constant measure)")
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    return 1.0 - float(resid @ resid) / tss
