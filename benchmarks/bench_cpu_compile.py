"""torch.compile on the CPU: the trainer's bf16 MLM step eager against compiled (inductor) (issue 18, item 3); fp32 on a
CPU without bf16 matmul kernels (AVX2 only), as the trainer runs it there.

Two Trainers from the same seed (same weights, same batches), one with `train.compile=true`. The compiled one's
first steps pay for compiling (printed: the seconds a 30-minute run loses once, and again for the first validation);
then the arms alternate over `--reps` rounds of `--steps` steps so that a shared machine's drift hits both alike,
and the per-step times and their ratio measured in this run are printed, with the first step's loss of each arm
(they train the same function: inductor reorders bf16 arithmetic, so the losses agree to a few 1e-3, not bit-exact).

    PYTHONPATH=src python3 benchmarks/bench_cpu_compile.py [--preset mini] [--steps 10] [--reps 3]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import cpu_bf16_arm, cpu_step_arguments, make_trainer, modernbert_peer, synthetic_prepared, time_steps


def main() -> int:
    ap = cpu_step_arguments(__doc__, steps=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=6, help="steps each arm runs before timing (compiling included)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peer = modernbert_peer(args.preset)
    dtype = "bf16" if cpu_bf16_arm("the compiled step") else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        prepared = synthetic_prepared(Path(tmp) / "data", 8192, 1_000_000)
        runs, first, warm = {}, {}, {}
        for compiled in (False, True):
            runs[compiled] = make_trainer(prepared, "mlm", [peer], batch_size=args.batch_size, seq_len=args.seq_len,
                                          device="cpu", model={"family": "modernbert", "dropout": 0.0},
                                          train={"dtype": dtype, "lr": 2e-3, "seed": 0, "compile": compiled},
                                          data={"mask_prob": 0.3})
            t0 = time.perf_counter()
            first[compiled] = float(runs[compiled].train_step().parts["ce"][0])
            time_steps(runs[compiled], args.warmup - 1, warmup=0)  # later masks change shapes: recompiles
            warm[compiled] = time.perf_counter() - t0
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.reps):
            for compiled in (False, True):
                times[compiled].append(time_steps(runs[compiled], args.steps, warmup=0).seconds)
    eager, comp = statistics.median(times[False]), statistics.median(times[True])
    precision = "bf16 autocast" if dtype == "bf16" else "fp32"
    print(f"{args.preset} ModernBERT MLM, {precision}, batch {args.batch_size} x {args.seq_len}, {args.threads} "
          f"threads; median of {args.reps} rounds of {args.steps} steps, arms alternating")
    print(f"first {args.warmup} steps: eager {warm[False]:.1f} s, compiled {warm[True]:.1f} s "
          f"(compiling: {warm[True] - warm[False]:.1f} s)")
    print(f"eager    : {eager:.3f} s/step  rounds {', '.join(f'{t:.3f}' for t in times[False])}")
    print(f"compiled : {comp:.3f} s/step  rounds {', '.join(f'{t:.3f}' for t in times[True])}")
    print(f"compiled / eager step time {comp / eager:.3f} (speed-up {eager / comp:.2f}x), measured in this run")
    print(f"first step from the same weights and batch: loss {first[False]:.5f} eager vs {first[True]:.5f} compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
