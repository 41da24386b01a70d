"""Compact summary of a `dwml experiment configs/gpu-compare-9min.toml` directory, with issue 9's acceptance checks.

    python benchmarks/gpu_summary.py EXP_DIR --wall S [--rc RC] [--since EPOCH] [--wall-limit 540]

Reads EXP_DIR/results.json (and eval_<run>.json for evaluation seconds, peers.json); where there is no results.json
(the experiment was stopped before its report), lists what did finish. `--wall` is the wall time measured around the
experiment by benchmarks/gpu_session.sh; `--since` (Unix time) flags a results.json older than this call. Prints
only numbers found in those files; the acceptance lines compare them with issue 9's targets:
wall <= 540 s, MLM valid loss <= 4.5 nats, MLM BLiMP-filtered >= 62%.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = (("blimp_filtered", "BLiMP"), ("blimp_supplement", "Supplement"), ("ewok", "EWoK"))
MLM_VALID_MAX = 4.5
MLM_BLIMP_MIN = 62.0


def read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def eval_seconds(exp: Path, run: str) -> dict:
    ev = read(exp / f"eval_{run}.json") or {}
    return {m: r.get("seconds") for m, r in ev.get("models", {}).items()}


def loop_stats(run_dir: Path) -> str:
    """The training loop's own records (RUN/metrics.jsonl): last step, last validation, median logged tokens_per_s
    (the stream's tokens per second of a log window; a torn last line, as a killed run leaves, is skipped)."""
    steps, valid, tps = [], None, []
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        steps.append(r.get("step", 0))
        if "valid_loss" in r:
            valid = (r["step"], r["valid_loss"])
        if r.get("tokens_per_s") and r.get("step", 0) > 0:
            tps.append(r["tokens_per_s"])
    out = f"last step {max(steps)}" if steps else "no steps"
    if valid:
        out += f", valid loss at step {valid[0]}: " + ", ".join(f"{v:.3f}" for v in valid[1])
    if tps:
        out += f", metrics tokens_per_s median {sorted(tps)[len(tps) // 2]:,.0f} ({len(tps)} windows)"
    return out


def partial(exp: Path) -> list[str]:
    """What finished, from the files of an experiment that wrote no results.json."""
    lines = []
    peers = read(exp / "peers.json")
    lines.append(f"peers.json: {'yes' if peers else 'no'}"
                 + (f" (search {peers['wall_time_s']:.0f} s)" if peers and "wall_time_s" in peers else ""))
    for run_dir in sorted(p for p in exp.iterdir() if (p / "config.toml").is_file()):
        summary = read(run_dir / "final" / "summary.json")
        timing = read(exp / f"timing_{run_dir.name}.json")
        secs = eval_seconds(exp, run_dir.name)
        state = "trained" if summary else "not finished"
        if timing:
            state += f" in {timing['wall_s']:.0f} s"
        if loop_stats(run_dir):
            state += "; " + loop_stats(run_dir)
        state += f"; evaluated ({sum(v or 0 for v in secs.values()):.0f} s)" if secs else "; not evaluated"
        lines.append(f"run {run_dir.name}: {state}")
    return lines


def summarize(exp: Path, wall: float | None, rc: int | None, since: float | None, wall_limit: float) -> list[str]:
    out = []
    head = f"compare: exit {rc}" if rc is not None else "compare:"
    if wall is not None:
        head += f", {wall:.0f} s wall (measured around `dwml experiment` by gpu_session.sh)"
    out.append(head)
    path = exp / "results.json"
    results = read(path)
    if results is not None and since is not None and path.stat().st_mtime < since:
        out.append(f"NOTE: {path} predates this call (an earlier call's report): its numbers are not this call's")
    if results is None:
        out.append(f"no {path}: the experiment did not get to its report")
        if exp.is_dir():
            out += partial(exp)
        out.append("acceptance (issue 9): not decided (no results)")
        return out
    host = results.get("host", {})
    out.append(f"host: {host.get('gpu', 'no GPU')}, torch {host.get('torch')}, python {host.get('python')}, "
               f"{host.get('cpus')} CPUs" + (f"; experiment's own wall_time_s {results['wall_time_s']:.0f} s"
                                             if rc == 0 and results.get("wall_time_s") is not None else
                                             "; report rebuilt by --report-only from what finished"))
    data = results.get("data", {})
    out.append(f"data: vocab {data.get('vocab_size')}, {data.get('train_tokens')} train tokens, unigram entropy "
               f"{fmt(data.get('unigram_entropy'), '.3f')} nats")
    search = results.get("search") or {}
    if search.get("peers"):
        out.append("peers: " + ", ".join(f"L{p['arch']['layers']}-H{p['arch']['hidden']} {p['params'] / 1e6:.1f}M"
                                         for p in search["peers"])
                   + (f" (search {search['wall_time_s']:.0f} s)" if "wall_time_s" in search else ""))
    mlm = None
    for run in results.get("runs", []):
        stats = loop_stats(exp / run["name"])
        if run.get("status") != "done":
            out.append(f"run {run['name']} ({run['method']}): {run.get('status')}" + (f"; {stats}" if stats else ""))
            continue
        timing = run.get("timing") or {}
        tokens = run.get("budget", {}).get("tokens_per_student")
        line = f"run {run['name']} ({run['method']}, {run.get('n_students')} students)"
        if timing.get("wall_s"):
            line += f": trained in {timing['wall_s']:.1f} s"
            if tokens:
                line += f" = {tokens / timing['wall_s']:,.0f} tokens/s per student"
            if timing.get("resumed"):
                line += " (resumed: part of the training was done by an earlier call)"
            if timing.get("gpu_util_mean") is not None:
                line += f", GPU util {timing['gpu_util_mean']:.0f}%"
            if timing.get("gpu_mem_max_mib") is not None:
                line += f", GPU memory max {timing['gpu_mem_max_mib']:,.0f} MiB"
        out.append(line + (f"; {stats}" if stats else ""))
        secs = eval_seconds(exp, run["name"])
        for m in run.get("models", []):
            zs = m.get("zero_shot", {})
            out.append(f"  {m['name']:<9}{m.get('arch', ''):<22} valid {fmt(m.get('valid_loss'), '.3f')}  plateau exit "
                       f"{m.get('plateau_exit_step') if m.get('plateau_exit_step') is not None else '-'}  "
                       + "  ".join(f"{label} {fmt(zs.get(t))}" for t, label in TASKS)
                       + (f"  eval {secs[m['name']]:.1f} s" if secs.get(m["name"]) is not None else ""))
        if run["method"] == "mlm" and mlm is None:
            mlm = run["models"][0]
    sig = results.get("significance") or {}
    for r in sig.get("rows", []):
        out.append(f"  vs mlm: {r['run']}/{r['model']} {r['task']}: {r['diff']:+.2f} points "
                   f"[{r['low']:+.2f}, {r['high']:+.2f}] {'exceeds noise' if r.get('significant') else 'within noise'}")
    checks = []
    if wall is not None:
        if rc in (124, 137):
            verdict = f"FAIL (stopped by the timeout after {wall:.0f} s)"
        elif rc not in (0, None):
            verdict = f"n/a (the experiment failed, exit {rc})"
        else:
            verdict = f"{'PASS' if wall <= wall_limit else 'FAIL'} ({wall:.0f} s)"
        checks.append(f"wall <= {wall_limit:.0f} s: {verdict}")
    if mlm is not None:
        v, b = mlm.get("valid_loss"), mlm.get("zero_shot", {}).get("blimp_filtered")
        checks.append(f"MLM valid loss <= {MLM_VALID_MAX}: "
                      + ("n/a" if v is None else f"{'PASS' if v <= MLM_VALID_MAX else 'FAIL'} ({v:.3f})"))
        checks.append(f"MLM BLiMP-filtered >= {MLM_BLIMP_MIN:.0f}%: "
                      + ("n/a" if b is None else f"{'PASS' if b >= MLM_BLIMP_MIN else 'FAIL'} ({b:.1f})"))
    else:
        checks.append("MLM: not trained")
    out.append("acceptance (issue 9): " + "; ".join(checks))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp_dir")
    ap.add_argument("--wall", type=float, default=None, help="seconds, measured around the experiment")
    ap.add_argument("--rc", type=int, default=None, help="the experiment's exit status")
    ap.add_argument("--since", type=float, default=None, help="Unix time this call started")
    ap.add_argument("--wall-limit", type=float, default=540.0)
    args = ap.parse_args(argv)
    print("\n".join(summarize(Path(args.exp_dir), args.wall, args.rc, args.since, args.wall_limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
