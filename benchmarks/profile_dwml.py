"""Where DWML's time goes over the same peers trained independently: a phase breakdown and a torch.profiler diff.

Both arms are the trainer's own phases on the same peers, batches and synthetic data: independent = method "mlm"
with the peers (each peer its own CE), dwml = eq. (2) inner loss + the outer omega step every K steps. Prints
CPU ms per step (process CPU time: robust on a shared machine) of the inner step of each arm and of the outer step
amortised over K, then the operators whose self time differs most between the arms (torch.profiler, same steps;
its times are wall clock, so on a busy machine read them as proportions).

    python benchmarks/profile_dwml.py [--steps 40] [--hidden 64,48,32] [--batch-size 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_outer_modes import peer_tables
from benchlib import make_trainer, synthetic_prepared, time_steps


def op_times(run, steps: int) -> dict[str, float]:
    """Self CPU seconds per operator over `steps` loop steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(run, steps, warmup=0)
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        out[e.key] += e.self_cpu_time_total / 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="64,48,32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per arm (a multiple of K covers outer steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peers = peer_tables([(2, int(h)) for h in args.hidden.split(",")], 32)
    prepared = synthetic_prepared(Path(tempfile.mkdtemp(prefix="profile_dwml_")) / "data", args.vocab_size,
                                  train_tokens=(args.steps * 3 + 50) * args.batch_size * args.seq_len)
    arms, ops = {}, {}
    for arm, method in (("independent", "mlm"), ("dwml", "dwml")):
        run = make_trainer(prepared, method, peers, batch_size=args.batch_size, seq_len=args.seq_len)
        try:
            k = run.cfg.distill.outer_every
            inner = time_steps(run, args.steps, warmup=5, outer=False).cpu_seconds
            whole = time_steps(run, max(args.steps, k), warmup=0).cpu_seconds
            ops[arm] = op_times(run, max(args.steps, k))
            arms[arm] = (inner, whole)
        finally:
            run.close()
    (ind, _), (dw_inner, dw_whole) = arms["independent"], arms["dwml"]
    print(f"{len(peers)} peers (hidden {args.hidden}), batch {args.batch_size} x {args.seq_len}, vocab "
          f"{args.vocab_size}, K = {k}, {torch.get_num_threads()} threads")
    print("CPU time per step:")
    print(f"independent step           : {ind * 1000:8.2f} ms")
    print(f"dwml inner step            : {dw_inner * 1000:8.2f} ms  ({dw_inner / ind:.3f}x independent)")
    print(f"dwml outer step, amortised : {(dw_whole - dw_inner) * 1000:8.2f} ms  "
          f"(+{100 * (dw_whole - dw_inner) / ind:.1f}% of an independent step)")
    print(f"dwml whole loop            : {dw_whole * 1000:8.2f} ms  ({dw_whole / ind:.3f}x independent)")
    n = max(args.steps, k)
    keys = set(ops["independent"]) | set(ops["dwml"])
    diff = sorted(keys, key=lambda x: ops["dwml"].get(x, 0) - ops["independent"].get(x, 0), reverse=True)
    print(f"\noperators by extra self CPU time in dwml (wall ms per step, profiler on, {n} steps each):")
    print(f"{'operator':<44}{'independent':>12}{'dwml':>10}{'extra':>10}")
    for key in diff[: args.top]:
        a, b = ops["independent"].get(key, 0) / n * 1000, ops["dwml"].get(key, 0) / n * 1000
        print(f"{key[:43]:<44}{a:12.2f}{b:10.2f}{b - a:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
