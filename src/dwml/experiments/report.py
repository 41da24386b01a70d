"""The experiment report: pure functions from a results dict (`results.json` of `dwml experiment`) to markdown
tables, and matplotlib figures written atomically.

What is reported (paper: Iyer 2024, "When Babies Teach Babies", arXiv 2411.16487):
- Table 1: per run, its best peer and (multi-peer runs) the omega-weighted ensemble; Table 2: every peer.
  Columns: zero-shot macro accuracy per task (BLiMP filtered, supplement, EWoK, or their fast subsets; a tie counts
  correct, as in BabyLM's pipeline), their mean, the mean with ties counted wrong ("strict") and the tie count, GLUE
  average (and per task) when fine-tuning ran, validation loss, parameters, omega.
  The best peer of a run is the one with the highest mean zero-shot accuracy (ties and runs without zero-shot
  evaluation: the lowest validation loss); it is marked with a star.
- Figure 3: omega of every peer over the outer steps of each learned-omega run (from metrics.jsonl), and Table 3:
  per learned-omega run, its unroll (`distill.unroll`) and the median over its outer steps of the centred
  |mixed| / |direct| ratio of the hypergradient (how much the exact mixed term of eq. 3 moves omega).
- Figure 2: the metric against each sweep axis (number of peers, alpha, fixed vs learned omega, ...), against the
  number of parameters, and against the final omega, with Pearson's R.
- Table 9: wall time, mean GPU utilisation (n/a without a GPU / pynvml), analytic and measured training FLOPs.

The metric is the mean zero-shot macro accuracy over the evaluated tasks (%); without evaluation, the validation
loss (lower is better).

R (omega vs accuracy): over every peer of every learned-omega run (dwml, kd_dwml) pooled, x = M * omega_i (the
peer's final weight relative to the uniform 1/M, so runs with different numbers of peers M are comparable; with a
single M this is a rescaling and gives the same R as omega_i), y = the peer's metric. Pearson's R needs n >= 3 points
(two points always lie on a line) and non-constant x and y; otherwise it is undefined (reported as n/a).
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.babylm_data import metric_of as score_metric
from ..evaluation.babylm_data import score_columns
from ..io import write_text
from .analysis import done_runs, metric_of, omega_correlation, sweep_points
from .comparison import comparison_table
from .formatting import TASK_LABELS, fmt, fmt_flops, fmt_params, fmt_value, md_table
from .plots import plot_ablations, plot_blimp_fields, plot_omega, plot_valid_curves

STAR = " ★"


# --------------------------------------------------------------------------------------------------------------
# Markdown


def _tasks(results: dict) -> list[str]:
    """The zero-shot score columns: one per task, two for reading (dwml.evaluation.babylm_data.score_columns)."""
    if results.get("eval"):
        return score_columns(results["eval"]["tasks"])
    return []


def _glue_tasks(results: dict) -> list[str]:
    tasks: list[str] = []
    for run in done_runs(results):
        for r in run["models"]:
            for t in r["glue"]:
                if t not in tasks:
                    tasks.append(t)
    return tasks


def _score_cells(row: dict, tasks: list[str], glue_tasks: list[str]) -> list[str]:
    cells = [fmt(row["zero_shot"].get(t)) for t in tasks]
    if tasks:
        cells += [fmt(row["zero_shot_mean"]), fmt(row.get("zero_shot_strict_mean")),
                  fmt(row.get("zero_shot_ties"), "d")]
    if glue_tasks:
        cells.append(fmt(row["glue_avg"], ".3f"))
    return cells


def _score_header(results: dict, tasks: list[str], glue_tasks: list[str]) -> list[str]:
    head = [TASK_LABELS.get(t, t) for t in tasks]
    if tasks:
        head += ["Zero-shot mean", "Strict mean", "Ties"]
    if glue_tasks:
        head.append("GLUE avg")
    return head


def main_table(results: dict) -> str:
    """Table 1: each run's best peer (★) and ensemble."""
    tasks, glue = _tasks(results), _glue_tasks(results)
    header = (["Run", "Method", "Model", "Params", "ω"] + _score_header(results, tasks, glue)
              + ["Valid loss", "Plateau exit"])
    rows = []
    for run in done_runs(results):
        for r in run["models"]:
            if r["name"] != run["best"] and r["name"] != "ensemble":
                continue
            name = r["name"] + (STAR if r["name"] == run["best"] and len(run["models"]) > 1 else "")
            rows.append([run["name"], run["method"], name, fmt_params(r["params"]), fmt(r["omega"], ".3f")]
                        + _score_cells(r, tasks, glue) + [fmt(r["valid_loss"], ".3f"), _exit_cell(r)])
    return md_table(header, rows + reference_rows(results, tasks, glue))


def reference_rows(results: dict, tasks: list[str], glue_tasks: list[str]) -> list[list[str]]:
    """Table 1's rows "unigram (train counts)" and "KN trigram" (results["reference"]): no learning, the train
    split's token counts scored on the same pairs; means only when every accuracy task has a line."""
    rows = []
    for r in ((results.get("reference") or {}).get("models") or {}).values():
        acc = [t for t in tasks if score_metric(t) == "accuracy"]
        full = bool(acc) and all(t in r["summary"] for t in acc)
        mean = lambda d: sum(d[t] for t in acc) / len(acc) if full else None  # noqa: E731
        cells = [fmt(r["summary"].get(t)) for t in tasks]
        if tasks:
            cells += [fmt(mean(r["summary"])), fmt(mean(r["strict_summary"])),
                      fmt(sum(r["ties"][t] for t in acc) if full else None, "d")]
        rows.append(["reference", "no learning", r["label"], "–", "–"] + cells + (["–"] if glue_tasks else [])
                    + ["–", "–"])
    return rows


def reference_text(results: dict) -> str:
    """What the reference rows are, with the KN trigram's 95% interval per task."""
    ref = results.get("reference")
    if not ref or not ref.get("models", {}).get("kn_trigram", {}).get("tasks"):
        return ""
    tri = ref["models"]["kn_trigram"]["tasks"]
    spans = ", ".join(f"{TASK_LABELS.get(t, t)} [{r['interval']['low']:.1f}, {r['interval']['high']:.1f}]"
                      for t, r in tri.items())
    return (f"Rows *unigram (train counts)* and *KN trigram*: no learning - the token counts of the train split of "
            f"`{ref['prepared']}`, scored on the same pairs, tokenised as the models see them, a tie counting "
            f"correct (Strict mean: wrong): an add-one unigram and an interpolated Kneser-Ney trigram (fixed "
            f"discount {ref.get('discount', 0.75)}, <s>/</s>; dwml/evaluation/reference.py). Pairs that hold the "
            "same tokens in another order tie under the unigram, so counting alone scores above 50%; a model has "
            f"learned more than counting only above these lines. KN trigram 95% interval (bootstrap over items "
            f"within groups): {spans}.")


def peer_table(results: dict) -> str:
    """Table 2: every peer and ensemble of every run, GLUE per task when fine-tuned; best peer ★."""
    tasks, glue = _tasks(results), _glue_tasks(results)
    header = (["Run", "Method", "Model", "Architecture", "Params", "ω"] + _score_header(results, tasks, glue)
              + glue + ["Valid loss", "Plateau exit"])
    rows = []
    for run in done_runs(results):
        for r in run["models"]:
            name = r["name"] + (STAR if r["name"] == run["best"] and len(run["models"]) > 1 else "")
            rows.append([run["name"], run["method"], name, r["arch"], fmt_params(r["params"]), fmt(r["omega"], ".3f")]
                        + _score_cells(r, tasks, glue) + [fmt(r["glue"].get(t), ".3f") for t in glue]
                        + [fmt(r["valid_loss"], ".3f"), _exit_cell(r)])
    return md_table(header, rows)


def _exit_cell(row: dict) -> str:
    """The step at which a model's validation loss first was 0.5 nats below the unigram entropy."""
    if row["name"] == "ensemble" or "plateau_exit_step" not in row:
        return "–"
    return "never" if row["plateau_exit_step"] is None else str(row["plateau_exit_step"])


def significance_table(results: dict) -> str:
    """Each method's best peer and ensemble vs MLM per task: difference, 95% paired-bootstrap interval, verdict."""
    sig = results.get("significance")
    if not sig:
        return "No evaluated `mlm` run to compare with (or no zero-shot evaluation)."
    ref = sig["reference"]
    rows = [[r["run"], r["method"], r["model"], TASK_LABELS.get(r["task"], r["task"]), f"{r['diff']:+.2f}",
             f"[{r['low']:+.2f}, {r['high']:+.2f}]", "yes" if r["significant"] else "no"] for r in sig["rows"]]
    level = 100 * sig.get("level", 0.95)
    text = [f"Zero-shot macro accuracy minus that of `{ref['run']}` ({ref['model']}), in points; paired bootstrap over "
            f"the items ({sig.get('n_boot', 0):,} replicates, resampled within each group, the same items for both "
            f"models), {level:.0f}% percentile interval. \"Exceeds noise\" = the interval excludes 0 (dwml/evaluation/stats.py).",
            "", md_table(["Run", "Method", "Model", "Task", "Δ vs MLM", f"{level:.0f}% interval", "Exceeds noise"],
                         rows)]
    if sig.get("skipped"):
        text += ["", "Not compared: " + "; ".join(sig["skipped"])]
    return "\n".join(text)


def sweep_table(results: dict) -> str:
    _, label = metric_of(results)
    rows = []
    for base, family in sweep_points(results).items():
        for axis, points in family.items():
            for p in points:
                rows.append([base, axis, fmt_value(p["value"]), p["run"], fmt(p["best"], ".2f"),
                             fmt(p["ensemble"], ".2f")])
    return md_table(["Base run", "Axis", "Value", "Run", f"Best peer: {label}", "Ensemble"], rows) if rows else ""


def outer_table(results: dict) -> str:
    """Table 3: the outer step of each learned-omega run: unroll, outer steps, median centred |mixed| / |direct|."""
    rows = []
    for run in done_runs(results):
        traj = run.get("omega_trajectory") or {}
        if not run.get("omega_learned") or not traj.get("outer_step"):
            continue
        rows.append([run["name"], run["method"], run.get("unroll") or "n/a", str(len(traj["outer_step"]) - 1),
                     fmt(run.get("mixed_ratio_median"), ".3g")])
    return md_table(["Run", "Method", "Unroll", "Outer steps", "Median mixed / direct"], rows) if rows else ""


def correlation_text(results: dict) -> str:
    c = results.get("correlation") or omega_correlation(results)
    runs = sorted({p["run"] for p in c["points"]})
    r = "n/a (undefined for n < 3 or constant values)" if c["r"] is None else f"{c['r']:.3f}"
    lines = [f"Pearson R between final ω and accuracy: **R = {r}**, n = {c['n']} peers pooled from "
             f"{', '.join(runs) if runs else 'no learned-omega run'}; x = {c['x']}, y = {c['metric']} of each peer."]
    for name, pr in c["per_run"].items():
        lines.append(f"- {name}: R = {'n/a' if pr['r'] is None else format(pr['r'], '.3f')} (n = {pr['n']})")
    return "\n".join(lines)


def cost_table(results: dict) -> str:
    """Table 9: wall time, GPU utilisation, analytic and measured FLOPs."""
    header = ["Run", "Method", "Students", "Tokens/student", "Wall s", "GPU util", "Analytic FLOPs/student",
              "Analytic total", "Measured/analytic (1 step)", "Outer step (× inner)", "Measured total"]
    rows = []
    for run in done_runs(results):
        fl, t = run.get("flops", {}), run.get("timing") or {}
        util = t.get("gpu_util_mean")
        inner = fl.get("measured_micro_step")
        outer = fl.get("measured_outer_step")
        rows.append([
            run["name"], run["method"], str(run["n_students"]), f"{run['budget']['tokens_per_student']:,.0f}",
            fmt(t.get("wall_s"), ".0f", none="n/a") + (" (resumed)" if t.get("resumed") else ""),
            "n/a" if util is None else f"{util:.0f}%",
            " + ".join(fmt_flops(f) for f in fl.get("analytic_per_student", [])),
            fmt_flops(fl.get("analytic_total")),
            fmt(fl.get("ratio"), ".4f"),
            "–" if not outer else f"{outer / inner:.2f} × {fl['outer_steps']}",
            fmt_flops(fl.get("measured_total")),
        ])
    return md_table(header, rows)


def _mask_frac(results: dict) -> float | None:
    fracs = [r["flops"].get("mask_frac") for r in done_runs(results) if r.get("flops")]
    return fracs[0] if fracs else None


def _seq_len(results: dict) -> int:
    return results["runs"][0]["budget"]["seq_len"] if results["runs"] else 1


def _budget(r: dict) -> str:
    b = r["budget"]
    return f"{b['steps']} steps x {b['batch_size']} sequences x {b['grad_accum']} accumulation x {b['seq_len']} tokens"


def _budget_lines(runs: list[dict]) -> list[str]:
    """The students' shared budget, and apart from it that of runs that only teach others (a KD teacher may train
    longer than its students: its compute is not the students', and its words are counted in the Exposure table)."""
    teaching = {r["teacher_run"] for r in runs if r.get("teacher_run")}
    students = [r for r in runs if r["name"] not in teaching]
    out = []
    if len({_budget(r) for r in students}) == 1:
        out.append(f"All {'students' if teaching else 'runs'}: {_budget(students[0])}.")
    elif students:
        out.append("Note: the runs do NOT share one budget: "
                   + "; ".join(f"{r['name']}: {_budget(r)}" for r in students) + ".")
    for r in runs:
        if r["name"] in teaching:
            users = ", ".join(u["name"] for u in runs if u.get("teacher_run") == r["name"])
            out.append(f"Teacher `{r['name']}` (of {users}), trained first: {_budget(r)}.")
    return out


def render_report(results: dict, figures: dict[str, str] | None = None) -> str:
    """The whole report.md (figures: {kind: relative path} of the images written)."""
    figures = figures or {}
    d = results["data"]
    runs = done_runs(results)
    out = [f"# Experiment: {results['name']}", ""]
    if results.get("description"):
        out += [results["description"], ""]
    pending = [r["name"] for r in results["runs"] if not r.get("alias_of") and not r.get("models")]
    train_s = sum((r.get("timing") or {}).get("wall_s") or 0 for r in runs)
    out.append(f"Config `{results.get('config_file', '')}`; {len(runs)} trained runs"
               + (f", not trained yet: {', '.join(pending)}" if pending else "")
               + (f"; this invocation took {results['wall_time_s']:.0f} s (finished stages are skipped)"
                  if results.get("wall_time_s") is not None else "")
               + (f" - the report was rewritten with --report-only from an invocation that took "
                  f"{results['trained_wall_time_s']:.0f} s" if results.get("trained_wall_time_s") else "")
               + (f"; training wall time summed over runs {train_s:.0f} s" if train_s else "")
               + ".")
    host = results.get("host") or {}
    if host:
        out.append(f"Host: {host.get('gpu') or 'CPU'}, {host.get('cpus')} CPUs, torch {host.get('torch')}, "
                   f"OMP_NUM_THREADS={host.get('omp_num_threads')}, load average at start "
                   f"{fmt((host.get('load_avg_start') or [None])[0], '.2f')}, at end "
                   f"{fmt((host.get('load_avg_end') or [None])[0], '.2f')}.")
    out += ["", "## Data and budget", "",
            f"Prepared data `{d['prepared']}`: vocabulary {d['vocab_size']:,}, {fmt(d.get('train_words'), ',')} "
            f"train words = {fmt(d.get('train_tokens'), ',')} tokens in {d['train_sequences']:,} packed sequences "
            f"(mean length {d['mean_sequence_length']:.1f}), {fmt(d.get('valid_tokens'), ',')} valid tokens. "
            f"Unigram entropy of the train split: {fmt(d.get('unigram_entropy'), '.3f')} nats - the validation loss "
            "of a model that has learned token frequencies only; column Plateau exit = the first validation step "
            "with a loss 0.5 nats below it (never: the model did not get there).",
            "",
            "Same data and budget: every student trains on these data with the same steps, batch, gradient "
            "accumulation and sequence length, and the same seeded batch and mask stream, so it sees the same tokens "
            f"(column Tokens/student of Table 9: positions computed on, B x T per sequence; "
            f"{100 * d['mean_sequence_length'] / max(1, _seq_len(results)):.0f}% of them are real tokens, the rest "
            "padding of packed sequences). Compute is not equalised: an M-peer run trains M networks (and "
            "DWML adds an outer ω step every K steps), kd adds a teacher forward; Table 9 gives the FLOPs."]
    out += _budget_lines(results["runs"])
    if results.get("search"):
        s = results["search"]
        out.append(f"Peers: Bayesian-optimisation search below the reference {s['reference']['name']} "
                   f"({fmt_params(s['reference']['params'])}): "
                   + ", ".join(f"peer {p['peer']} {fmt_params(p['params'])} (target N/{p['peer'] + 1})"
                               for p in s["peers"]) + ".")
    ev, ft = results.get("eval"), results.get("finetune")
    out += ["", "## Table 1: main results (best peer ★ and ensemble per run)", ""]
    if ev:
        out.append(f"Zero-shot: {', '.join(ev['tasks'])}, scoring {ev['method']}, "
                   + (f"first {ev['limit']} pairs of every file" if ev.get("limit") else "all pairs")
                   + f"; precision {ev.get('precision', 'fp32')}, EWoK pairing {ev.get('ewok_pairing', 'contexts')}"
                   + "; macro accuracy over groups (%); a tie counts correct, as in BabyLM's pipeline (Strict mean: "
                   "ties wrong; Ties: tied pairs over all tasks)."
                   + (" Of each multi-peer run only the peer with the lowest validation loss is scored (eval.peers = "
                      "best_loss): it is the run's best peer ★, the others and the ensemble show – for zero-shot."
                      if ev.get("peers") == "best_loss" else ""))
        if any(score_metric(c) != "accuracy" for c in _tasks(results)):
            out.append("WUG columns: Spearman's ρ (×100) between the model's and the humans' preference; Reading "
                       "columns: the gain in R² that surprisal adds to BabyLM's OLS baseline, in % of the possible "
                       "gain (eye tracking: mean of 4 measures; self-paced reading: with spillover). They are not "
                       "accuracies: the zero-shot and strict means (and the best peer) use the accuracy tasks only.")
    if ft:
        out.append(f"GLUE: fine-tuned {ft['models']} peer(s) on {', '.join(ft['tasks'])}, {ft['epochs']} epoch(s), "
                   f"at most {ft['max_train_examples'] or 'all'} train / {ft['max_eval_examples'] or 'all'} eval "
                   "examples (score = MCC for cola, F1 for mrpc/qqp, accuracy otherwise; average of tasks).")
    out += ["", main_table(results)]
    out += ["", reference_text(results)] if reference_text(results) else []
    if ev:
        out += ["", "### Differences vs MLM: beyond evaluation noise?", "", significance_table(results)]
    table = comparison_table(results)
    if table:
        out += ["", "### Each method against MLM of the same shape and against KD", "", table]
    for kind, title in (("valid_loss", "validation loss against tokens"), ("blimp_fields", "BLiMP per field")):
        if kind in figures:
            out += ["", f"![{title}]({figures[kind]})"]
    out += ["", "## Table 2: every peer", "", peer_table(results)]
    out += ["", "## Figure 3: ω over the outer steps", ""]
    out.append(f"![omega trajectories]({figures['omega']})" if "omega" in figures else
               "No learned-ω run with outer steps.")
    table = outer_table(results)
    if table:
        out += ["", "## Table 3: the outer step", "",
                "Per outer step, the hypergradient g = direct + mixed (eq. 3); both are centred (their mean over the "
                "peers subtracted: mirror descent ignores a constant shift) and the ratio of their norms, "
                "‖mixed‖ / ‖direct‖, logged; the table gives its median over the run's outer steps. "
                "Unroll: the inner step differentiated (adamw = the optimizer's real step, sgd = eq. 3's "
                "θ − γ∇L1, direct = adamw's θ' without the mixed term, ratio 0).", "", table]
    out += ["", "## Figure 2: ablations, size and ω vs accuracy", ""]
    if "ablations" in figures:
        out.append(f"![ablations]({figures['ablations']})")
    table = sweep_table(results)
    if table:
        out += ["", table]
    out += ["", correlation_text(results)]
    out += ["", "## Table 9: cost", "",
            "Wall time of training (this machine; a resumed run counts only the resumed part); GPU util = mean of "
            "NVML samples every 0.5 s (n/a: no GPU or no pynvml). Analytic FLOPs per student = (6 N_enc + 12 L T H "
            "+ 6 f N_head) x tokens (N_enc = L(4H² + 2HI) encoder matmul weights, embeddings excluded; LM head "
            "N_head = H² + VH only at the masked fraction f of the positions, f = mask_prob x the share of real, "
            f"non-special tokens = {fmt(_mask_frac(results), '.3f')}; see dwml/models/flops.py); total adds kd's teacher "
            "forwards. Measured: torch FlopCounterMode over one real training micro-step (all students, loss, "
            "backward) divided by the analytic count of the same batch; outer step = one DWML ω step in units of "
            "an inner step, times the number of outer steps; measured total = inner x steps + outer x outer steps.",
            "", cost_table(results), ""]
    exposure = exposure_table(results)
    if exposure:
        out += ["## Exposure (BabyLM rules)", "",
                "Whitespace words the training stream delivered (repeated passes counted), epochs of the train "
                "split, and a KD teacher's training words, which BabyLM counts toward the same budget "
                "(strict-small: 100M words, 10 epochs).", "", exposure, ""]
    return "\n".join(out)


def exposure_table(results: dict) -> str:
    """Words seen, epochs, teacher words and milestones written, per run (runs trained before dwml counted words
    have no row)."""
    rows = []
    for run in done_runs(results):
        e = run.get("exposure")
        if not e:
            continue
        teacher = e.get("teacher_words")
        rows.append([run["name"], run["method"], e.get("track", "none"), f"{e['words_seen']:,}", f"{e['epochs']:.2f}",
                     "–" if not teacher else f"{teacher:,}",
                     "n/a" if e.get("total_words") is None else f"{e['total_words']:,}",
                     str(len(e.get("milestones") or {}))])
    header = ["Run", "Method", "Track", "Words seen", "Epochs", "Teacher words", "Total words", "Milestones"]
    return md_table(header, rows) if rows else ""


def write_report(results: dict, out_dir: str | Path) -> Path:
    """figures/omega.png, figures/ablations.png (when there is something to plot) and report.md."""
    out_dir = Path(out_dir)
    figures = {}
    if plot_omega(results, out_dir / "figures" / "omega.png"):
        figures["omega"] = "figures/omega.png"
    if plot_ablations(results, out_dir / "figures" / "ablations.png"):
        figures["ablations"] = "figures/ablations.png"
    if plot_valid_curves(results, out_dir / "figures" / "valid_loss.png"):
        figures["valid_loss"] = "figures/valid_loss.png"
    if plot_blimp_fields(results, out_dir / "figures" / "blimp_fields.png"):
        figures["blimp_fields"] = "figures/blimp_fields.png"
    path = out_dir / "report.md"
    write_text(path, render_report(results, figures))
    return path
