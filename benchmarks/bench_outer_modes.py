"""Cost of DWML's outer omega step per `distill.hypergrad` mode, in units of one inner DWML step, in one run.

The three modes compute the same exact hypergradient of eq. (3) (tested against each other and finite differences);
they differ only in cost. Each is timed through the trainer's own `outer_step` (which calls
`dwml.distill.hypergrad.hypergradient`) on the same peers and batches; the inner step is the trainer's `train_step`.
The amortised overhead of a mode is outer / (K x inner) at the default K. Prints the fastest mode.

    python benchmarks/bench_outer_modes.py [--hidden 64,48,32] [--batch-size 32] [--repeats 5] [--threads 2]
    python benchmarks/bench_outer_modes.py --gpu-peers     # the 4 peers of issue 10 (48.7M ... 19.7M), on CUDA
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import make_trainer, sync, synthetic_prepared, time_steps
from dwml.config import DistillConfig
from dwml.distill.hypergrad import MODES

GPU_PEERS = [(5, 768), (6, 576), (7, 448), (5, 448)]  # (layers, hidden) of the 48.7M / 33.8M / 24.5M / 19.7M peers


def peer_tables(shapes: list[tuple[int, int]], head_dim: int) -> list[dict]:
    return [{"layers": L, "heads": max(1, H // head_dim), "hidden": H, "intermediate": 4 * H} for L, H in shapes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="64,48,32", help="peer hidden sizes (2 layers, head width 32, I = 4H)")
    ap.add_argument("--gpu-peers", action="store_true", help="the 4 peers of issue 10 (vocab 16384, head width 64)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5, help="timed outer steps per mode (median kept)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpu_peers:
        peers, vocab = peer_tables(GPU_PEERS, 64), 16384
    else:
        peers, vocab = peer_tables([(2, int(h)) for h in args.hidden.split(",")], 32), args.vocab_size
    prepared = synthetic_prepared(Path(tempfile.mkdtemp(prefix="bench_outer_")) / "data", vocab,
                                  train_tokens=200 * args.batch_size * args.seq_len)
    run = make_trainer(prepared, "dwml", peers, batch_size=args.batch_size, seq_len=args.seq_len)
    try:
        device, k = run.rt.device, DistillConfig().outer_every
        # CPU: the process's CPU time (robust on a shared machine); CUDA: wall time.
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        timing = time_steps(run, steps=max(5, args.repeats * 2), warmup=3, outer=False)
        inner = timing.seconds if device.type == "cuda" else timing.cpu_seconds
        stats = run.train_step()
        results = {}
        for mode in MODES:
            run.cfg.distill.hypergrad = mode
            run.outer_step(stats, run.lr())  # warm-up of this mode
            times = []
            for _ in range(args.repeats):
                sync(device)
                t0 = clock()
                run.outer_step(stats, run.lr())
                sync(device)
                times.append(clock() - t0)
            results[mode] = statistics.median(times)
    finally:
        run.close()
    print(f"device {device}, {len(peers)} peers (hidden {', '.join(str(p['hidden']) for p in peers)}), batch "
          f"{args.batch_size} x {args.seq_len} (the outer step's batches: half of it), {torch.get_num_threads()} threads")
    print(f"inner DWML step: {inner * 1000:8.1f} ms ({'wall' if device.type == 'cuda' else 'CPU'} time)")
    for mode, t in sorted(results.items(), key=lambda kv: kv[1]):
        print(f"outer step {mode:<16}: {t * 1000:8.1f} ms = {t / inner:5.2f} inner steps; "
              f"amortised at K={k}: +{100 * t / (k * inner):.1f}%")
    print(f"fastest: {min(results, key=results.get)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
