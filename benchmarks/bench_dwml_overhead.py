"""DWML's cost over training the same peers independently, measured in one run on the CPU.

Both arms use the real trainer on the same prepared data, peers, batches and steps:
  independent: method "mlm" with the peers (each peer its own loss, no coupling, no outer steps);
  dwml:        method "dwml" at the default K (eq. 2 inner loss + an outer omega step every K steps, eq. 3-4).
The arms alternate `--repeats` times and the fastest loop time of each is kept (the machine may be shared).
Also prints the training throughput (tokens/s) of the tiny preset as a single MLM.

    python benchmarks/bench_dwml_overhead.py [--steps 120] [--peers 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dwml.config import DistillConfig, RunConfig, from_dict, merge
from dwml.prepare import default_corpus_path, prepare
from dwml.train import train


def loop_seconds(run_dir: Path) -> tuple[float, int]:
    """Wall time between the first and the last logged step (excludes start-up, first validation and export)."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "elapsed_s" in r]
    return steps[-1]["elapsed_s"] - steps[0]["elapsed_s"], steps[-1]["step"] - steps[0]["step"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--peers", type=int, default=3, help="use the first P of --hidden")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", default="64,48,32",
                    help="hidden sizes of the peers (2 layers, head width 32, intermediate 4x); default: below tiny")
    ap.add_argument("--prepared", help="prepared data dir (default: prepare 20k docs of ../shared/data/corpus)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dwml_"))
    prepared = Path(args.prepared) if args.prepared else tmp / "data"
    if not args.prepared:
        prepare([default_corpus_path()], prepared, vocab_size=8192, max_docs=20000)
    # Default: peers about N/2, N/3, N/4 of the tiny preset (by hidden size); --hidden 256,192,128 for larger ones.
    sizes = [int(h) for h in args.hidden.split(",")]
    peers = [{"layers": 2, "heads": max(1, h // 32), "hidden": h, "intermediate": 4 * h} for h in sizes][: args.peers]
    K = DistillConfig().outer_every
    base = {
        "data": {"prepared": str(prepared), "seq_len": args.seq_len},
        "model": {"peers": peers},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "eval_every": 10**9, "save_every": 10**9,
                  "log_every": 10, "progress": False, "warmup_steps": 10},
    }
    best: dict[str, float] = {}
    tokens_per_step = 0.0
    for r in range(args.repeats):
        for arm, method in (("independent", "mlm"), ("dwml", "dwml")):
            out = tmp / f"{arm}{r}"
            cfg = from_dict(RunConfig, merge(base, {"out_dir": str(out), "train": {"method": method}}), "bench")
            summary = train(cfg.validate(), resume=False)
            secs, steps = loop_seconds(out)
            best[arm] = min(best.get(arm, float("inf")), secs / steps)
            tokens_per_step = summary["train_tokens"] / args.steps
            print(f"  repeat {r} {arm:<12} {secs / steps * 1000:8.1f} ms/step", flush=True)
    # Single tiny-preset MLM throughput.
    out = tmp / "tiny"
    cfg = from_dict(RunConfig, merge(base, {"out_dir": str(out), "model": {"peers": [], "preset": "tiny"},
                                            "train": {"method": "mlm"}}), "bench").validate()
    s = train(cfg, resume=False)
    secs, steps = loop_seconds(out)
    tiny_tps = s["train_tokens"] / args.steps * steps / secs
    ratio = best["dwml"] / best["independent"]
    print(f"\npeers {args.peers} ({', '.join(str(p['hidden']) for p in peers)} hidden), K = {K}, "
          f"batch {args.batch_size} x {args.seq_len}, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"independent peers : {best['independent'] * 1000:8.1f} ms/step ({tokens_per_step / best['independent']:,.0f} tokens/s)")
    print(f"dwml (K={K:<3})      : {best['dwml'] * 1000:8.1f} ms/step ({tokens_per_step / best['dwml']:,.0f} tokens/s)")
    print(f"DWML overhead ratio: {ratio:.3f}x  (target <= 1.25x)")
    print(f"tiny preset MLM training throughput: {tiny_tps:,.0f} tokens/s")
    return 0 if ratio <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
