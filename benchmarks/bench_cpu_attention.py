"""bf16 attention on the CPU: SDPA's flash kernel against its math backend in the trainer's own MLM step (issue 18).

`Runtime.autocast` runs bf16 attention on the CPU through the math backend (`cpu_math_attention`); this benchmark
times the same Trainer with it on and off, alternating the arms over `--reps` rounds so that a shared machine's
drift hits both alike, and prints the per-step times and the ratio measured in this run. Both arms start from the
same weights and batch, and the first step's loss and gradient norm are compared (they train the same function).

    PYTHONPATH=src python3 benchmarks/bench_cpu_attention.py [--preset mini] [--steps 6] [--reps 3]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchlib import cpu_bf16_arm, cpu_step_arguments, make_trainer, modernbert_peer, synthetic_prepared, time_steps


def first_step(prepared: Path, peer: dict, args, math: bool) -> tuple[float, float]:
    run = trainer(prepared, peer, args)
    run.rt.cpu_math_attention = math
    stats = run.train_step()
    return float(stats.parts["ce"][0]), float(stats.grad_norms[0])


def trainer(prepared: Path, peer: dict, args):
    return make_trainer(prepared, "mlm", [peer], batch_size=args.batch_size, seq_len=args.seq_len, device="cpu",
                        model={"family": "modernbert", "dropout": 0.0},
                        train={"dtype": "bf16", "lr": 2e-3, "seed": 0}, data={"mask_prob": 0.3})


def main() -> int:
    ap = cpu_step_arguments(__doc__, steps=6)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peer = modernbert_peer(args.preset)
    if not cpu_bf16_arm("nothing (the math backend is a bf16 choice)"):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        prepared = synthetic_prepared(Path(tmp) / "data", 8192, 1_000_000)
        (loss_f, norm_f), (loss_m, norm_m) = (first_step(prepared, peer, args, m) for m in (False, True))
        run = trainer(prepared, peer, args)
        times: dict[bool, list[float]] = {False: [], True: []}
        for math in (False, True):  # warm-up: oneDNN primitive caches of both paths
            run.rt.cpu_math_attention = math
            time_steps(run, 2, warmup=0)
        for _ in range(args.reps):
            for math in (False, True):
                run.rt.cpu_math_attention = math
                times[math].append(time_steps(run, args.steps, warmup=0).seconds)
    flash, math = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.preset} ModernBERT MLM, bf16 autocast, batch {args.batch_size} x {args.seq_len}, {args.threads} "
          f"threads; median of {args.reps} rounds of {args.steps} steps, arms alternating")
    print(f"flash kernel : {flash:.3f} s/step  rounds {', '.join(f'{t:.3f}' for t in times[False])}")
    print(f"math backend : {math:.3f} s/step  rounds {', '.join(f'{t:.3f}' for t in times[True])}")
    print(f"math / flash step time {math / flash:.3f} (speed-up {flash / math:.2f}x), measured in this run")
    print(f"first step from the same weights and batch: loss {loss_f:.5f} vs {loss_m:.5f}, "
          f"grad norm {norm_f:.4f} vs {norm_m:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
