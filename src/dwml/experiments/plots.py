"""The experiment report's matplotlib figures (Agg backend), each written atomically: omega over the outer steps
(paper Fig. 3) and the metric against every sweep axis, parameters and final omega (Fig. 2)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import atomic_path
from .analysis import done_runs, metric_of, omega_correlation, sweep_points
from .formatting import fmt_params, fmt_value


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _panels(n: int, width: float, height: float):
    """A figure with n panels in rows of at most 3 (unused grid cells hidden): (fig, list of n axes)."""
    cols = min(3, n)
    fig = _figure(width * cols, height * math.ceil(n / cols))
    axes = list(fig.subplots(math.ceil(n / cols), cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_omega(results: dict, path: str | Path) -> bool:
    """Figure 3: one panel per learned-omega run, one line per peer. False (nothing written) without such runs."""
    runs = [r for r in done_runs(results) if r.get("omega_trajectory", {}).get("outer_step")]
    if not runs:
        return False
    fig, axes = _panels(len(runs), 4.2, 3.2)
    for ax, run in zip(axes, runs):
        traj = run["omega_trajectory"]
        names = [r for r in run["models"] if r["name"] != "ensemble"]
        for i in range(len(traj["omega"][0])):
            label = f"{names[i]['name']} ({fmt_params(names[i]['params'])})" if i < len(names) else f"peer{i}"
            ax.plot(traj["outer_step"], [w[i] for w in traj["omega"]], label=label)
        ax.set_title(f"{run['name']} ({run['method']})", fontsize=10)
        ax.set_xlabel("outer step")
        ax.set_ylabel("ω")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, Path(path))
    return True


def plot_ablations(results: dict, path: str | Path) -> bool:
    """Figure 2: metric vs every sweep axis, vs parameters, vs final omega (with R)."""
    key, label = metric_of(results)
    panels: list[tuple[str, Any]] = []
    for base, family in sweep_points(results).items():
        for axis, points in family.items():
            panels.append(("sweep", (base, axis, points)))
    peers = [(run, r) for run in done_runs(results) for r in run["models"] if r["name"] != "ensemble"
             and r[key] is not None]
    if peers:
        panels.append(("params", peers))
    corr = results.get("correlation") or omega_correlation(results)
    if corr["points"]:
        panels.append(("omega", corr))
    if not panels:
        return False
    fig, axes = _panels(len(panels), 4.2, 3.4)
    for ax, (kind, data) in zip(axes, panels):
        if kind == "sweep":
            base, axis, points = data
            categorical = any(isinstance(p["value"], (bool, str)) for p in points)
            xs = list(range(len(points))) if categorical else [p["value"] for p in points]
            ax.plot(xs, [p["best"] for p in points], "o-", label="best peer")
            if any(p["ensemble"] is not None for p in points):
                ax.plot([x for x, p in zip(xs, points) if p["ensemble"] is not None],
                        [p["ensemble"] for p in points if p["ensemble"] is not None], "s--", label="ensemble")
            if categorical:
                ax.set_xticks(xs, [fmt_value(p["value"]) for p in points])
            ax.set_xlabel(axis)
            ax.set_title(f"{base}: vs {axis}", fontsize=10)
        elif kind == "params":
            methods = sorted({run["method"] for run, _ in data})
            for m in methods:
                pts = [(r["params"], r[key]) for run, r in data if run["method"] == m]
                ax.scatter([p for p, _ in pts], [v for _, v in pts], label=m, s=18)
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_title("vs model size (every peer)", fontsize=10)
        else:
            pts = data["points"]
            ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], s=18)
            r = "n/a" if data["r"] is None else f"{data['r']:.2f}"
            ax.set_xlabel("M · final ω")
            ax.set_title(f"vs final ω: R = {r} (n = {data['n']})", fontsize=10)
        ax.set_ylabel(label if len(label) < 30 else label.split(" (")[0])
        ax.grid(alpha=0.3)
        if kind != "omega":
            ax.legend(fontsize=7)
    _save(fig, Path(path))
    return True


def plot_valid_curves(results: dict, path: str | Path) -> bool:
    """Validation loss against training tokens per student, every student of every run (one line each), with the
    unigram entropy: learning from counts vs using context. False (nothing written) without validation records."""
    runs = [r for r in done_runs(results) if (r.get("valid_curve") or {}).get("tokens")]
    if not runs:
        return False
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    for run in runs:
        curve = run["valid_curve"]
        peers = [m for m in run["models"] if m["name"] != "ensemble"]
        for i, m in enumerate(peers):
            label = run["name"] + (f"/{m['name']}" if len(peers) > 1 else "") + f" ({fmt_params(m['params'])})"
            ax.plot(curve["tokens"], [loss[i] for loss in curve["loss"]], label=label, lw=1.2,
                    ls="-" if run["method"] in ("mlm", "kd") else "--")
    entropy = (results.get("data") or {}).get("unigram_entropy")
    if entropy is not None:
        ax.axhline(entropy, color="grey", lw=0.8, ls=":", label=f"unigram entropy {entropy:.2f}")
    ax.set_xlabel("training positions per student")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("validation loss vs tokens", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, Path(path))
    return True


def plot_blimp_fields(results: dict, path: str | Path) -> bool:
    """Accuracy per BLiMP field (pairs pooled per field) of each run's best peer, grouped bars, with the
    reference lines' when present. False without a BLiMP evaluation that has fields."""
    bars = [(run["name"], run["blimp_fields"][run["best"]]) for run in done_runs(results)
            if run["best"] in (run.get("blimp_fields") or {})]
    if not bars:
        return False
    for ref in ((results.get("reference") or {}).get("models") or {}).values():
        task = bars[0][1]["task"]
        fields = ((ref.get("tasks") or {}).get(task) or {}).get("fields")
        if fields:
            bars.append((ref["label"], {"task": task, "fields": {f: c["accuracy"] for f, c in fields.items()}}))
    names = sorted({f for _, b in bars for f in b["fields"]})
    fig = _figure(max(6.0, 1.3 * len(names) + 2), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(bars)
    for k, (label, b) in enumerate(bars):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [b["fields"].get(f, math.nan) for f in names], width, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{bars[0][1]['task']}: accuracy per field (best peer of each run)", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, Path(path))
    return True
