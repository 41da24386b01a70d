"""Grammar at equal CPU time (issue 18, item 2): what one MLM learns of grammar in --minutes of wall time on this CPU.

Loss alone does not tell grammar (a 1.5M model at valid loss 3.2 scored 54.3 on BLiMP-filtered), so every variant is
judged on the full BLiMP-filtered (59,875 pairs) and the full BLiMP supplement (5,218 pairs), BabyLM's convention
(a tie counts correct), next to the unigram and KN-trigram lines of the same data (`dwml eval` prints them).

Equal CPU time: a variant's `train.max_steps` is sized so that training fills --minutes on this machine - by a
throughput probe (PROBE_STEPS steps of the variant itself, its steady tokens/s from the last log line) unless the
variant pins its steps. A schedule that decays to 0 must know its length, so the time budget becomes a step count
before training; the table reports the wall time the training really took. Every variant spells out its whole
recipe (RECIPE + its overrides). Each variant is one `dwml train` into OUT/<variant> (reused when it holds a
finished run of the same settings: the study can be stopped and continued) and one `dwml eval` into
OUT/<variant>.eval.json. Writes OUT/grammar.md and OUT/grammar.json.

    PYTHONPATH=src python3 benchmarks/grammar_study.py --data runs/data8k --out runs/study [--only a,b] [--minutes 30]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_study import finished_with, run_variant, study_arguments  # noqa: E402  (the sibling study's reuse rules)

# The CPU recipe: the loss study's winner (ModernBERT, dropout 0, 30% masking, linear decay to 0; docs/results.md)
# with bf16 autocast, which on this CPU's AVX512-BF16 / AMX matmuls trains 1.8x faster at the same loss.
RECIPE = {
    "model.family": "modernbert", "model.preset": "mini", "model.dropout": 0.0,
    "data.seq_len": 128, "data.mask_prob": 0.3, "data.eval_mask_prob": 0.15, "data.heldout_sequences": 256,
    "train.method": "mlm", "train.batch_size": 32, "train.lr": 2e-3, "train.warmup_steps": 100,
    "train.schedule": "linear", "train.min_lr_ratio": 0.0, "train.weight_decay": 0.01, "train.dtype": "bf16",
    "train.eval_every": 500, "train.save_every": 500, "train.log_every": 50, "train.progress": False,
}
# (name, what it changes, overrides of RECIPE). train.max_steps pins the length (no probe); PREPARE: extra flags of
# `dwml prepare` - the variant trains on its own preparation of --data's corpus (OUT/<variant>.data, same settings).
PREPARE = "prepare"
VARIANTS: list[tuple[str, str, dict]] = [
    ("mini_bf16", "ModernBERT mini (5.38M), lr 2e-3, bf16; 1,950 steps (sized by a 60-step probe: 5.0k tokens/s)",
     {"train.max_steps": 1950}),
    ("mini_fp32", "the same in fp32 (dwml's CPU default before this study)", {"train.dtype": "fp32"}),
    ("tiny_bf16", "ModernBERT tiny (1.49M), lr 3e-3, bf16", {"model.preset": "tiny", "train.lr": 3e-3}),
    ("deep6_bf16", "mini made deeper: 6 layers (6.99M), lr 2e-3, bf16, math attention", {"model.layers": 6}),
    ("mini_sched", "mini, bf16, math attention, masking 30% -> 15% over the run (GPT-BERT's schedule)",
     {"data.mask_prob_end": 0.15}),
    ("mini_sched30", "mini_sched sized to ~29 minutes at the slower rate of a second run (0.50 s/step)",
     {"data.mask_prob_end": 0.15, "train.max_steps": 3400}),
    ("mini_const30", "mini_sched30 without the schedule (constant 30%): the schedule's own effect at equal steps",
     {"train.max_steps": 3400}),
    ("mini_nounmask", "mini_const30 with BabyBERTa's no unmasking: every selected token becomes <mask>",
     {"train.max_steps": 3400, "data.replace_mask": 1.0, "data.replace_random": 0.0}),
    ("mini_seq64", "mini_const30 on 64-token sequences, batch 64 (the same 4,096 positions a step): the short "
     "inputs BLiMP's sentences are", {"train.max_steps": 3400, "data.seq_len": 64, "train.batch_size": 64}),
    ("mini_compile", "mini_const30 under torch.compile (inductor fuses the non-matmul ops: 1.14x the eager step, "
     "benchmarks/bench_cpu_compile.py), 4,200 steps", {"train.max_steps": 4200, "train.compile": True}),
    ("mini_compile30", "mini_compile at 3,700 steps: what 30 minutes hold at its measured 0.46 s/step",
     {"train.max_steps": 3700, "train.compile": True}),
    ("mini_newline30", "mini_compile30 with utterances separated by the newline token, not </s> (data.separator): "
     "the form of the supplement's dialogue pairs", {"train.max_steps": 3700, "train.compile": True,
                                                     "data.separator": "newline"}),
    ("mini_newline30_s1", "mini_newline30 with train.seed = 1 (initialisation, masks and batch order): how far a "
     "seed alone moves the two scores", {"train.max_steps": 3700, "train.compile": True,
                                         "data.separator": "newline", "train.seed": 1}),
    ("mini_compile30_s1", "mini_compile30 with train.seed = 1: a second draw of the eos recipe "
     "(configs/cpu-mlm-30min.toml)", {"train.max_steps": 3700, "train.compile": True, "train.seed": 1}),
    ("mini_compile30_s2", "mini_compile30 with train.seed = 2: a third draw of the eos recipe",
     {"train.max_steps": 3700, "train.compile": True, "train.seed": 2}),
    ("mini_ema30", "mini_compile30 exporting an exponential moving average of the weights (train.ema_decay = "
     "0.999, GPT-BERT's weight averaging; the live weights train exactly as mini_compile30's)",
     {"train.max_steps": 3700, "train.compile": True, "train.ema_decay": 0.999}),
    ("mini_mixed30", "mini_compile30 with half of the utterances ended by the newline, half by </s> "
     "(data.separator = mixed): the dialogue form and BLiMP's <s> sentence </s> in one model",
     {"train.max_steps": 3700, "train.compile": True, "data.separator": "mixed"}),
    ("mini_dialogue30", "mini_compile30 with the newline between the utterances of the dialogue corpora (CHILDES, "
     "Switchboard: turns, as in the supplement's pairs) and </s> between the sentences of prose (CBT, stories, "
     "Wikipedia; data.separator_sources)",
     {"train.max_steps": 3700, "train.compile": True, "data.separator": "newline",
      "data.separator_sources": ["aochildes", "switchboard", "aochildes_cds_gloss", "childes_en_validation_random"]}),
    ("mini_tags30", "mini_compile30 on the corpus prepared with its speaker tags kept (`dwml prepare --speaker-tags`: "
     "Switchboard's \"A: ...\" turns, the form of the supplement's dialogue pairs) and the newline between "
     "Switchboard's turns only (</s> elsewhere, as in mini_compile30)",
     {"train.max_steps": 3700, "train.compile": True, "data.separator": "newline",
      "data.separator_sources": ["switchboard"], PREPARE: ["--speaker-tags"]}),
    ("mini_mixed30_s1", "mini_mixed30 with train.seed = 1: a second draw of the mixed separator, the one recipe "
     "whose both halves may clear the 30-minute bar",
     {"train.max_steps": 3700, "train.compile": True, "data.separator": "mixed", "train.seed": 1}),
]
PROBE_STEPS = 60
TASKS = "blimp_filtered,blimp_supplement"


def _toml(v) -> str:
    from dwml.config import toml_value

    return toml_value(v)


def sets_of(recipe: dict, data: str, out: Path) -> list[str]:
    return [f"{k}={_toml(v)}" for k, v in {**recipe, "data.prepared": data, "out_dir": str(out)}.items()]


def prepared_for(name: str, flags: list[str], data: str, root: Path) -> str:
    """OUT/<variant>.data: --data's inputs prepared again with its vocabulary and seed, plus `flags`."""
    meta = json.loads((Path(data) / "meta.json").read_text())
    out = root / f"{name}.data"
    if not (out / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "dwml.cli", "prepare", *meta["inputs"], "--out", str(out),
                        "--vocab-size", str(meta["vocab_size_requested"]), "--seed", str(meta["seed"]),
                        "--valid-fraction", str(meta["valid_fraction"]), "--min-frequency", str(meta["min_frequency"]),
                        *(["--lowercase"] if meta["lowercase"] else []), *flags], check=True)
    return str(out)


def probe_steps(name: str, recipe: dict, data: str, out: Path, minutes: float, threads: int) -> int:
    """Steps that fill `minutes` of training at the variant's steady throughput (measured by a short run)."""
    probe = out.parent / f"{name}.probe"
    short = {**recipe, "train.max_steps": PROBE_STEPS, "train.eval_every": 10**6, "train.save_every": 10**6,
             "train.log_every": PROBE_STEPS // 2}
    run_variant(f"{name}.probe", sets_of(short, data, probe), probe, threads)
    logs = [json.loads(x) for x in (probe / "metrics.jsonl").read_text().splitlines() if '"elapsed_s"' in x]
    # Steps per second over the probe's second half (its first steps warm up oneDNN and the allocator). Not
    # tokens_per_s: that counts real tokens, ~10% fewer than a step's positions, which sized runs 1.3x too short.
    (a, b) = logs[-2:]
    steps_per_s = (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])
    # 3% for the validations every eval_every steps and the final export
    return int(0.97 * minutes * 60 * steps_per_s)


def evaluate(name: str, out: Path, threads: int, tasks: str = TASKS, extra: tuple = ()) -> tuple[dict, float]:
    """`dwml eval` of the variant on `tasks` into OUT/<variant>[.<tasks>].eval.json (kept: a rerun reuses it)."""
    tag = "" if tasks == TASKS else "." + tasks.replace(",", "+")
    path = out.parent / f"{name}{tag}.eval.json"
    full = out.parent / f"{name}.eval.json"
    if tag and set(tasks.split(",")) <= set(TASKS.split(",")) and full.is_file():  # the full evaluation has these
        path = full
    start = time.perf_counter()
    if not path.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "dwml.cli", "eval", str(out), "--tasks", tasks, "--out", str(path), *extra]
        with open(out.parent / f"{name}{tag}.eval.log", "w", encoding="utf-8") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(path.read_text()), time.perf_counter() - start


def line_break_tasks(tasks: str, data_dir: str | None) -> str:
    """The tasks of `tasks` the two tokenizer forms can score differently: minimal-pair sets with a line break in
    some text (the supplement's dialogues), and every set not made of pairs. `with_line_ends` reads text without
    one as prepared, so the other form of BLiMP-filtered would repeat ~20 minutes of evaluation to the same
    scores."""
    from dwml.evaluation.babylm_data import is_babylm_task
    from dwml.evaluation.evaldata import load_task, parse_tasks

    def differs(task: str) -> bool:
        if is_babylm_task(task):
            return True
        return any("\n" in (text or "") for pair in load_task(task, data_dir)
                   for text in (pair.good, pair.bad, pair.good_prefix, pair.bad_prefix))
    return ",".join(t for t in parse_tasks(tasks) if differs(t))


def live_weights(name: str, root: Path) -> Path:
    """OUT/<variant>_live/: the live weights of an averaging variant's last checkpoint (train.ema_decay > 0 exports
    the average) as a Hugging Face folder, so the average and the weights it averages, of one run, are scored on the
    same pairs: the averaging's own effect, free of the seed's."""
    from transformers import AutoModelForMaskedLM

    from dwml.data.tokenizer import copy_tokenizer
    from dwml.training.checkpoint import list_checkpoints, load_checkpoint

    run, target = root / name, root / f"{name}_live"
    state = load_checkpoint(list_checkpoints(run)[-1])
    if not state.get("averages") or state["step"] != json.loads((run / "final" / "summary.json").read_text())["steps"]:
        raise SystemExit(f"grammar_study: {run} is not a finished run with weight averaging")
    if not (target / "config.json").is_file():
        model = AutoModelForMaskedLM.from_pretrained(run / "final" / "peer0")
        model.load_state_dict({k.removeprefix("mlm."): v for k, v in state["students"][0].items()})
        model.save_pretrained(target)
        copy_tokenizer(run / "final" / "peer0", target)
    return target


def tokenizer_form(name: str, root: Path, line_ends: bool) -> Path:
    """OUT/<variant>_lines/ (`line_ends`) or OUT/<variant>_newline/: the variant's final weights and summary with its
    prepared tokenizer read as `dwml.data.tokenizer.with_line_ends` has it (a line break = </s>) or as prepared (the
    newline token), whichever the run did not export (runs before dwml exported line ends have the newline form).
    Both forms of one run's weights are scored on the same pairs: the tokenizer's own effect, free of the seed's."""
    from dwml.checks import tokenizer_fingerprint
    from dwml.data.tokenizer import copy_tokenizer

    src, target = root / name / "final", root / f"{name}_{'lines' if line_ends else 'newline'}" / "final"
    summary = json.loads((src / "summary.json").read_text())
    if not (target / "summary.json").is_file():
        (target / "peer0").mkdir(parents=True)
        for f in (src / "peer0").iterdir():  # weights and config; the tokenizer is written below
            if not f.name.startswith("tokenizer"):
                shutil.copy2(f, target / "peer0" / f.name)
        copy_tokenizer(summary["tokenizer"], target / "peer0", line_ends=line_ends)
        summary.update(tokenizer_line_ends=line_ends, export_tokenizer_sha256=tokenizer_fingerprint(target / "peer0"))
        (target / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return target.parent


def evaluations_of(name: str, root: Path) -> list[dict]:
    """The model's part of every `dwml eval` of the variant (OUT/<variant>.eval.json and the screens
    OUT/<variant>.<tasks>.eval.json): a run's peer0, or the one model of a folder (OUT/<variant>_live)."""
    paths = sorted(root.glob(f"{name}.eval.json")) + sorted(root.glob(f"{name}.*.eval.json"))
    models = [json.loads(p.read_text())["models"] for p in paths]
    return [m["peer0"] if "peer0" in m else next(iter(m.values())) for m in models]


def scores_of(name: str, root: Path) -> tuple[dict, float]:
    """Every task score the variant's evaluations hold, merged, and the seconds those evaluations took."""
    scores, seconds = {}, 0.0
    for ev in evaluations_of(name, root):
        scores.update(ev["summary"])
        seconds += ev.get("seconds") or 0.0
    return scores, seconds


def paired(a: str, b: str, root: Path) -> str:
    """Paired bootstrap (dwml.evaluation.stats, 10,000 replicates over the pairs within each group) of the macro
    accuracy of variant a minus variant b on every task both were evaluated on. It resamples the evaluation items,
    not the training: two seeds of one recipe can differ beyond this interval."""
    from dwml.evaluation.stats import compare_tasks

    tasks = [{t: r for ev in evaluations_of(n, root) for t, r in ev["tasks"].items()} for n in (a, b)]
    lines = [f"{a} - {b}, paired bootstrap over items (95%):"]
    for task, r in compare_tasks(*tasks).items():
        lines.append(f"  {task}: {r['diff']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"
                     + (" (excludes 0)" if r["significant"] else ""))
    return "\n".join(lines) if len(lines) > 1 else f"{a} and {b}: no task evaluated for both"


def form_of(text: str) -> str:
    """How a supplement item is written: speaker letters ("A: ...\nB: ..."), speaker names ("David: ..."),
    turns without tags ("...?\n..."), or one line."""
    head = text.split(":", 1)[0] if ": " in text.split("\n", 1)[0] else ""
    return ("letters" if len(head) == 1 else "names") if head.isalpha() else ("turns" if "\n" in text else "line")


def forms(names: list[str], root: Path, data_dir: str | None) -> str:
    """Supplement accuracy of each variant in the dialogue groups (qa_congruence_easy / _tricky, turn_taking) by
    the form of the item: does a model read the speaker tags, or stumble on them?"""
    from dwml.evaluation.evaldata import load_task

    pairs = load_task("blimp_supplement", data_dir)
    keep = [i for i, p in enumerate(pairs) if p.group != "hypernym" and p.group != "subject_aux_inversion"]
    kinds = sorted({form_of(pairs[i].good) for i in keep})
    lines = ["| variant | " + " | ".join(f"{k} ({sum(form_of(pairs[i].good) == k for i in keep)})" for k in kinds)
             + " |", "|---|" + "---|" * len(kinds)]
    for name in names:
        task = next(ev["tasks"]["blimp_supplement"] for ev in evaluations_of(name, root)
                    if "blimp_supplement" in ev["tasks"])
        right = task["items"]["correct"]
        if len(right) != len(pairs):
            raise SystemExit(f"grammar_study: {name}'s supplement has {len(right)} items, the data {len(pairs)}")
        acc = [100 * sum(right[i] == "1" for i in keep if form_of(pairs[i].good) == k)
               / sum(form_of(pairs[i].good) == k for i in keep) for k in kinds]
        lines.append(f"| {name} | " + " | ".join(f"{a:.1f}" for a in acc) + " |")
    return "\n".join(lines)


def row(name: str, what: str, summary: dict, scores: dict, eval_s: float) -> dict:
    peer = summary["peers"][0]
    return {"variant": name, "changes": what, "params": peer["params"], "steps": summary["steps"],
            "tokens": summary["train_tokens"], "epochs": summary["exposure"]["epochs"],
            "train_seconds": summary["train_seconds"], "valid_loss": peer["valid_loss"],
            "unigram_entropy": summary["unigram_entropy"], "blimp_filtered": scores.get("blimp_filtered"),
            "supplement": scores.get("blimp_supplement"), "blimp_fast": scores.get("blimp_fast"),
            "eval_seconds": eval_s}


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[dict], minutes: float) -> str:
    head = ["variant", "params", "steps", "tokens", "epochs", "train wall (min)", "valid loss", "BLiMP-filtered",
            "supplement", "BLiMP-fast", "changes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        over = " (over budget)" if r["train_seconds"] > 60 * minutes else ""
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['steps']:,} | {r['tokens'] / 1e6:.1f}M | "
                     f"{r['epochs']:.2f} | {r['train_seconds'] / 60:.1f}{over} | {r['valid_loss']:.3f} | "
                     f"{_acc(r['blimp_filtered'])} | {_acc(r['supplement'])} | {_acc(r.get('blimp_fast'))} | "
                     f"{r['changes']} |")
    return "\n".join(lines)


def main() -> int:
    ap = study_arguments(__doc__)
    ap.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget per variant")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each process")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--tasks", default=TASKS,
                    help="what to evaluate (a subset screens a variant: the full BLiMP-filtered of a mini-sized "
                         "model costs ~45 min of fp32 on 2 cores); '-' marks a set not evaluated")
    ap.add_argument("--live", action="store_true",
                    help="for the --only variants that average their weights: also write OUT/<variant>_live (the "
                         "last checkpoint's live weights) and evaluate it on --tasks (compare with --paired)")
    ap.add_argument("--line-ends", action="store_true",
                    help="for the --only variants: also write the other tokenizer form of their weights "
                         "(OUT/<variant>_lines: a line break read as </s>, or OUT/<variant>_newline) and evaluate it "
                         "on the --tasks it can score differently, those with a line break (compare with --paired)")
    ap.add_argument("--paired", default="", metavar="A,B",
                    help="train nothing: the paired bootstrap of variant A minus variant B on their evaluations")
    ap.add_argument("--forms", default="", metavar="A,B,...",
                    help="train nothing: supplement dialogue-group accuracy of these variants by item form")
    ap.add_argument("--data-dir", default=None, help="evaluation data (for --forms; default: dwml eval's)")
    args = ap.parse_args()
    names = [n for n, _, _ in VARIANTS]
    only = [x for x in (args.paired or args.only).split(",") if x]
    if args.paired:  # the live weights of an averaging variant (--live) are comparable too
        names += [f"{n}_live" for n, _, over in VARIANTS if over.get("train.ema_decay")]
        names += [f"{n}_{form}" for n, _, _ in VARIANTS for form in ("lines", "newline")]
    if args.paired and len(only) != 2:
        print(f"grammar_study: --paired expects two variants A,B, got {args.paired!r}", file=sys.stderr)
        return 2
    if sorted(set(only) - set(names)):
        print(f"grammar_study: unknown variant(s) {sorted(set(only) - set(names))}; expected some of {names}",
              file=sys.stderr)
        return 2
    if args.list:
        for n, what, over in VARIANTS:
            print(f"{n:<12} {what}  {over}")
        return 0
    if args.paired:
        print(paired(*only, Path(args.out)))
        return 0
    if args.forms:
        print(forms([x for x in args.forms.split(",") if x], Path(args.out), args.data_dir))
        return 0
    out_root = Path(args.out)
    rows = []
    # the sets the other tokenizer form can score differently, in the data `dwml eval` below reads (its default)
    differ = line_break_tasks(args.tasks, None) if args.line_ends else ""
    for name, what, overrides in VARIANTS:
        if only and name not in only:
            if (out_root / name / "final" / "summary.json").is_file():  # done earlier: its row, nothing rerun
                summary = json.loads((out_root / name / "final" / "summary.json").read_text())
                scores, eval_s = scores_of(name, out_root)
                rows.append(row(name, what, summary, scores, eval_s))
            continue
        out = out_root / name
        recipe = {**RECIPE, **overrides}
        data = prepared_for(name, recipe.pop(PREPARE), args.data, out_root) if PREPARE in recipe else args.data
        if "train.max_steps" not in recipe and not finished_with(out, sets_of(recipe, data, out)):
            recipe["train.max_steps"] = probe_steps(name, recipe, data, out, args.minutes, args.threads)
        elif "train.max_steps" not in recipe:  # finished earlier: its own length
            recipe["train.max_steps"] = json.loads((out / "final" / "summary.json").read_text())["steps"]
        summary = run_variant(name, sets_of(recipe, data, out), out, args.threads)
        evaluate(name, out, args.threads, args.tasks)
        if args.live and recipe.get("train.ema_decay"):
            evaluate(f"{name}_live", live_weights(name, out_root), args.threads, args.tasks,
                     ("--reference-data", data))
        if differ:  # the other form of the weights, on the sets it can score differently
            form = not summary.get("tokenizer_line_ends", False)
            evaluate(f"{name}_{'lines' if form else 'newline'}", tokenizer_form(name, out_root, form), args.threads,
                     differ)
        elif args.line_ends:
            print(f"[{name}] --line-ends: no line break in {args.tasks}: the other tokenizer form scores the same")
        rows.append(row(name, what, summary, *scores_of(name, out_root)))
        print(table(rows[-1:], args.minutes), flush=True)
    text = table(rows, args.minutes)
    text += (f"\n\nBudget {args.minutes:g} min of training per variant on this machine ({os.cpu_count()} CPUs, "
             f"{args.threads} threads); BLiMP-filtered / supplement: `dwml eval`, full sets, fp32, PLL, a tie "
             f"counting correct. Unigram entropy {rows[0]['unigram_entropy']:.3f} nats." if rows else "")
    print(text)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "grammar.md").write_text(text + "\n")
    (out_root / "grammar.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
