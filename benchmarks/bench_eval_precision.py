"""fp32 vs bf16 scoring of one model on one task, measured in one run: decisions that flip, score differences, time.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_precision.py MODEL_DIR [--task blimp_fast] [--limit N]

MODEL_DIR is a Hugging Face masked-LM folder (e.g. RUN/final/peer0 of a `dwml train` run). A decision is the
BabyLM-form outcome good >= bad of a pair; a flip is a pair whose outcome differs between the two precisions. On CPU,
bf16 is torch's CPU autocast: it shows how many decisions bf16 rounding changes, not the GPU speed difference.
"""
from __future__ import annotations

import argparse
import time

import torch

from dwml.evaluation.evaldata import load_task
from dwml.evaluation.evaluate import load_masked_lm, resolve_device, score_pairs
from dwml.evaluation.outcomes import summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="Hugging Face masked-LM folder")
    ap.add_argument("--task", default="blimp_fast")
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of every file")
    ap.add_argument("--method", default="pll")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, tokenizer = load_masked_lm(args.model, device)
    pairs = load_task(args.task, limit=args.limit)
    score_pairs(model, tokenizer, pairs[:4], method=args.method, device=device)  # warm-up

    results = {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        good, bad = score_pairs(model, tokenizer, pairs, method=args.method, device=device, precision=precision)
        results[precision] = (time.perf_counter() - start, good, bad)
    (t32, g32, b32), (t16, g16, b16) = results["fp32"], results["bf16"]
    d32 = [g >= b for g, b in zip(g32, b32)]
    d16 = [g >= b for g, b in zip(g16, b16)]
    flips = sum(x != y for x, y in zip(d32, d16))
    diff = max(abs(a - b) for a, b in zip(g32 + b32, g16 + b16))
    r32, r16 = summarize(pairs, g32, b32), summarize(pairs, g16, b16)
    print(f"{args.model} | {args.task}, {len(pairs)} pairs | method {args.method} | device {device} | "
          f"torch threads {torch.get_num_threads()}")
    for name, t, r in (("fp32", t32, r32), ("bf16", t16, r16)):
        print(f"{name}: {t:8.2f} s  macro {r['macro_accuracy']:.2f}%  strict {r['strict_macro_accuracy']:.2f}%  "
              f"ties {r['ties']}")
    print(f"decisions flipped by bf16: {flips} of {len(pairs)} ({100 * flips / len(pairs):.2f}%); "
          f"max |score difference| {diff:.3f} nats; bf16 / fp32 time {t16 / t32:.2f}")


if __name__ == "__main__":
    main()
