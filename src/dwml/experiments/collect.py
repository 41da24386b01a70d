"""Collecting an experiment's results: every run's summary, evaluation, fine-tuning, omega trajectory and budget.

`collect` gathers one record per run (`run_record`: losses, scores, tokens, analytic and measured FLOPs, timing) plus
the data statistics and the host, and writes results.json - every number of the report (`dwml.experiments.report`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from ..config import RunConfig
from ..training.metrics import read_records
from .config import ExperimentConfig
from .plan import PlannedRun, axis_values
from .stages import eval_settings, flops_stage, fresh_output, read_json_or_none


def omega_trajectory(run_dir: Path) -> dict:
    """{"outer_step": [0, 1, ...], "omega": [[...], ...], "mixed_ratio": [None, r1, ...]} from metrics.jsonl
    (outer step 0 = the initial omega; mixed_ratio = the centred |mixed| / |direct| of each outer step, None where
    it was not logged or undefined)."""
    steps, omegas, ratios = [], [], []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {"outer_step": [], "omega": []}
    for r in read_records(path):
        if r.get("step") == 0 and not steps and "omega" in r:
            steps.append(0)
            omegas.append(r["omega"])
            ratios.append(None)
        if "outer_step" in r:
            steps.append(int(r["outer_step"]))
            omegas.append(r["omega"])
            ratios.append(r.get("mixed_ratio"))
    if len(steps) == 1:  # no outer step was ever taken: no trajectory
        return {"outer_step": [], "omega": [], "mixed_ratio": []}
    return {"outer_step": steps, "omega": omegas, "mixed_ratio": ratios}


def valid_curve(run_dir: Path, n_students: int, budget: dict) -> dict:
    """{"tokens": [...], "loss": [[per student] per validation]} from metrics.jsonl: training positions per student
    (steps x batch x accumulation x sequence length) at each validation, for the loss-vs-tokens figure."""
    from ..training.plateau import valid_history

    history = valid_history(run_dir / "metrics.jsonl", n_students)
    per_step = budget["batch_size"] * budget["grad_accum"] * budget["seq_len"]
    steps = [s for s, _ in history[0]] if history else []
    return {"tokens": [s * per_step for s in steps], "loss": [[h[k][1] for h in history] for k in range(len(steps))]}


def blimp_fields(evaluation: dict | None, models: list[str]) -> dict:
    """{model: {"task", "fields": {field: accuracy %}}} of the first BLiMP task evaluated (pairs pooled per field:
    morphology, syntax, semantics, syntax-semantics, ...), for the per-field figure."""
    out = {}
    for name in models:
        tasks = ((evaluation or {}).get("models", {}).get(name) or {}).get("tasks", {})
        task = next((t for t in tasks if t.startswith("blimp") and t != "blimp_supplement" and "fields" in tasks[t]),
                    None)
        if task:
            out[name] = {"task": task, "fields": {f: c["accuracy"] for f, c in tasks[task]["fields"].items()}}
    return out


def median_or_none(values: list) -> float | None:
    """Median of the numbers among `values` (None entries skipped); None if there are none."""
    import statistics

    xs = [float(v) for v in values if v is not None]
    return statistics.median(xs) if xs else None


def data_stats(prepared: Path, seq_lens: Iterable[int]) -> dict[int, dict]:
    """{seq_len: statistics of the prepared data packed at seq_len} for every length in `seq_lens`; meta.json and the
    train split's unigram entropy (computed from the shard for data prepared before meta.json held it) are read
    and computed once for all lengths."""
    from ..data.entropy import train_unigram_entropy
    from ..data.shards import PackedSequences, load_meta

    meta = load_meta(prepared)
    splits = meta.get("splits", {})
    entropy = train_unigram_entropy(prepared, meta)
    out = {}
    for seq_len in dict.fromkeys(seq_lens):
        lengths = PackedSequences(prepared, "train", seq_len).lengths()
        out[seq_len] = {
            "prepared": str(prepared),
            "vocab_size": int(meta["vocab_size"]),
            "train_tokens": splits.get("train", {}).get("tokens"),
            "train_words": splits.get("train", {}).get("words"),
            "valid_tokens": splits.get("valid", {}).get("tokens"),
            "train_sequences": int(len(lengths)),
            "mean_sequence_length": float(lengths.mean()),
            "unigram_entropy": entropy,
            # Share of the B x T positions that can be masked (real, non-special tokens): the masked fraction of
            # the positions is mask_prob times this.
            "maskable_fraction": splits.get("train", {}).get("tokens", 0) / (len(lengths) * seq_len),
        }
    return out


def run_budget(rc: RunConfig, mean_len: float) -> dict:
    """What every student of the run processes. tokens_per_student counts the positions computed on, B x T per
    sequence (a batch is padded to its longest sequence, which is T in practice: packing fills most sequences);
    real_tokens_per_student the non-pad tokens among them (mean packed length `mean_len`)."""
    t = rc.train
    sequences = t.max_steps * t.batch_size * t.grad_accum
    return {"steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seq_len": rc.data.seq_len,
            "sequences_per_student": sequences, "tokens_per_student": sequences * rc.data.seq_len,
            "real_tokens_per_student": sequences * mean_len}


def analytic_flops(plan: PlannedRun, vocab_size: int, tokens: float, teacher_arch=None,
                   maskable: float = 1.0) -> dict:
    """`run_flops` of the run; the LM heads run at mask_prob x `maskable` (real, non-special share) of the
    positions (1.0 when the data are unknown: an upper bound)."""
    from ..models.flops import run_flops
    from ..training.setup import resolve_archs

    rc = plan.config
    archs = [a for _, a in resolve_archs(rc, vocab_size)]
    n_aux = 0
    if plan.method == "sd":
        n_aux = len(rc.distill.sd_layers) or archs[0].layers - 1
    mask_frac = rc.data.mask_prob * maskable
    out = run_flops(archs, tokens, rc.data.seq_len, mask_frac, teacher=teacher_arch, sd_heads=n_aux)
    return {**out, "mask_frac": mask_frac}


def teacher_arch_of(rc: RunConfig, vocab_size: int, plans_by_name: dict[str, PlannedRun]):
    """The teacher's Arch: from its planned run, or from a model directory's config.json."""
    if rc.train.method not in ("kd", "kd_dwml"):
        return None
    from ..training.setup import resolve_archs

    name = Path(rc.distill.teacher).name
    if name in plans_by_name and Path(plans_by_name[name].config.out_dir) == Path(rc.distill.teacher):
        return resolve_archs(plans_by_name[name].config, vocab_size)[0][1]
    from ..models.search import resolve_reference

    p = Path(rc.distill.teacher)
    return resolve_reference(str(p / "final" / "peer0" if (p / "final" / "peer0").is_dir() else p))


def run_record(plan: PlannedRun, summary: dict | None, evaluation: dict | None, finetune: dict | None,
               timing: dict | None, measured: dict | None, budget: dict, analytic: dict) -> dict:
    from .analysis import best_model, model_rows

    rc = plan.config
    rec: dict[str, Any] = {
        "name": plan.name,
        "method": plan.method,
        "alias_of": plan.alias_of,
        "sweep": plan.sweep,
        "teacher": rc.distill.teacher or None,
        "teacher_run": plan.teacher_run,  # the run of this experiment that teaches this one, if any
        "budget": budget,
        "status": "done" if summary else "not trained",
    }
    if plan.alias_of or not summary:
        return rec
    rows = model_rows(summary, evaluation, finetune)
    n_students = len(summary["peers"])
    rec.update({
        "axes": axis_values(plan, n_students),
        "n_students": n_students,
        "omega": summary["omega"],
        "omega_learned": bool(summary.get("omega_learned")),
        "omega_trajectory": omega_trajectory(Path(rc.out_dir)),
        "valid_curve": valid_curve(Path(rc.out_dir), n_students, budget),
        "blimp_fields": blimp_fields(evaluation, [r["name"] for r in rows]),
        "unroll": rc.distill.unroll,
        "valid_ensemble_loss": summary.get("valid_ensemble_loss"),
        "models": rows,
        "best": best_model(rows),
        "timing": timing,
        "exposure": summary.get("exposure"),
    })
    rec["mixed_ratio_median"] = median_or_none(rec["omega_trajectory"].get("mixed_ratio", []))
    outer_steps = rc.train.max_steps // rc.distill.outer_every if rec["omega_learned"] else 0
    fl = {"analytic_per_student": analytic["per_student"], "analytic_teacher_forward": analytic["teacher_forward"],
          "analytic_total": analytic["total"], "mask_frac": analytic["mask_frac"], "outer_steps": outer_steps}
    if measured:
        per_step = measured["measured_micro_step"] * measured["micro_steps_per_step"]
        outer = measured.get("measured_outer_step") or 0
        fl.update({k: measured[k] for k in ("measured_micro_step", "analytic_micro_step", "ratio",
                                            "measured_outer_step", "micro_batch", "n_masked")})
        # The counted step is one micro-batch of the first batch; a step has grad_accum of them.
        fl["measured_total"] = per_step * rc.train.max_steps + outer * outer_steps
    rec["flops"] = fl
    return rec


def collect(cfg: ExperimentConfig, plans: list[PlannedRun], exp_dir: Path, prepared: Path,
            peer_archs: list[dict] | None, extra: dict | None = None) -> dict:
    """results.json from whatever the stages left in the experiment directory."""
    seq_len = plans[0].config.data.seq_len
    stats_by_len = data_stats(prepared, [seq_len] + [p.config.data.seq_len for p in plans])
    stats = stats_by_len[seq_len]
    vocab = stats["vocab_size"]
    by_name = {p.name: p for p in plans}
    runs, evaluations = [], {}
    for plan in plans:
        run_dir = Path(plan.config.out_dir)
        summary = read_json_or_none(run_dir / "final" / "summary.json") if not plan.alias_of else None
        own = stats_by_len[plan.config.data.seq_len]
        budget = run_budget(plan.config, own["mean_sequence_length"])
        analytic = analytic_flops(plan, vocab, budget["tokens_per_student"],
                                  teacher_arch_of(plan.config, vocab, by_name), own["maskable_fraction"])
        measured = flops_stage(plan, exp_dir) if summary else None
        evaluations[plan.name] = fresh_output(exp_dir / f"eval_{plan.name}.json", plan)
        runs.append(run_record(plan, summary, evaluations[plan.name],
                               fresh_output(exp_dir / f"finetune_{plan.name}.json", plan),
                               fresh_output(exp_dir / f"timing_{plan.name}.json", plan), measured, budget, analytic))
    from .analysis import omega_correlation

    results = {
        "name": cfg.name,
        "description": cfg.description,
        "config_file": cfg.source,
        "out_dir": str(exp_dir),
        "data": stats,
        "search": read_json_or_none(exp_dir / "peers.json") if peer_archs is not None else None,
        "eval": {**eval_settings(cfg), "peers": cfg.eval.peers} if cfg.eval.enabled else None,
        "reference": reference_lines(cfg, prepared),
        "finetune": ({"tasks": list(cfg.finetune.tasks), "epochs": cfg.finetune.epochs,
                      "max_train_examples": cfg.finetune.max_train_examples,
                      "max_eval_examples": cfg.finetune.max_eval_examples, "models": cfg.finetune.models}
                     if cfg.finetune.enabled else None),
        "runs": runs,
        "config": cfg.raw,
        **(extra or {}),
    }
    results["correlation"] = omega_correlation(results)
    from ..evaluation.stats import significance_vs_mlm

    results["significance"] = significance_vs_mlm(runs, evaluations)
    from .comparison import compare_models

    results["comparisons"] = compare_models(runs, evaluations)
    return results


def reference_lines(cfg: ExperimentConfig, prepared: Path) -> dict | None:
    """The unigram and KN-trigram lines of the train split's token counts on the evaluated minimal-pair tasks
    (`dwml.evaluation.reference`; cached under PREPARED/reference/, so computed once per data and eval set)."""
    if not cfg.eval.enabled:
        return None
    from ..evaluation.reference import reference_results

    e = cfg.eval
    return reference_results(prepared, e.tasks, limit=e.limit or None, ewok_pairing=e.ewok_pairing)


def host_info() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info
