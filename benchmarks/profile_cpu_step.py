"""Where a CPU training step goes (issue 18, item 3): fp32 against bf16 autocast, by operator class.

One MLM step of the trainer itself (ModernBERT, the CPU recipe's shape, synthetic data with the real vocabulary
size) is timed in fp32 and in bf16 autocast over the same batches, then torch.profiler splits each arm's self CPU
time into matmuls (aten::mm / addmm / bmm / matmul / linear / SDPA kernels), dtype casts (aten::to / _to_copy /
copy_: what autocast adds) and everything else (elementwise, norms, softmax, optimizer, indexing). Prints the
table, the matmul peaks of this CPU (fp32 and bf16 1024^3) and the bf16 / fp32 step ratio measured in this run.

    PYTHONPATH=src python3 benchmarks/profile_cpu_step.py [--preset mini] [--steps 12] [--threads 2]
"""
from __future__ import annotations

import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchlib import (cpu_bf16_arm, cpu_step_arguments, make_trainer, matmul_peak, modernbert_peer, synthetic_prepared,
                      time_steps)

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot_product",
          "mkldnn", "onednn", "aten::baddbmm")
CAST = ("aten::to", "aten::_to_copy", "aten::copy_")


def classify(name: str) -> str:
    if name.startswith(MATMUL):
        return "matmul"
    return "cast" if name in CAST else "other"


def profile_arm(run, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(run, steps, warmup=0)
    classes: dict[str, float] = defaultdict(float)
    ops = []
    for e in prof.key_averages():
        classes[classify(e.key)] += e.self_cpu_time_total / 1e6 / steps
        ops.append((e.key, e.self_cpu_time_total / 1e6 / steps))
    return classes, sorted(ops, key=lambda x: -x[1])[:8]


def main() -> int:
    ap = cpu_step_arguments(__doc__, steps=12)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peer = modernbert_peer(args.preset)
    cpu = torch.device("cpu")
    print(f"matmul peak, 1024^3, per process CPU second: fp32 {matmul_peak(cpu, 1024, torch.float32) / 1e9:.0f} "
          f"GFLOP/s, bf16 {matmul_peak(cpu, 1024, torch.bfloat16) / 1e9:.0f} GFLOP/s ({args.threads} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = synthetic_prepared(Path(tmp) / "data", args.vocab, 2_000_000)
        rows = {}
        for dtype in ("fp32", "bf16") if cpu_bf16_arm("the step") else ("fp32",):
            run = make_trainer(prepared, "mlm", [peer], batch_size=args.batch_size, seq_len=args.seq_len,
                               device="cpu", model={"family": "modernbert", "dropout": 0.0},
                               train={"dtype": dtype, "lr": 2e-3}, data={"mask_prob": 0.3})
            time_steps(run, 3, warmup=0)  # warm-up: allocator, oneDNN primitive caches
            timing = time_steps(run, args.steps, warmup=0)
            classes, top = profile_arm(run, args.steps)
            rows[dtype] = (timing, classes, top)
    print(f"\n{args.preset} ModernBERT MLM, batch {args.batch_size} x {args.seq_len}, mask 30%, {args.steps} steps")
    print(f"{'arm':<6}{'s/step':>9}{'tokens/s':>10}{'matmul s':>10}{'cast s':>9}{'other s':>9}{'matmul %':>10}")
    for dtype, (t, c, _) in rows.items():
        total = sum(c.values())
        print(f"{dtype:<6}{t.seconds:>9.3f}{t.tokens / t.seconds:>10,.0f}{c['matmul']:>10.3f}{c['cast']:>9.3f}"
              f"{c['other']:>9.3f}{100 * c['matmul'] / max(total, 1e-12):>9.0f}%")
    if "bf16" in rows:
        print(f"bf16 / fp32 step time: {rows['bf16'][0].seconds / rows['fp32'][0].seconds:.3f} "
              f"(speed-up {rows['fp32'][0].seconds / rows['bf16'][0].seconds:.2f}x), measured in this run")
    for dtype, (_, _, top) in rows.items():
        print(f"\n{dtype}: top operators by self CPU s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
