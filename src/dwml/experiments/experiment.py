"""`dwml experiment CONFIG`: a whole comparison of methods on the same data and budget, evaluated and reported.

One TOML file describes the experiment (strict: an unknown key is an error naming the file and the key):

    name = "tiny"                    # report title
    out_dir = "runs/experiment-tiny" # the experiment directory (relative to the working directory)
    [prepare]                        # data: `dwml prepare` into OUT/data (inputs = [] -> ../shared/data/corpus) ...
    [data] prepared = "DIR"          # ... or reuse a prepared directory (then no [prepare])
    [base]                           # a RunConfig (data/model/train/distill tables) applied to every run
    [search]                         # `dwml search` settings -> OUT/peers.json, the peers of the runs below
    [[runs]]                         # name, method, optional teacher ("run:NAME" = another run of this file,
                                     # or a model/run directory), optional peers (k = the first k searched peers;
                                     # 0 = all of them for dml/dwml/kd_dwml, [base].model for the others), and
                                     # peer (k = the k-th searched peer alone: a baseline on that shape) and
                                     # optional data/model/train/distill tables overriding [base]
    [sweep]                          # base = "RUN"; axis = [values], one axis at a time: `peers` or any [distill]
                                     # field (alpha, learn_omega, ...); run "RUN-alpha0.3" etc.
    [eval]                           # zero-shot tasks, limit, scoring method, precision, ewok_pairing (`dwml eval`)
    [finetune]                       # enabled, models = "best"|"all", and any `dwml finetune` setting

The experiment directory holds data/ (if prepared here), peers.json, one run directory per run, eval_<run>.json,
finetune_<run>.json, timing_<run>.json, flops_<run>.json, results.json (every number of the report),
report.md and figures/*.png. Every stage is skipped when its output exists: re-running the command after an
interruption resumes the interrupted run (`dwml.training.train.train` resumes from its checkpoints) and redoes nothing
finished. A run directory holding another configuration is an error, never silently reused.

Same data and budget: every run trains on the same prepared data, with the same steps, batch size, gradient
accumulation and sequence length (all from [base]; the data stream is seeded by train.seed, so every run sees the
same batches and masks). Every student therefore sees the same tokens. A run that only teaches others (`teacher =
"run:NAME"`) may set its own train.max_steps: the report gives its budget apart, and its words count toward its
students' exposure, as BabyLM counts a teacher's data. Compute is *not* equalised: a run of M peers
trains M networks (plus, for DWML, an outer omega step every K steps) and kd runs a teacher forward. The report lists
tokens and analytic and measured FLOPs per run (Table 9) so these differences are visible next to the accuracies.

Sweeps vary one axis at a time around the base run (not a grid). A variant whose resolved configuration equals an
existing run's (e.g. alpha = the base's alpha) is not trained again: it points to that run ("alias"). peers = 1 on a
peer method is the single network without mutual learning: dml/dwml become mlm, kd_dwml becomes kd, on the first
searched peer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import require
from ..io import claim_dir, write_json
from ..training.setup import planned_words
from .collect import analytic_flops, collect, host_info, run_budget, teacher_arch_of
from .config import ExperimentConfig, load_experiment
from .plan import plan_runs
from .stages import ensure_data, ensure_peers, eval_stage, finetune_stage, prepared_dir, read_json_or_none, train_stage


def run_experiment(cfg: ExperimentConfig, *, only: list[str] | None = None, report_only: bool = False,
                   log: Callable[[str], None] | None = None) -> dict:
    """Run every stage that has no output yet, then write results.json, report.md and figures/. Returns results."""
    from .report import write_report

    log = log or (lambda s: print(f"[experiment] {s}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    host = host_info()
    exp_dir = claim_dir(cfg.out_dir, "experiment", legacy=("results.json", "peers.json", "data/meta.json"))
    if report_only:
        prepared = prepared_dir(cfg, exp_dir)
        require((prepared / "meta.json").is_file(), f"{prepared}: no prepared data; run the experiment first")
    else:
        prepared = ensure_data(cfg, exp_dir, log)
    from ..data.shards import load_meta

    vocab = int(load_meta(prepared)["vocab_size"])
    if report_only:  # nothing is searched or trained: the peers are those of peers.json, if any
        found = read_json_or_none(exp_dir / "peers.json")
        peer_archs = [p["arch"] for p in found["peers"]] if found else None
    else:
        peer_archs = ensure_peers(cfg, exp_dir, vocab, log)
    plans = plan_runs(cfg, exp_dir, prepared, peer_archs)
    if only:
        unknown = sorted(set(only) - {p.name for p in plans})
        require(not unknown, f"--only: unknown run(s) {unknown}; runs are {[p.name for p in plans]}")
    if not report_only:
        by_name = {p.name: p for p in plans}
        for plan in plans:
            if plan.alias_of:
                log(f"run {plan.name}: same configuration as {plan.alias_of} (not trained again)")
                continue
            if only and plan.name not in only:
                continue
            if plan.teacher_run:
                teacher = Path(by_name[plan.teacher_run].config.out_dir) / "final" / "summary.json"
                require(teacher.is_file(), f"run {plan.name}: its teacher run {plan.teacher_run!r} is not trained")
            summary = train_stage(plan, exp_dir, log)
            evaluation = eval_stage(cfg, plan, exp_dir, summary, log)
            finetune_stage(cfg, plan, exp_dir, summary, evaluation, log)
    log("collecting results, measuring FLOPs of one step per run")
    results = collect(cfg, plans, exp_dir, prepared, peer_archs, extra={"host": host})
    results["wall_time_s"] = time.perf_counter() - start
    if report_only:  # keep the wall time of the invocation that trained, which --report-only would otherwise lose
        before = read_json_or_none(exp_dir / "results.json") or {}
        results["trained_wall_time_s"] = before.get("trained_wall_time_s") or before.get("wall_time_s")
    try:
        results["host"]["load_avg_end"] = list(os.getloadavg())
    except OSError:
        pass
    write_json(exp_dir / "results.json", results)
    write_report(results, exp_dir)
    log(f"wrote {exp_dir / 'report.md'} ({results['wall_time_s']:.0f} s)")
    return results


# --------------------------------------------------------------------------------------------------------------
# Dry run: the plan and its compute, without data or training


def estimate(cfg: ExperimentConfig, mfu: float = 0.4) -> dict:
    """Analytic FLOPs and GPU hours of every planned run, from the configuration alone.

    Vocabulary: the prepared data's if it exists, else [prepare].vocab_size; tokens per sequence: seq_len (full
    packing); peers: OUT/peers.json if present, else searched now (not written).
    """
    from ..data.shards import load_meta
    from ..models.flops import H100_BF16_PEAK, gpu_hours

    exp_dir = Path(cfg.out_dir)
    prepared = prepared_dir(cfg, exp_dir)
    vocab = int(load_meta(prepared)["vocab_size"]) if (prepared / "meta.json").is_file() else cfg.prepare.vocab_size
    peer_archs = ensure_peers(cfg, exp_dir, vocab, lambda s: print(f"[experiment] {s}", file=sys.stderr),
                              write=False)
    plans = plan_runs(cfg, exp_dir, prepared, peer_archs)
    by_name = {p.name: p for p in plans}
    rows = []
    from ..models.memory import format_bytes, memory_limit, training_estimate
    from ..models.model import count_params
    from ..training.setup import resolve_archs

    device = "cuda" if any(p.config.train.device != "cpu" for p in plans) and _cuda() else "cpu"  # where they train
    limit, source = memory_limit(device)

    for plan in plans:
        budget = run_budget(plan.config, plan.config.data.seq_len)
        if plan.alias_of:
            rows.append({"name": plan.name, "method": plan.method, "alias_of": plan.alias_of, **budget})
            continue
        archs = resolve_archs(plan.config, vocab)
        teacher = teacher_arch_of(plan.config, vocab, by_name)
        fl = analytic_flops(plan, vocab, budget["tokens_per_student"], teacher)
        bf16 = plan.config.train.dtype == "bf16" or (plan.config.train.dtype == "auto" and device == "cuda")
        memory = training_estimate(plan.config, archs, device_type=device, bf16=bf16, teacher=teacher).total
        words = epochs = teacher_words = None
        if (prepared / "meta.json").is_file():
            words, epochs = planned_words(plan.config, prepared)
            if plan.teacher_run:  # a teacher trained in this experiment: its words count too
                teacher_words = planned_words(by_name[plan.teacher_run].config, prepared)[0]
        rows.append({"name": plan.name, "method": plan.method, "alias_of": None, **budget,
                     "words": words, "epochs": epochs, "teacher_words": teacher_words,
                     "params": [count_params(a) for _, a in archs], "archs": [a.name for _, a in archs],
                     "flops": fl["total"], "gpu_hours": gpu_hours(fl["total"], mfu), "memory_bytes": memory,
                     "memory": format_bytes(memory) + (" !" if limit is not None and memory > limit else "")})
    total = sum(r.get("flops", 0.0) for r in rows)
    return {"vocab_size": vocab, "mfu": mfu, "peak_flops": H100_BF16_PEAK, "runs": rows, "total_flops": total,
            "total_gpu_hours": gpu_hours(total, mfu), "memory_limit_bytes": limit,
            "memory_limit": f"{device}: " + ("no limit known" if limit is None else f"{format_bytes(limit)} {source}")}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def format_estimate(est: dict) -> str:
    lines = [f"vocab {est['vocab_size']}; GPU hours at {100 * est['mfu']:.0f}% MFU of "
             f"{est['peak_flops'] / 1e12:.1f} TFLOP/s (H100 SXM dense bf16); FLOPs are the analytic training "
             "FLOPs of every student (+ teacher forwards; LM heads at mask_prob of all positions, an upper "
             "bound), DWML outer steps not included"]
    lines.append("words: whitespace words seen by each student (one process; + its teacher's when trained here), "
                 "and epochs of the train split; n/a until the data is prepared")
    lines.append(f"memory: the estimated peak of each run (dwml.models.memory; ! = over the limit); limit on this "
                 f"machine {est['memory_limit']}")
    head = (f"{'run':<24}{'method':<9}{'steps':>8}{'tokens/student':>16}  {'students (params)':<40}{'FLOPs':>10}"
            f"{'GPU h':>8}{'memory':>12}{'words':>16}{'epochs':>8}")
    lines += [head, "-" * len(head)]
    for r in est["runs"]:
        if r["alias_of"]:
            lines.append(f"{r['name']:<24}{r['method']:<9}{'':>8}{'':>16}  = {r['alias_of']}")
            continue
        params = ", ".join(f"{p / 1e6:.1f}M" for p in r["params"])
        lines.append(f"{r['name']:<24}{r['method']:<9}{r['steps']:>8}{r['tokens_per_student']:>16,.0f}  "
                     f"{params:<40}{r['flops']:>10.2e}{r['gpu_hours']:>8.2f}{r['memory']:>12}"
                     + (f"{r['words']:>16,}{r['epochs']:>8.2f}" if r.get("words") is not None else f"{'n/a':>16}")
                     + (f"  + teacher {r['teacher_words']:,}" if r.get("teacher_words") else ""))
    lines.append(f"total {est['total_flops']:.3e} FLOPs = {est['total_gpu_hours']:.2f} GPU hours")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="run a full comparison of methods (train, evaluate, report.md + figures) from one config",
        description="Prepare data, search peers, train every run of CONFIG (same data and budget), evaluate and "
                    "fine-tune them, and write results.json, report.md and figures/ into the experiment directory. "
                    "Finished stages are skipped, so the same command resumes an interrupted experiment.",
    )
    p.add_argument("config", help="experiment TOML (see configs/experiment-tiny.toml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the experiment file, e.g. --set base.train.max_steps=50 (repeatable)")
    p.add_argument("--only", default="", help="comma-separated runs to train/evaluate now (the report has all)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs with their analytic FLOPs and GPU-hour estimate; train nothing")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for --dry-run (default: 0.4)")
    p.add_argument("--report-only", action="store_true", help="rebuild results.json and report.md from what exists")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_experiment(args.config, args.sets)
    if args.dry_run:
        require(0 < args.mfu <= 1, f"--mfu: expected a fraction in (0, 1], got {args.mfu}")
        print(format_estimate(estimate(cfg, args.mfu)))
        return 0
    only = [x.strip() for x in args.only.split(",") if x.strip()] or None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar for every model evaluated
    results = run_experiment(cfg, only=only, report_only=args.report_only)
    from .report import main_table

    print(main_table(results))
    print(f"\nwrote {Path(cfg.out_dir) / 'report.md'} in {results['wall_time_s']:.0f} s")
    return 0
