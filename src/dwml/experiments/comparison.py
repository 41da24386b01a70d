"""The comparisons that answer the paper's question: every model against MLM trained alone on its own shape, and
against the KD student (teacher-guided distillation), on validation loss and on every zero-shot task.

Same shape: a peer of a DML / DWML / KD-DWML run (and the KD or SD student) is compared with the single-network `mlm`
run whose architecture is the same (`[[runs]] peer = k` trains one such baseline per searched peer shape), so the
difference is what learning with peers (or from a teacher) did, not what size did. Against KD: every model of the
other distillation runs (peers and the omega ensemble) against the `kd` student, which is trained on the largest peer
shape with the same tokens.

Intervals are paired bootstraps (`dwml.evaluation.stats`): zero-shot tasks over their items, stratified by group
(the same pairs for both models); validation loss over the validation batches (the same sequences and masks for
every run of an experiment: `train.eval_batches` x `train.eval_batch_size` sequences, fixed by the data, not the
run). A difference "exceeds noise" when its interval excludes 0. Loss: lower is better (Δ < 0 = better than the
baseline); accuracy: higher is better.
"""
from __future__ import annotations

from ..errors import DwmlError
from .analysis import done_runs
from .formatting import TASK_LABELS, md_table


def _targets(runs: list[dict]) -> list[tuple[dict, dict, str, dict, dict]]:
    """(run, model row, baseline kind, baseline run, baseline model row) for every comparison to make."""
    done = done_runs({"runs": runs})
    singles = [r for r in done if r.get("n_students") == 1]
    mlm_by_arch: dict[str, dict] = {}
    for r in singles:
        if r["method"] == "mlm":
            mlm_by_arch.setdefault(r["models"][0]["arch"], r)
    kd = next((r for r in singles if r["method"] == "kd"), None)
    out = []
    for run in done:
        if run["method"] == "mlm":
            continue  # the baselines themselves
        for m in run["models"]:
            base = mlm_by_arch.get(m["arch"]) if m["name"] != "ensemble" else None
            if base is not None:
                out.append((run, m, "mlm_same_shape", base, base["models"][0]))
            if kd is not None and run is not kd:
                out.append((run, m, "kd", kd, kd["models"][0]))
    return out


def compare_models(runs: list[dict], evaluations: dict[str, dict | None], *, n_boot: int = 10_000,
                   seed: int = 0) -> dict | None:
    """{"level", "n_boot", "rows": [...], "skipped": [...]} or None when there is nothing to compare.

    Row: {"run", "method", "model", "arch", "params", "baseline" (mlm_same_shape | kd), "baseline_run",
    "baseline_model", "measures": {"valid_loss" | task: {"diff", "low", "high", "significant", ...}}}."""
    from ..evaluation.stats import compare_tasks, paired_bootstrap_mean

    rows, skipped = [], []
    for run, m, kind, base, bm in _targets(runs):
        measures = {}
        a, b = m.get("valid_batch_losses"), bm.get("valid_batch_losses")
        if a and b and len(a) == len(b):
            measures["valid_loss"] = paired_bootstrap_mean(a, b, n_boot=n_boot, seed=seed)
        ev, bev = evaluations.get(run["name"]), evaluations.get(base["name"])
        if ev and bev and m["name"] in ev["models"] and bm["name"] in bev["models"]:
            try:
                measures.update(compare_tasks(ev["models"][m["name"]]["tasks"], bev["models"][bm["name"]]["tasks"],
                                              n_boot=n_boot, seed=seed))
            except DwmlError as e:  # e.g. an evaluation written before per-item outcomes existed
                skipped.append(f"{run['name']}/{m['name']} vs {base['name']}: {e}")
        if measures:
            rows.append({"run": run["name"], "method": run["method"], "model": m["name"], "arch": m["arch"],
                         "params": m["params"], "baseline": kind, "baseline_run": base["name"],
                         "baseline_model": bm["name"], "measures": measures})
    if not rows:
        return None
    return {"level": 0.95, "n_boot": n_boot, "rows": rows, "skipped": skipped}


def _cell(r: dict | None, spec: str) -> str:
    if r is None:
        return "–"
    mark = " *" if r["significant"] else ""
    return f"{r['diff']:+{spec}} [{r['low']:+{spec}}, {r['high']:+{spec}}]{mark}"


def comparison_table(results: dict) -> str:
    """One row per (model, baseline): Δ and 95% interval on validation loss and on each zero-shot task."""
    comp = results.get("comparisons")
    if not comp:
        return ""
    tasks: list[str] = []
    for r in comp["rows"]:
        tasks += [t for t in r["measures"] if t != "valid_loss" and t not in tasks]
    labels = {"mlm_same_shape": "MLM, same shape", "kd": "KD student"}
    rows = []
    for r in comp["rows"]:
        ms = r["measures"]
        rows.append([f"{r['run']}/{r['model']}", r["method"], r["arch"], f"{labels[r['baseline']]} "
                     f"(`{r['baseline_run']}`)", _cell(ms.get("valid_loss"), ".3f")]
                    + [_cell(ms.get(t), ".1f") for t in tasks])
    header = ["Model", "Method", "Shape", "Against", "Δ valid loss (nats)"] + [f"Δ {TASK_LABELS.get(t, t)}"
                                                                             for t in tasks]
    text = [f"Δ = model minus baseline with its {100 * comp['level']:.0f}% paired-bootstrap interval "
            f"({comp['n_boot']:,} replicates; loss over the shared validation batches, tasks over their items "
            "within groups); * = the interval excludes 0. Loss: negative is better; accuracy (points): positive is "
            "better (dwml/experiments/comparison.py).", "", md_table(header, rows)]
    if comp.get("skipped"):
        text += ["", "Not compared: " + "; ".join(comp["skipped"])]
    return "\n".join(text)
