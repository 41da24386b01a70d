"""Wall time of zero-shot evaluation on whole task sets, fp32 vs bf16, cold (tokenisation included) vs cached copies.

    python benchmarks/bench_eval_sets.py                       # GPU: the issue-10 target, the 48.7M peer on the three
                                                               # full sets (BLiMP filtered, supplement, EWoK)
    OMP_NUM_THREADS=1 python benchmarks/bench_eval_sets.py --device cpu --layers 2 --hidden 64 --heads 2 \\
        --intermediate 256 --limit 5                            # the same on CPU with tiny shapes

Model: a randomly initialised RoBERTa of the given shape (scoring cost does not depend on the weights); default
L5 H768 I3072 with a 16,384-token vocabulary = the 48.7M peer of `dwml search --reference base --peers 4 --vocab-size
16384`. Tokenizer: byte-level BPE trained here on real corpus lines (as `bench_scorer.py`), or with --tokenizer a
saved one, e.g. a `dwml prepare` directory (the GPU box has no corpus: benchmarks/gpu_session.sh passes the one of
configs/gpu-compare-9min.toml's data, vocabulary 16,384, whose vocabulary size then wins). "cold" clears the
in-process copy cache first, so it includes tokenising and building the masked copies; "cached" is the next model
of the same `dwml eval` (peers, ensemble). Every number is measured in this run; the script estimates nothing.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_scorer import train_tokenizer

from dwml.evaluation.evaldata import load_task, parse_tasks
from dwml.evaluation.evaluate import evaluate_model, resolve_device
from dwml.models.model import Arch, build_model
from dwml.evaluation.scoring import PRECISIONS, clear_copy_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="blimp_filtered,blimp_supplement,ewok")
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of every file")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--tokenizer", default=None,
                    help="saved tokenizer or `dwml prepare` directory (default: train one on ../shared corpus lines)")
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--method", default="pll")
    args = ap.parse_args()
    device = resolve_device(args.device)
    tasks = parse_tasks(args.tasks)

    if args.tokenizer:
        from dwml.data.tokenizer import load_tokenizer

        path = Path(args.tokenizer)
        tokenizer = load_tokenizer(path / "tokenizer" if (path / "meta.json").is_file() else path)
    else:
        tokenizer = train_tokenizer(args.vocab_size, n_lines=20_000)
    arch = Arch(layers=args.layers, heads=args.heads, hidden=args.hidden, intermediate=args.intermediate,
                vocab_size=len(tokenizer))
    model = build_model(arch, seed=0).eval().to(device)
    params = sum(p.numel() for p in model.parameters())
    task_pairs = {t: load_task(t, limit=args.limit) for t in tasks}
    n_pairs = sum(len(p) for p in task_pairs.values())
    print(f"model L{arch.layers} H{arch.hidden} I{arch.intermediate} V={arch.vocab_size}: {params / 1e6:.1f}M "
          f"parameters | device {device} | {n_pairs:,} pairs: "
          + ", ".join(f"{t} {len(p):,}" for t, p in task_pairs.items()))
    kw = dict(method=args.method, token_budget=args.token_budget, device=device, task_pairs=task_pairs)
    warm = {t: p[:8] for t, p in task_pairs.items()}  # kernels, allocator, autotuning
    evaluate_model(model, tokenizer, tasks, **{**kw, "task_pairs": warm})
    times = {}
    for precision in PRECISIONS:
        for cache in ("cold", "cached"):
            if cache == "cold":
                clear_copy_cache()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            res = evaluate_model(model, tokenizer, tasks, **kw, precision=precision)
            times[precision, cache] = total = time.perf_counter() - start
            per_task = "  ".join(f"{t} {r['seconds']:.2f}s" for t, r in res.items())
            print(f"{precision:5s} {cache:6s}: {total:7.2f} s  {n_pairs / total:9.0f} pairs/s   ({per_task})")
    print(f"bf16 / fp32 time (cached): {times['bf16', 'cached'] / times['fp32', 'cached']:.2f}; "
          f"cold / cached (fp32): {times['fp32', 'cold'] / times['fp32', 'cached']:.2f}")


if __name__ == "__main__":
    main()
