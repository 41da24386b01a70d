"""`dwml train`: load a run config (TOML files + --set overrides + flags) and call `train.train`."""
from __future__ import annotations

import argparse

from ..config import METHODS, load_config, toml_value


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="*", help="TOML config file(s), later ones override earlier ones")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.max_steps=200 (repeatable)")


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model or a set of peers (mlm, kd, sd, dml, dwml, kd_dwml)",
                       description="Train according to a config; a run directory with checkpoints is resumed.")
    add_config_arguments(p)
    p.add_argument("--method", choices=METHODS, help="training method (overrides train.method)")
    p.add_argument("--out", help="run directory (overrides out_dir)")
    p.add_argument("--data", help="prepared data directory (overrides data.prepared)")
    p.add_argument("--peers-file", help="JSON written by `dwml search` (overrides model.peers_file)")
    p.add_argument("--teacher", help="teacher model or run directory for kd / kd_dwml (overrides distill.teacher)")
    p.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    p.add_argument("--no-resume", action="store_true", help="start a new run: the previous run's files (checkpoints, final/, metrics) are "
                   "moved into RUN/previous-<time>/, never deleted")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from .train import train

    sets = list(args.sets)
    for flag, key in (("method", "train.method"), ("out", "out_dir"), ("data", "data.prepared"),
                      ("peers_file", "model.peers_file"), ("teacher", "distill.teacher"),
                      ("max_steps", "train.max_steps")):
        value = getattr(args, flag)
        if value is not None:
            sets.append(f"{key}={toml_value(value)}")
    cfg = load_config(args.config, sets)
    summary = train(cfg, resume=not args.no_resume)
    if summary:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"method {summary['method']}: {summary['steps']} steps; omega = "
             + "[" + ", ".join(f"{w:.3f}" for w in summary["omega"]) + "]"]
    lines.append(f"{'peer':<14}{'params':>12}{'valid loss':>12}{'plateau exit':>14}")
    for p in summary["peers"]:
        step = p.get("plateau_exit_step")
        lines.append(f"{p['name']:<14}{p['params']:>12,}{p['valid_loss']:>12.4f}"
                     f"{'never' if step is None else step:>14}")
    if summary.get("valid_ensemble_loss") is not None:
        lines.append(f"{'ensemble':<14}{'':>12}{summary['valid_ensemble_loss']:>12.4f}")
    if summary.get("unigram_entropy") is not None:
        lines.append(f"unigram entropy of the train split {summary['unigram_entropy']:.4f} nats; plateau exit = first "
                     f"validation step 0.5 nats below it")
    e = summary.get("exposure")
    if e:
        teacher = f", the teacher's {e['teacher_words']:,} words" if e.get("teacher_words") else ""
        track = f"; track {e['track']}, {len(e['milestones'])} milestone(s) in chck/" if e["track"] != "none" else ""
        lines.append(f"words seen {e['words_seen']:,} ({e['epochs']:.2f} epochs of {e['train_words']:,}){teacher}"
                     f"{track}")
    return "\n".join(lines)
