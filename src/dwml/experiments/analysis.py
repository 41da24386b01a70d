"""The numbers behind the experiment report: one run's table rows, its best peer, omega-vs-accuracy correlation and
sweep points, all pure functions of a results dict (see `dwml.experiments.report` for what each table shows)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from ..evaluation.babylm_data import metric_of as score_metric


def model_rows(summary: dict, evaluation: dict | None, finetune: dict | None) -> list[dict]:
    """One row per peer (`peer0`, ...) and, for a multi-peer run, one for the ensemble.

    Row: {"name", "arch", "params", "omega", "valid_loss", "plateau_exit_step", "zero_shot": {column: score},
          "zero_shot_mean" (of the accuracy columns only: WUG's rho and reading's R^2 gains are not averaged in),
          "zero_shot_strict": {task: % with ties wrong}, "zero_shot_strict_mean",
          "zero_shot_ties", "glue": {task: score}, "glue_avg"}; missing numbers are None.
    """
    from ..models.model import Arch

    scored = (evaluation or {}).get("models", {})
    tuned = (finetune or {}).get("models", {})
    rows = []
    peers = summary["peers"]
    for i, p in enumerate(peers):
        a = p.get("arch", {})
        arch = Arch.from_dict(a, f"peers[{i}].arch").name if a else p.get("name", "")
        rows.append(_row(f"peer{i}", arch, p["params"], summary["omega"][i], p["valid_loss"], scored, tuned))
        rows[-1].update(plateau_exit_step=p.get("plateau_exit_step"), valid_batch_losses=p.get("valid_batch_losses"))
    if len(peers) > 1:
        rows.append(_row("ensemble", "omega-mixture", sum(p["params"] for p in peers), None,
                         summary.get("valid_ensemble_loss"), scored, tuned))
        rows[-1].update(plateau_exit_step=None, valid_batch_losses=summary.get("valid_ensemble_batch_losses"))
    return rows


def _row(name: str, arch: str, params: int, omega: float | None, valid_loss: float | None, scored: dict,
         tuned: dict) -> dict:
    model = scored.get(name, {})
    zero_shot = dict(model.get("summary", {}))
    strict = dict(model.get("strict_summary", {}))
    ft = tuned.get(name)
    glue = {t: r["score"] for t, r in ft["tasks"].items()} if ft else {}
    return {"name": name, "arch": arch, "params": params, "omega": omega, "valid_loss": valid_loss,
            "zero_shot": zero_shot,
            "zero_shot_mean": _mean(v for c, v in zero_shot.items() if score_metric(c) == "accuracy"),
            "zero_shot_strict": strict, "zero_shot_strict_mean": _mean(strict.values()),
            "zero_shot_ties": sum(model["ties"].values()) if "ties" in model else None,
            "glue": glue, "glue_avg": ft["average"] if ft else None}


def _mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def best_model(rows: Sequence[dict]) -> str:
    """The best peer (never the ensemble): highest mean zero-shot accuracy, ties and no evaluation -> lowest
    validation loss."""
    peers = [r for r in rows if r["name"] != "ensemble"]

    def key(r: dict) -> tuple:
        acc = r["zero_shot_mean"]
        loss = r["valid_loss"] if r["valid_loss"] is not None else math.inf
        return (-(acc if acc is not None else -math.inf), loss)

    return min(peers, key=key)["name"]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's correlation coefficient; None for fewer than 3 points or a constant variable."""
    n = len(x)
    if n != len(y) or n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def metric_of(results: dict) -> tuple[str, str]:
    """(row key, label) of the headline metric: mean zero-shot accuracy, or validation loss without evaluation."""
    has_eval = any(r.get("zero_shot_mean") is not None for run in done_runs(results) for r in run["models"])
    return ("zero_shot_mean", "zero-shot accuracy (%, mean of accuracy tasks)") if has_eval else \
        ("valid_loss", "validation loss")


def done_runs(results: dict) -> list[dict]:
    """Runs with results (trained, not an alias of another run)."""
    return [r for r in results["runs"] if not r.get("alias_of") and r.get("models")]


def omega_correlation(results: dict) -> dict:
    """R between final omega (relative to uniform) and the metric over all peers of learned-omega runs, pooled;
    also per run. See the module docstring."""
    key, label = metric_of(results)
    points, per_run = [], {}
    for run in done_runs(results):
        if run["method"] not in ("dwml", "kd_dwml") or not run.get("omega_learned"):
            continue
        peers = [r for r in run["models"] if r["name"] != "ensemble" and r[key] is not None]
        m = len(run["omega"])
        xs = [m * r["omega"] for r in peers]
        ys = [r[key] for r in peers]
        points += [{"run": run["name"], "peer": r["name"], "x": x, "y": y} for r, x, y in zip(peers, xs, ys)]
        per_run[run["name"]] = {"n": len(xs), "r": pearson(xs, ys)}
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    return {"metric": label, "x": "M * omega_i (final omega relative to uniform)", "n": len(points),
            "r": pearson(xs, ys), "points": points, "per_run": per_run}


def sweep_points(results: dict) -> dict[str, dict[str, list[dict]]]:
    """{base run: {axis: [{"value", "run", "best", "ensemble"} sorted by value]}}: the base run and its variants
    (an alias takes the numbers of the run it points to)."""
    key, _ = metric_of(results)
    runs = {r["name"]: r for r in results["runs"]}
    out: dict[str, dict[str, list[dict]]] = {}
    variants = [r for r in results["runs"] if r.get("sweep")]
    for v in variants:
        base, axis, value = v["sweep"]["base"], v["sweep"]["axis"], v["sweep"]["value"]
        family = out.setdefault(base, {})
        if axis not in family:
            family[axis] = []
            b = runs.get(base)
            if b and b.get("models"):
                family[axis].append(_point(b["axes"][axis], b, key))
        target = runs.get(v["alias_of"]) if v.get("alias_of") else v
        if target and target.get("models"):
            p = _point(value, target, key)
            p["run"] = v["name"] + (f" (= {target['name']})" if v.get("alias_of") else "")
            if not any(q["value"] == value for q in family[axis]):
                family[axis].append(p)
    for family in out.values():
        for axis in family:
            family[axis].sort(key=lambda p: (float(p["value"]) if not isinstance(p["value"], str) else 0.0))
    return out


def _point(value: Any, run: dict, key: str) -> dict:
    rows = {r["name"]: r for r in run["models"]}
    ens = rows.get("ensemble")
    return {"value": value, "run": run["name"], "best": rows[run["best"]][key],
            "ensemble": ens[key] if ens else None}
