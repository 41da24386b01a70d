"""ModernBERT vs RoBERTa at a matched parameter count, measured in one run with the real trainer.

Both families use the same preset name, whose ModernBERT version has the RoBERTa preset's exact parameter count
within 0.3% (`dwml.models.model.MODERNBERT_INTERMEDIATE`), the same prepared data, batches, masks and steps:
  1. throughput: `--speed-steps` training steps per family without validation, the families alternating
     `--repeats` times; the fastest loop time of each is kept (the machine may be shared). Prints tokens/s and the
     ModernBERT / RoBERTa ratio.
  2. training: `--steps` steps per family and learning rate (`--lrs`), same recipe otherwise (the config defaults:
     batch 32 x 128, warm-up 100, cosine, dropout 0.1); prints the validation loss every `--eval-every` steps and at
     the end, next to the train split's unigram entropy when `dwml prepare` recorded it.

    OMP_NUM_THREADS=1 python benchmarks/bench_modernbert.py --prepared runs/data8k [--preset tiny] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dwml.config import RunConfig, from_dict, merge
from dwml.models.model import count_params, get_preset
from dwml.data.shards import load_meta
from dwml.training.train import train

FAMILIES = ("roberta", "modernbert")


def loop_seconds(run_dir: Path) -> tuple[float, int]:
    """Wall time between the first and the last logged step (excludes start-up, first validation and export)."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "elapsed_s" in r]
    return steps[-1]["elapsed_s"] - steps[0]["elapsed_s"], steps[-1]["step"] - steps[0]["step"]


def valid_curve(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["valid_loss"][0]) for r in recs if "valid_loss" in r]


def run(base: dict, out: Path, family: str, **sections) -> dict:
    cfg = from_dict(RunConfig, merge(base, {"out_dir": str(out), "model": {"family": family}, **sections}), "bench")
    return train(cfg.validate(), resume=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", required=True, help="output of `dwml prepare`")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300, help="training steps per family and learning rate (0: skip)")
    ap.add_argument("--lrs", default="1e-3,3e-3", help="peak learning rates of the training comparison")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--speed-steps", type=int, default=40, help="steps per throughput measurement (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="train.seed: initialisation, data order and masks")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_modernbert_"))
    meta = load_meta(Path(args.prepared))
    vocab = int(meta["vocab_size"])
    base = {
        "data": {"prepared": str(args.prepared), "seq_len": args.seq_len},
        "model": {"preset": args.preset},
        "train": {"method": "mlm", "batch_size": args.batch_size, "progress": False, "log_every": 10,
                  "seed": args.seed},
    }
    params = {f: count_params(get_preset(args.preset, f).replace(vocab_size=vocab, max_positions=args.seq_len + 2))
              for f in FAMILIES}
    print(f"preset {args.preset}, vocab {vocab}, batch {args.batch_size} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads: " + ", ".join(f"{f} {n:,} params" for f, n in params.items()),
          flush=True)

    if args.speed_steps:
        best: dict[str, float] = {}
        tokens_per_step = 0.0
        for r in range(args.repeats):
            for family in FAMILIES:
                out = tmp / f"speed-{family}-{r}"
                s = run(base, out, family, train={"max_steps": args.speed_steps, "warmup_steps": 10,
                                                  "eval_every": 10**9, "save_every": 10**9})
                secs, steps = loop_seconds(out)
                best[family] = min(best.get(family, float("inf")), secs / steps)
                tokens_per_step = s["train_tokens"] / args.speed_steps
                print(f"  repeat {r} {family:<10} {secs / steps * 1000:8.1f} ms/step", flush=True)
        for family in FAMILIES:
            print(f"{family:<10} training throughput: {tokens_per_step / best[family]:9,.0f} tokens/s "
                  f"({best[family] * 1000:.1f} ms/step)")
        print(f"ModernBERT / RoBERTa throughput ratio: {best['roberta'] / best['modernbert']:.3f}")

    if args.steps:
        entropy = meta.get("unigram_entropy") or meta.get("train_unigram_entropy")
        rows = []
        for lr in [float(x) for x in args.lrs.split(",")]:
            for family in FAMILIES:
                out = tmp / f"train-{family}-lr{lr:g}"
                s = run(base, out, family, train={"max_steps": args.steps, "lr": lr, "eval_every": args.eval_every,
                                                  "save_every": 10**9})
                curve = valid_curve(out)
                rows.append((family, lr, s["initial_valid_loss"][0], curve, s["peers"][0]["valid_loss"],
                             s["train_tokens"]))
                print(f"  {family:<10} lr {lr:g}: " + "  ".join(f"{st}:{v:.3f}" for st, v in curve), flush=True)
        print(f"\n{args.steps} steps = {rows[0][5]:,} train tokens per model"
              + (f"; train-split unigram entropy {float(entropy):.3f} nats" if entropy else ""))
        print(f"{'family':<10} {'lr':>7} {'params':>11} {'valid loss (initial -> final)':>32}")
        for family, lr, initial, _, final, _ in rows:
            print(f"{family:<10} {lr:7g} {params[family]:11,} {initial:15.3f} -> {final:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
