"""`dwml demo`: the main job on the bundled default data, end to end on a CPU in a few minutes.

prepare the corpus -> tokenizer + shards; train a tiny ModernBERT MLM baseline; search tiny ModernBERT peer
architectures and train them with DWML for the same compute; evaluate everything zero-shot on the fast BLiMP /
supplement / EWoK subsets; print a results summary. Every stage writes into one directory and is skipped when its
output already exists, so a second `dwml demo` (or one resumed after Ctrl-C) reuses finished stages.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import RunConfig, from_dict, merge
from ..errors import DwmlError
from ..io import claim_dir

# The demo's recipe, kept small enough for a 2-core CPU: a ~1.5M-parameter tiny model, 64-token sequences.
# Model and training recipe are the winner of benchmarks/recipe_study.py (docs/results.md, "The unigram plateau and the
# training recipe"): the pre-norm ModernBERT encoder (RoPE, GeGLU; the same parameter count as RoBERTa tiny) with
# 30% masking (validation stays at 15%), no dropout, linear decay to 0 - 3.97 nats after 4.9M tokens where the
# post-LN RoBERTa got 6.01. The MLM baseline and the searched DWML peers are all ModernBERT (`model.family`; the
# library's default family stays RoBERTa). On RoBERTa tiny models this demo ended every model on the unigram plateau
# (MLM 6.68, peers 6.61-6.65; entropy 6.80); with ModernBERT the MLM leaves it (6.0-6.1, docs/results.md) at the same
# cost, while the 2-4x smaller peers get 0.3-0.4 nats below the entropy (as independent MLMs they get no further).
DEMO_FAMILY = "modernbert"
DEMO_CONFIG = {
    "data": {"seq_len": 64, "heldout_sequences": 128, "mask_prob": 0.3, "eval_mask_prob": 0.15},
    "model": {"family": DEMO_FAMILY, "preset": "tiny", "dropout": 0.0},
    "train": {"max_steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "schedule": "linear",
              "min_lr_ratio": 0.0, "eval_every": 100,
              "eval_batches": 8, "save_every": 100, "log_every": 10, "seed": 0},
    "distill": {"alpha": 0.5, "outer_every": 10, "eta": 0.5},
}
# The peer search: ModernBERT shapes at the budgets N/2, N/3, ... of the ModernBERT tiny preset, 2-8 layers. On a CPU
# a tiny model's step costs per layer, not per parameter: unbounded, the search picks a 1-layer and an 18-layer
# 32-wide peer, whose DWML steps cost ~27% more (1-thread CPU time) without getting the peers off the plateau either.
# With 2-8 layers it finds the shapes the RoBERTa demo's search found (4 x 64, 3 x 48, 8 x 32 with three peers),
# within 2% of their budgets, and DWML costs what it cost with RoBERTa.
DEMO_SEARCH = {"family": DEMO_FAMILY, "layers": [2, 8], "seed": 0}


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: prepare data, train MLM and DWML tiny models, evaluate (CPU, minutes)")
    p.add_argument("--corpus", nargs="*", default=None,
                   help="input text directories/files (default: ../shared/data/corpus)")
    p.add_argument("--out", default="runs/demo", help="demo directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=DEMO_CONFIG["train"]["max_steps"], help="training steps per run")
    p.add_argument("--peers", type=int, default=3, help="number of DWML peers (>= 2)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-docs", type=int, default=None, help="use only this many documents (quick runs)")
    p.add_argument("--eval-limit", type=int, default=20,
                   help="pairs per evaluation file (default 20: ~1,600 pairs per model; 0 = the whole fast subsets)")
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation")
    p.set_defaults(func=run_demo)


def demo_run_config(out_dir: Path, prepared: Path, steps: int, **sections) -> RunConfig:
    data = merge(DEMO_CONFIG, {"out_dir": str(out_dir), "data": {"prepared": str(prepared)},
                               "train": {"max_steps": steps}})
    return from_dict(RunConfig, merge(data, sections), "demo").validate()


def run_demo(args) -> int:
    from ..data.prepare import check_reusable, default_corpus_path, prepare
    from ..data.shards import load_meta
    from ..models.model import count_params, get_preset
    from ..models.search import SearchConfig, run_search_to_file
    from ..training.cli import format_summary
    from ..training.train import train

    if args.peers < 2:
        raise DwmlError(f"--peers: DWML needs at least 2 peers, got {args.peers}")
    t0 = time.perf_counter()
    inputs = args.corpus or [default_corpus_path()]
    out = claim_dir(args.out, "demo", legacy=("peers.json", "data/meta.json"))  # never an unrelated directory
    prepared = out / "data"
    print(f"[1/5] prepare {', '.join(map(str, inputs))} -> {prepared}")
    if (prepared / "meta.json").is_file():
        check_reusable(prepared, inputs, vocab_size=args.vocab_size, max_docs=args.max_docs)
        print("      (reusing the prepared data)")
    else:
        prepare(inputs, prepared, vocab_size=args.vocab_size, max_docs=args.max_docs)
    vocab = int(load_meta(prepared)["vocab_size"])

    # Peers: Bayesian-optimisation search (DEMO_SEARCH) for p ModernBERT architectures of N/2, N/3, ... the
    # parameters of the ModernBERT tiny preset (the MLM baseline's model; 1,487,616 at 8k, RoBERTa tiny's 1,478,912).
    family = DEMO_CONFIG["model"]["family"]
    print(f"[2/5] search {args.peers} {family} peer architectures below the tiny preset")
    peers_file = out / "peers.json"
    reference = get_preset("tiny", family).replace(vocab_size=vocab,
                                                   max_positions=DEMO_CONFIG["data"]["seq_len"] + 2)
    if not peers_file.is_file():
        run_search_to_file(SearchConfig(peers=args.peers, **DEMO_SEARCH), peers_file, reference=reference,
                           quiet=False)
    found = json.loads(peers_file.read_text())
    if found.get("family", "roberta") != family:  # a demo directory from before the demo switched to ModernBERT
        raise DwmlError(f"{peers_file}: holds {found.get('family', 'roberta')} peers from an older `dwml demo`; "
                        f"this demo trains {family} models - choose a new --out or remove {out}")
    if len(found.get("peers", [])) != args.peers:
        raise DwmlError(f"{peers_file}: holds {len(found.get('peers', []))} peers from an earlier `dwml demo`, "
                        f"--peers asks for {args.peers}; choose a new --out")
    peer_params = [p["params"] for p in found["peers"]]

    # Same compute: the MLM baseline trains one tiny model for as many parameter-tokens as all peers together.
    mlm_steps = max(1, round(args.steps * sum(peer_params) / count_params(reference)))
    print(f"[3/5] train the {family} tiny MLM baseline ({count_params(reference):,} params, {mlm_steps} steps)")
    mlm_cfg = demo_run_config(out / "mlm", prepared, mlm_steps, train={"method": "mlm"})
    mlm = train(mlm_cfg)
    print(format_summary(mlm))

    print(f"[4/5] train {args.peers} {family} peers with DWML ({args.steps} steps, same compute)")
    dwml_cfg = demo_run_config(out / "dwml", prepared, args.steps,
                               train={"method": "dwml"}, model={"peers_file": str(peers_file)})
    dwml = train(dwml_cfg)
    print(format_summary(dwml))
    omega_log = [json.loads(line) for line in (out / "dwml" / "metrics.jsonl").read_text().splitlines()]
    traj = [r["omega"] for r in omega_log if "outer_step" in r]
    if traj:
        print("omega trajectory (every outer step, first/middle/last): "
              + "  ".join("[" + ", ".join(f"{w:.3f}" for w in traj[i]) + "]"
                          for i in sorted({0, len(traj) // 2, len(traj) - 1})))

    scores = {}
    if not args.no_eval:
        from ..evaluation.evaluate import evaluate_path, format_results

        print("[5/5] zero-shot evaluation on blimp_fast, supplement_fast, ewok_fast")
        tasks = ["blimp_fast", "supplement_fast", "ewok_fast"]
        for name in ("mlm", "dwml"):
            res = evaluate_path(out / name, tasks, limit=args.eval_limit or None, out_file=out / f"eval_{name}.json")
            scores[name] = res
            print(format_results(res, groups=False))

    print()
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs under {out}/")
    print(results_table(mlm, dwml, scores))
    print("final omega: [" + ", ".join(f"{w:.3f}" for w in dwml["omega"]) + "]")
    print(plateau_lines(mlm, dwml))
    return 0


def plateau_lines(mlm: dict, dwml: dict) -> str:
    """How far each model got, in words, next to the unigram entropy (the loss of token frequencies alone)."""
    from ..training.plateau import describe

    entropy = mlm["unigram_entropy"]
    lines = [f"unigram entropy of the train split: {entropy:.3f} nats (a model at this validation loss has learned "
             f"token frequencies and nothing else)"]
    for run, summary in (("mlm", mlm), ("dwml", dwml)):
        for p in summary["peers"]:
            lines.append(f"  {run} {p['name']}: " + describe(p["valid_loss"], entropy, p["plateau_exit_step"]))
    return "\n".join(lines)


def results_table(mlm: dict, dwml: dict, scores: dict) -> str:
    """One row per model: parameters, omega, validation loss before -> after, plateau exit (first step 0.5 nats
    below the unigram entropy), zero-shot accuracies."""
    tasks = ["blimp_fast", "supplement_fast", "ewok_fast"]
    head = (f"{'model':<16}{'params':>10}{'omega':>7}  {'valid loss':<15}{'plateau exit':>13}"
            + "".join(f"{t:>17}" for t in tasks))
    lines = [head, "-" * len(head)]
    rows = [("mlm", "peer0", mlm, 0)] + [("dwml", f"peer{i}", dwml, i) for i in range(len(dwml["peers"]))]
    rows.append(("dwml", "ensemble", dwml, None))
    for run, model, summary, i in rows:
        acc = scores.get(run, {}).get("models", {}).get(model, {}).get("summary", {})
        if i is None:
            params, omega, exit_ = sum(p["params"] for p in summary["peers"]), "-", "-"
            loss = f"{summary['valid_ensemble_loss']:.3f}"
        else:
            params, omega = summary["peers"][i]["params"], f"{summary['omega'][i]:.3f}"
            loss = f"{summary['initial_valid_loss'][i]:.3f} -> {summary['peers'][i]['valid_loss']:.3f}"
            step = summary["peers"][i].get("plateau_exit_step")
            exit_ = "never" if step is None else str(step)
        lines.append(f"{run + ' ' + model:<16}{params:>10,}{omega:>7}  {loss:<15}{exit_:>13}"
                     + "".join(f"{acc[t]:>17.1f}" if t in acc else f"{'-':>17}" for t in tasks))
    ref = next((s["reference"] for s in scores.values() if s.get("reference")), None)
    for r in (ref or {}).get("models", {}).values():  # dwml.evaluation.reference: token counts, no learning
        lines.append(f"{r['label']:<63}" + "".join(f"{r['summary'][t]:>17.1f}" if t in r["summary"]
                                                   else f"{'-':>17}" for t in tasks))
    if ref:
        lines.append("(unigram (train counts), KN trigram: the train split's token counts, no learning; a model "
                     "below them has learned no more than counting)")
    return "\n".join(lines)
