"""Paired bootstrap over evaluation items: is the zero-shot difference of two models larger than evaluation noise?

Two models scored on the same minimal pairs differ by d = acc_a - acc_b. The headline number of a task is the macro
accuracy (the mean of the groups' accuracies: BLiMP paradigms, supplement tasks, EWoK domains), so the resampling is
stratified by group: every replicate draws, within each group g, n_g items with replacement - the *same* items for
both models (paired) - and recomputes the macro difference. The 95% percentile interval of the replicates is the
noise band; the difference "exceeds evaluation noise" when that interval excludes 0.

Within one group only three kinds of items matter for the difference: a right / b wrong (+1), a wrong / b right (-1)
and equal outcomes (0). Drawing n_g items with replacement is therefore exactly a multinomial draw of how many of
each kind the replicate holds, so a replicate costs O(groups) instead of O(items) - the 10,000-replicate bootstrap
of a 60k-pair task takes milliseconds. `tests/evaluation/test_stats.py` checks it against the naive per-item loop and the
closed-form variance.
"""
from __future__ import annotations

import numpy as np

from ..errors import DwmlError


def macro_accuracy(correct: np.ndarray, group: np.ndarray) -> float:
    """Mean over groups of the per-group accuracy (%)."""
    groups = np.unique(group)
    return float(100.0 * np.mean([correct[group == g].mean() for g in groups]))


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, group: np.ndarray, *, n_boot: int = 10_000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Stratified paired bootstrap of macro_accuracy(a) - macro_accuracy(b) (percentage points).

    Returns {"diff", "low", "high", "level", "n_boot", "n_items", "significant"} where [low, high] is the
    percentile interval and `significant` is True when it excludes 0.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    group = np.asarray(group)
    if a.shape != b.shape or a.shape != group.shape or a.ndim != 1:
        raise DwmlError(f"paired bootstrap: the two models must be scored on the same items "
                        f"(got {a.shape}, {b.shape} outcomes and {group.shape} groups)")
    if a.size == 0:
        raise DwmlError("paired bootstrap: no items")
    if not 0.0 < level < 1.0:
        raise DwmlError(f"paired bootstrap: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    groups = np.unique(group)
    total = np.zeros(n_boot)
    for g in groups:
        sel = group == g
        n = int(sel.sum())
        plus = int((a[sel] & ~b[sel]).sum())
        minus = int((~a[sel] & b[sel]).sum())
        counts = rng.multinomial(n, [plus / n, minus / n, (n - plus - minus) / n], size=n_boot)
        total += (counts[:, 0] - counts[:, 1]) / n
    return _interval(100.0 * total / len(groups), macro_accuracy(a, group) - macro_accuracy(b, group), level,
                     int(a.size))


def _interval(replicates: np.ndarray, diff: float, level: float, n_items: int) -> dict:
    """The result dict of a bootstrap: its percentile interval at `level` and whether it excludes 0."""
    tail = (1.0 - level) / 2
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return {"diff": float(diff), "low": float(low), "high": float(high), "level": level,
            "n_boot": int(replicates.size), "n_items": n_items, "significant": bool(low > 0 or high < 0)}


def paired_bootstrap_mean(values_a, values_b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Paired bootstrap of mean(a) - mean(b) over shared units (e.g. the validation batches both models were scored
    on: the same sequences and masks); same keys as `paired_bootstrap`, in the values' own units (nats)."""
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise DwmlError(f"paired bootstrap: expected the same non-empty list of units for both (got {a.shape}, "
                        f"{b.shape})")
    if not 0.0 < level < 1.0:
        raise DwmlError(f"paired bootstrap: level must be in (0, 1), got {level}")
    d = a - b
    rng = np.random.default_rng(seed)
    return _interval(d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1), d.mean(), level, int(d.size))


def compare_tasks(task_results_a: dict, task_results_b: dict, **kwargs) -> dict:
    """{task: paired_bootstrap(...)} for every task both evaluation results hold (per-item outcomes from
    `dwml.evaluation.evaluate`); a task scored on different items in the two results is an error."""
    from .outcomes import item_outcomes

    out = {}
    for task in task_results_a:
        if task not in task_results_b or task_results_a[task].get("metric", "accuracy") != "accuracy":
            continue  # WUG's rho and reading's R^2 gain have no per-item outcomes to resample
        ca, _, ga, _ = item_outcomes(task_results_a[task])
        cb, _, gb, _ = item_outcomes(task_results_b[task])
        if ca.shape != cb.shape or not np.array_equal(ga, gb):
            raise DwmlError(f"paired bootstrap: task {task} was scored on different items by the two models")
        out[task] = paired_bootstrap(ca, cb, ga, **kwargs)
    return out


def reference_run(runs: list[dict]) -> dict | None:
    """The MLM baseline every method is compared with: the run named `mlm`, else the first trained `mlm` run."""
    done = [r for r in runs if r.get("models") and not r.get("alias_of")]
    named = [r for r in done if r["name"] == "mlm" and r["method"] == "mlm"]
    mlm = named or [r for r in done if r["method"] == "mlm"]
    return mlm[0] if mlm else None


def significance_vs_mlm(runs: list[dict], evaluations: dict[str, dict | None], **kwargs) -> dict | None:
    """Each other run's best peer and ensemble vs the MLM run's best model, task by task (paired bootstrap).

    `runs` are experiment run records ({"name", "method", "best", "models"}); `evaluations` maps run names to their
    `dwml eval` results. Returns {"reference": {"run", "model"}, "level", "n_boot", "rows": [...], "skipped": [...]}
    or None without an evaluated MLM run.
    """
    ref = reference_run(runs)
    ref_eval = evaluations.get(ref["name"]) if ref else None
    if ref is None or not ref_eval:
        return None
    ref_tasks = ref_eval["models"][ref["best"]]["tasks"]
    out = {"reference": {"run": ref["name"], "model": ref["best"]}, "rows": [], "skipped": []}
    for run in runs:
        ev = evaluations.get(run["name"])
        if run is ref or run.get("alias_of") or not run.get("models") or not ev:
            continue
        for model in [run["best"]] + (["ensemble"] if "ensemble" in ev["models"] else []):
            try:
                res = compare_tasks(ev["models"][model]["tasks"], ref_tasks, **kwargs)
            except DwmlError as e:  # e.g. an evaluation written before per-item outcomes existed
                out["skipped"].append(f"{run['name']}/{model}: {e}")
                continue
            for task, r in res.items():
                out["rows"].append({"run": run["name"], "method": run["method"], "model": model, "task": task, **r})
                out.setdefault("level", r["level"])
                out.setdefault("n_boot", r["n_boot"])
    return out
