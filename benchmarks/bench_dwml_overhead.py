"""DWML's cost over training the same peers independently, measured in one run on the CPU.

Both arms run the trainer's own step (`dwml.train.Trainer.train_step`, and for DWML `outer_step` every K steps as
the loop runs it) on the same prepared data, peers, batches and number of steps:
  independent: method "mlm" with the peers (each peer its own loss, no coupling, no outer steps);
  dwml:        method "dwml" at the default K (eq. 2 inner loss + an outer omega step every K steps, eq. 3-4).
The arms alternate `--repeats` times and the fastest of each is kept. Reported per step: wall time and the process's
CPU time (on a shared machine the CPU time is the reliable one: it does not count time spent waiting for a core).
Also prints the training throughput (tokens/s) of the tiny preset as a single MLM.

    python benchmarks/bench_dwml_overhead.py [--steps 60] [--peers 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench_outer_modes import peer_tables
from benchlib import make_trainer, time_steps
from dwml.config import DistillConfig
from dwml.model import get_preset
from dwml.prepare import default_corpus_path, prepare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per arm and repeat (a multiple of K)")
    ap.add_argument("--peers", type=int, default=3, help="use the first P of --hidden")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", default="64,48,32",
                    help="hidden sizes of the peers (2 layers, head width 32, intermediate 4x); default: below tiny")
    ap.add_argument("--prepared", help="prepared data dir (default: prepare 20k docs of ../shared/data/corpus)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prepared = Path(args.prepared) if args.prepared else Path(tempfile.mkdtemp(prefix="bench_dwml_")) / "data"
    if not args.prepared:
        prepare([default_corpus_path()], prepared, vocab_size=8192, max_docs=20000)
    peers = peer_tables([(2, int(h)) for h in args.hidden.split(",")], 32)[: args.peers]
    K = DistillConfig().outer_every
    best: dict[str, list[float]] = {}
    timing = None
    for r in range(args.repeats):
        for arm, method in (("independent", "mlm"), ("dwml", "dwml")):
            run = make_trainer(prepared, method, peers, batch_size=args.batch_size, seq_len=args.seq_len)
            try:
                timing = time_steps(run, args.steps, warmup=3)
            finally:
                run.close()
            wall, cpu = best.get(arm, [float("inf")] * 2)
            best[arm] = [min(wall, timing.seconds), min(cpu, timing.cpu_seconds)]
            print(f"  repeat {r} {arm:<12} {timing.seconds * 1000:8.1f} ms/step wall, "
                  f"{timing.cpu_seconds * 1000:8.1f} ms/step CPU", flush=True)
    run = make_trainer(prepared, "mlm", [get_preset("tiny").to_dict()], batch_size=args.batch_size,
                       seq_len=args.seq_len)
    try:
        tiny = time_steps(run, max(10, args.steps // 2), warmup=3)
    finally:
        run.close()
    wall_ratio = best["dwml"][0] / best["independent"][0]
    cpu_ratio = best["dwml"][1] / best["independent"][1]
    tokens = timing.tokens
    print(f"\npeers {args.peers} ({', '.join(str(p['hidden']) for p in peers)} hidden), K = {K}, "
          f"batch {args.batch_size} x {args.seq_len}, {args.steps} steps, {torch.get_num_threads()} threads")
    for arm in ("independent", "dwml"):
        wall, cpu = best[arm]
        print(f"{arm:<12}: {wall * 1000:8.1f} ms/step wall ({tokens / wall:,.0f} tokens/s), "
              f"{cpu * 1000:8.1f} ms/step CPU ({tokens / cpu:,.0f} tokens/CPU-s)")
    print(f"DWML overhead ratio: {cpu_ratio:.3f}x CPU time, {wall_ratio:.3f}x wall time  (target <= 1.10x)")
    print(f"tiny preset MLM training throughput: {tiny.tokens / tiny.seconds:,.0f} tokens/s wall, "
          f"{tiny.tokens / tiny.cpu_seconds:,.0f} tokens/CPU-s")
    return 0 if cpu_ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
