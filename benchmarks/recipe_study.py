"""Training-recipe study on the CPU (issue 9, item 4): which recipe leaves the unigram plateau fastest at equal tokens.

Every variant trains the `tiny` preset (1.49M parameters with the 8k vocabulary) with plain MLM on the same prepared
data for the same number of training tokens (`--tokens`, default 1,200 steps x 32 x 128 = 4.9M positions): a variant
with another batch size takes proportionally more or fewer steps. Validation is identical for all of them (the same
512 valid sequences, masked at `data.eval_mask_prob` = 15% whatever rate a variant trains with) and runs every
`--eval-tokens` tokens, so plateau-exit points compare across batch sizes. The first variant, `baseline`, re-measures
issue 9's reference recipe (post-LN RoBERTa, lr 3e-3, warm-up 100, cosine to 10%, dropout 0.1, 15% masking), which
reached 6.005 there.

Each variant is one `dwml train` process (OMP_NUM_THREADS=--threads) into OUT/<variant>; a variant whose run directory
already holds a finished run of the same settings (OUT/<variant>/study.json) is not trained again, so the study can
be stopped and continued, and variants can be run by hand in parallel (`--only NAME`). Prints and writes
(OUT/results.md, OUT/results.json) the table: variant, plateau-exit step / tokens, final valid loss, delta vs
baseline, training wall time.

    PYTHONPATH=src python3 benchmarks/recipe_study.py --data runs/data8k --out runs/study [--only a,b] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# One row per variant: (name, what it changes, overrides of BASELINE). Every variant spells out the whole recipe
# (BASELINE + its overrides), so changing dwml's defaults never changes what a variant means.
BASELINE = {
    "model.family": "roberta",
    "model.preset": "tiny",
    "model.dropout": 0.1,
    "data.mask_prob": 0.15,
    "data.eval_mask_prob": 0.15,
    "train.batch_size": 32,
    "train.lr": 3e-3,
    "train.warmup_steps": 100,
    "train.schedule": "cosine",
    "train.min_lr_ratio": 0.1,
    "train.weight_decay": 0.01,
    # MLM runs need no held-out sequences: report on the same first 512 valid sequences as runs made before
    # dwml reserved them in every run (the baseline), so all variants validate on the same sequences.
    "data.heldout_sequences": 0,
}
VARIANTS: list[tuple[str, str, dict]] = [
    ("baseline", "issue 9's reference: post-LN, lr 3e-3, warm-up 100, cosine, dropout 0.1, mask 15%, batch 32", {}),
    ("nodrop_bs16", "dropout 0, batch 16 (2x the steps)", {"model.dropout": 0.0, "train.batch_size": 16}),
    ("hilr_linear", "dropout 0, peak lr 8e-3, linear decay to 0",
     {"model.dropout": 0.0, "train.lr": 8e-3, "train.schedule": "linear", "train.min_lr_ratio": 0.0}),
    ("hilr_linear_mask30", "dropout 0, peak lr 8e-3, linear decay to 0, 30% masking",
     {"model.dropout": 0.0, "train.lr": 8e-3, "train.schedule": "linear", "train.min_lr_ratio": 0.0,
      "data.mask_prob": 0.3}),
    ("nodrop_linear_mask30", "dropout 0, lr 3e-3, linear decay to 0, 30% masking",
     {"model.dropout": 0.0, "train.schedule": "linear", "train.min_lr_ratio": 0.0, "data.mask_prob": 0.3}),
    ("modernbert_linear_mask30", "ModernBERT tiny, dropout 0, lr 3e-3, linear decay to 0, 30% masking",
     {"model.family": "modernbert", "model.dropout": 0.0, "train.schedule": "linear", "train.min_lr_ratio": 0.0,
      "data.mask_prob": 0.3}),
    ("modernbert_hilr_linear", "ModernBERT tiny (pre-norm, RoPE, GeGLU; same parameters), dropout 0, lr 8e-3, "
     "linear decay to 0",
     {"model.family": "modernbert", "model.dropout": 0.0, "train.lr": 8e-3, "train.schedule": "linear",
      "train.min_lr_ratio": 0.0}),
]

TOKENS = 1200 * 32 * 128  # issue 9's CPU reference budget: 1,200 steps of 32 x 128
EVAL_TOKENS = 100 * 32 * 128  # validate every 100 reference steps


def variant_sets(overrides: dict, data: str, out: Path, tokens: int, eval_tokens: int, seq_len: int) -> list[str]:
    """The `--set` list of one variant: the whole recipe plus steps/validation cadence at equal tokens."""
    recipe = {**BASELINE, **overrides}
    batch = int(recipe["train.batch_size"])
    steps = max(1, tokens // (batch * seq_len))
    run = {
        "data.prepared": data,
        "data.seq_len": seq_len,
        "out_dir": str(out),
        "train.method": "mlm",
        "train.max_steps": steps,
        "train.eval_every": max(1, eval_tokens // (batch * seq_len)),
        "train.save_every": 10**9,
        "train.log_every": 50,
        "train.progress": False,
    }
    return [f"{k}={_toml(v)}" for k, v in {**recipe, **run}.items()]


def _toml(v) -> str:
    from dwml.config import toml_value

    return toml_value(v)


# Keys that do not change what a run learns: a finished run is reused whatever they were.
BOOKKEEPING = ("train.save_every", "train.log_every", "train.progress")
# What runs made before these keys existed did (validation masked at the training rate, which was 15%; cosine).
LEGACY = {"data.heldout_sequences": 0, "model.family": "roberta", "data.eval_mask_prob": 0.15, "train.schedule": "cosine", "train.cooldown_fraction": 0.2}


def finished_with(out: Path, sets: list[str]) -> bool:
    """Does OUT hold a finished run whose resolved config has every value of `sets` (bookkeeping aside)?"""
    from dwml.config import parse_set, read_toml

    if not (out / "final" / "summary.json").is_file() or not (out / "config.toml").is_file():
        return False
    stored = read_toml(out / "config.toml")
    for s in sets:
        key = s.split("=", 1)[0]
        if key in BOOKKEEPING:
            continue
        want, have = parse_set(s), stored
        for part in key.split("."):
            want = want[part]
            have = have.get(part, LEGACY.get(key)) if isinstance(have, dict) else None
        if have != want:
            return False
    return True


def run_variant(name: str, sets: list[str], out: Path, threads: int) -> dict:
    """Train one variant (unless OUT/name holds a finished run of these settings); its summary."""
    if finished_with(out, sets):
        print(f"[{name}] finished earlier: reusing {out}", flush=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "dwml.cli", "train", "--no-resume"] + [x for s in sets for x in ("--set", s)]
        print(f"[{name}] training: {' '.join(cmd[3:])}", flush=True)
        with open(out.parent / f"{name}.log", "w", encoding="utf-8") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads((out / "final" / "summary.json").read_text())


def table(rows: list[dict], base_history: list[tuple[int, float]], base_batch: int) -> str:
    """Markdown table. `vs baseline` compares with the baseline's validation loss at the same number of tokens
    (its history), so a variant stopped early is still compared fairly."""
    base_at = {step * base_batch: loss for step, loss in base_history}
    head = ["variant", "batch x steps", "plateau exit: step (M tokens)", "valid loss", "vs baseline (same tokens)",
            "wall s", "changes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        exit_ = "never" if r["exit_step"] is None else f"{r['exit_step']} ({r['exit_tokens'] / 1e6:.2f})"
        ref = base_at.get(r["steps"] * r["batch"])
        delta = "-" if ref is None else f"{r['valid_loss'] - ref:+.3f}"
        steps = f"{r['steps']}" + ("" if r["finished"] else f" of {r['planned_steps']} (stopped)")
        wall = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['batch']} x {steps} | {exit_} | {r['valid_loss']:.3f} | {delta} | "
                     f"{wall} | {r['changes']} |")
    return "\n".join(lines)


def study_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments every CPU study shares: --data, --out and --only."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/data8k", help="prepared data (dwml prepare ... --vocab-size 8192)")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    return ap


def main() -> int:
    ap = study_arguments(__doc__)
    ap.add_argument("--tokens", type=int, default=TOKENS, help="training tokens (positions) per variant")
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="validate every this many tokens")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training process")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: tabulate what the run directories hold (unfinished runs: their last "
                         "validation, marked stopped)")
    args = ap.parse_args()
    names = [n for n, _, _ in VARIANTS]
    only = [x for x in args.only.split(",") if x]
    unknown = sorted(set(only) - set(names))
    if unknown:
        print(f"recipe_study: unknown variant(s) {unknown}; expected some of {names}", file=sys.stderr)
        return 2
    if args.list:
        for n, what, over in VARIANTS:
            print(f"{n:<16} {what}  {over}")
        return 0
    from dwml.data.entropy import train_unigram_entropy
    from dwml.training.plateau import plateau_exit_step, valid_history
    from dwml.data.shards import load_meta

    entropy = train_unigram_entropy(args.data, load_meta(args.data))
    rows = []
    out_root = Path(args.out)
    for name, what, overrides in VARIANTS:
        if only and name not in only:
            continue
        out = out_root / name
        sets = variant_sets(overrides, args.data, out, args.tokens, args.eval_tokens, args.seq_len)
        batch = int({**BASELINE, **overrides}["train.batch_size"])
        planned = max(1, args.tokens // (batch * args.seq_len))
        history = valid_history(out / "metrics.jsonl", 1)[0]
        if args.report and (out / "final" / "summary.json").is_file():
            s = json.loads((out / "final" / "summary.json").read_text())
        elif args.report:
            if not history or history[-1][0] == 0:
                continue
            s = {"steps": history[-1][0], "peers": [{"valid_loss": history[-1][1]}], "train_seconds": None}
        else:
            s = run_variant(name, sets, out, args.threads)
            history = valid_history(out / "metrics.jsonl", 1)[0]
        # From the run's validation history (the same rule as the trainer's summary, which older runs lack).
        exit_step = plateau_exit_step(history, entropy)
        rows.append({
            "variant": name, "changes": what, "overrides": overrides, "batch": batch, "steps": s["steps"],
            "planned_steps": planned, "finished": s["steps"] == planned and s["train_seconds"] is not None,
            "tokens": s["steps"] * batch * args.seq_len, "valid_loss": s["peers"][0]["valid_loss"],
            "unigram_entropy": entropy, "exit_step": exit_step,
            "exit_tokens": None if exit_step is None else exit_step * batch * args.seq_len,
            "train_seconds": s["train_seconds"], "history": history,
        })
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    text = table(rows, base["history"] if base else [], base["batch"] if base else 1)
    text += (f"\n\nunigram entropy of the train split: {entropy:.3f} nats; plateau exit = first validation at "
             f"least 0.5 nats below it. Wall times are on a shared CPU ({args.threads} thread(s) per run).")
    print(text)
    if not only:  # the whole study: keep its table next to the runs
        (out_root / "results.md").write_text(text + "\n")
        (out_root / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
