"""Outcomes of minimal pairs and their aggregation: per-pair (correct, tie), per-group and per-field counts, the
task's macro accuracy over groups, and the compact per-item record that paired statistics read back.

A pair is correct when the good text scores at least as high as the bad one (BabyLM: argmax over (good, bad), the first
maximum wins a tie); the strict_* numbers count a tie wrong. Used by `dwml eval` (`dwml.evaluation.evaluate`), the
reference lines of token counts (`dwml.evaluation.reference`) and the bootstrap (`dwml.evaluation.stats`), so every
accuracy dwml reports is aggregated by this one code.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from ..errors import DwmlError
from .evaldata import MinimalPair


def _counts(outcomes: list[tuple[bool, bool]]) -> dict:
    """Counts of (correct, tie) outcomes, `correct` in the BabyLM form (ties included)."""
    n = len(outcomes)
    correct = sum(c for c, _ in outcomes)
    ties = sum(t for _, t in outcomes)
    pct = lambda k: 100.0 * k / n if n else float("nan")  # noqa: E731
    return {"n": n, "correct": correct, "ties": ties, "accuracy": pct(correct),
            "strict_correct": correct - ties, "strict_accuracy": pct(correct - ties)}


def summarize(pairs: Sequence[MinimalPair], good: Sequence[float], bad: Sequence[float]) -> dict:
    """Per-group, per-field and overall counts; `macro_accuracy` (mean over groups, ties correct as in BabyLM) is the
    task's headline number, `strict_macro_accuracy` the same with ties wrong."""
    by_group: dict[str, list] = defaultdict(list)
    by_field: dict[str, list] = defaultdict(list)
    outcomes = []
    for pair, g, b in zip(pairs, good, bad):
        outcome = (g >= b, g == b)  # BabyLM: argmax over (good, bad), the first maximum wins a tie
        outcomes.append(outcome)
        by_group[pair.group].append(outcome)
        by_field[pair.field].append(outcome)
    groups = {name: _counts(v) for name, v in sorted(by_group.items())}
    result = _counts(outcomes)
    result["items"] = item_record(pairs, outcomes, list(groups))
    result["macro_accuracy"] = sum(g["accuracy"] for g in groups.values()) / len(groups)
    result["strict_macro_accuracy"] = sum(g["strict_accuracy"] for g in groups.values()) / len(groups)
    result["groups"] = groups
    if len(by_field) > 1:
        result["fields"] = {name: _counts(v) for name, v in sorted(by_field.items())}
    return result


def item_record(pairs: Sequence[MinimalPair], outcomes: list[tuple[bool, bool]], group_names: list[str]) -> dict:
    """Per-pair outcomes in the order of `pairs`, compactly (a 60k-pair task stays ~200 kB of JSON), for paired
    statistics between models scored on the same items (`item_outcomes` reads it back). `correct` is the BabyLM
    form (a tie counts correct), as the headline accuracy; `correct` and not `tie` is the strict outcome."""
    index = {g: i for i, g in enumerate(group_names)}
    return {"correct": "".join("1" if c else "0" for c, _ in outcomes),
            "tie": "".join("1" if t else "0" for _, t in outcomes),
            "ties_correct": True, "group_names": group_names, "group": [index[p.group] for p in pairs]}


def item_outcomes(task_result: dict) -> tuple:
    """(correct bool[n], tie bool[n], group index int[n], group names) of one task's result from `summarize`;
    `correct` in the BabyLM form (ties correct), also for records written before that was the rule."""
    import numpy as np

    items = task_result.get("items")
    if not items:
        raise DwmlError("evaluation result has no per-item outcomes (written by an older dwml); re-run dwml eval")
    correct = np.frombuffer(items["correct"].encode("ascii"), dtype=np.uint8) == ord("1")
    tie = np.frombuffer(items["tie"].encode("ascii"), dtype=np.uint8) == ord("1")
    if not items.get("ties_correct"):  # an older record: `correct` was strict
        correct = correct | tie
    return correct, tie, np.asarray(items["group"], dtype=np.int64), list(items["group_names"])
