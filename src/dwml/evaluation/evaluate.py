"""`dwml eval`: zero-shot minimal-pair accuracy (BLiMP, BLiMP supplement, EWoK) of a model, or of every peer and the
omega-weighted ensemble of a DWML run.

Accuracies are reported the BabyLM way: a pair is correct when the good text scores at least as high as the bad one,
because BabyLM's pipeline takes the argmax over (good, bad) and the first maximum wins a tie. Beside every accuracy
come the tie count and the strict accuracy (a tie counts wrong): a degenerate model that scores everything alike
looks perfect in the BabyLM form and at 0% in the strict one. Per-pair outcomes (`items`) use the BabyLM form too.

Reported numbers follow BabyLM: accuracy of every group (BLiMP paradigm `UID`, supplement task, EWoK domain), and the
task's headline number is the macro average over groups. BLiMP fields are pooled over their pairs (micro), as in the
pipeline. All accuracies are percentages. EWoK pairs are built as `ewok_pairing` says (`dwml.evaluation.evaldata`); scores are
computed in `precision` (`dwml.evaluation.scoring`): fp32 for reported numbers, bf16 for speed.

BabyLM 2025's other zero-shot tasks (entity tracking, WUG, reading) are read by `dwml.evaluation.babylm_data` and
scored by `dwml.evaluation.babylm_tasks`; `summary` holds one number per score column (reading has two), WUG's rho and
reading's R^2 gains are not accuracies and stay out of the means (`metrics` names each column's kind).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checks import (check_finite_scores, check_model_tokenizer, check_same_tokenizer, exported_tokenizer_sha,
                      model_files)
from ..data.tokenizer import reads_line_ends
from ..errors import DwmlError
from ..io import check_output_file, result_document, write_json
from ..models.memory import check_folder_memory
from ..training.runtime import cpu_has_bf16_kernels
from ..training.runtime import resolve_device as runtime_resolve_device
from .babylm_data import is_babylm_task, load_babylm_task, metric_of, score_columns, task_scores
from .babylm_tasks import describe, detail_rows, evaluate_babylm_task
from .evaldata import EWOK_PAIRINGS, TASKS, MinimalPair, check_ewok_pairing, default_data_dir, load_task, parse_tasks
from .outcomes import summarize
from .reference import reference_note, reference_results, reference_rows, run_prepared_dir
from .scoring import METHODS, PRECISIONS, PeerEnsemble, check_precision, check_token_budget, score_sentences

DEFAULT_TASKS = "blimp_filtered,blimp_supplement,ewok"
TIES_RULE = "correct"  # how `accuracy` / `macro_accuracy` count a tie (BabyLM); the strict_* numbers count it wrong


# ------------------------------------------------------------------------------------------------ scoring of pairs


def score_pairs(model, tokenizer, pairs: Sequence[MinimalPair], *, method: str = "pll",
                token_budget: int | None = None, device=None,
                precision: str = "fp32") -> tuple[list[float], list[float]]:
    """(good scores, bad scores): both sides of all pairs go through the batched scorer in one call."""
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    prefixes = [p.good_prefix for p in pairs] + [p.bad_prefix for p in pairs]
    has_prefix = any(x is not None for x in prefixes)
    scores = score_sentences(model, tokenizer, sentences, method=method, prefixes=prefixes if has_prefix else None,
                             token_budget=token_budget, device=device, precision=precision)
    return scores[: len(pairs)], scores[len(pairs):]


def evaluate_model(model, tokenizer, tasks: Sequence[str], *, method: str = "pll", token_budget: int | None = None,
                   device=None, limit: int | None = None, data_dir=None,
                   task_pairs: dict[str, list[MinimalPair]] | None = None,
                   log: Callable[[str], None] | None = None, precision: str = "fp32",
                   ewok_pairing: str = EWOK_PAIRINGS[0]) -> dict[str, dict]:
    """{task: summarize(...)} for one model (or PeerEnsemble)."""
    out = {}
    for task in tasks:
        if is_babylm_task(task):  # entity tracking, WUG, reading: dwml.evaluation.babylm_tasks
            items = task_pairs[task] if task_pairs is not None else load_babylm_task(task, data_dir, limit)
            out[task] = evaluate_babylm_task(model, tokenizer, task, items, method=method, token_budget=token_budget,
                                             device=device, precision=precision)
            if log:
                log(f"  {task}: {describe(task, out[task])}, {out[task]['seconds']:.1f}s")
            continue
        pairs = task_pairs[task] if task_pairs is not None else load_task(task, data_dir, limit, ewok_pairing)
        start = time.perf_counter()
        good, bad = score_pairs(model, tokenizer, pairs, method=method, token_budget=token_budget, device=device,
                                precision=precision)
        check_finite_scores(list(good) + list(bad), task)
        out[task] = summarize(pairs, good, bad)
        out[task]["seconds"] = round(time.perf_counter() - start, 3)
        if log:
            r = out[task]
            log(f"  {task}: {r['macro_accuracy']:.2f}% macro ({r['strict_macro_accuracy']:.2f}% with ties wrong), "
                f"{r['ties']} ties, {r['n']} pairs, {r['seconds']:.1f}s")
    return out


# ------------------------------------------------------------------------------------------------ models on disk


def resolve_device(name: str | torch.device | None) -> torch.device:
    return runtime_resolve_device(name, field="--device")


def load_masked_lm(path: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a Hugging Face folder, model in eval mode on `device`."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DwmlError(f"{path}: not a model folder (no config.json)")
    check_model_tokenizer(path)  # without tokenizer files transformers builds an empty one (everything ties)
    check_folder_memory(path, device)  # its config.json's shape must fit before the weights are allocated
    with model_files(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForMaskedLM.from_pretrained(path)
    check_model_tokenizer(path, tokenizer, model)
    return model.to(device).eval(), tokenizer


def select_models(entries: list[tuple[str, Path]], names: Sequence[str], path: str | Path) -> list[tuple[str, Path]]:
    """The entries named in `names` (in the run's order); an unknown or repeated name, or none at all, fails."""
    known = [n for n, _ in entries]
    bad = [n for n in names if n not in known]
    if bad or not names or len(set(names)) < len(names):
        raise DwmlError(f"--models: {path} has models {known}; got {list(names)}")
    return [e for e in entries if e[0] in names]


def find_models(path: str | Path) -> tuple[list[tuple[str, Path]], list[float] | None]:
    """[(name, model dir)] and omega (None for a plain model folder).

    Accepts a DWML run (RUN/final/summary.json + RUN/final/peer*/), its `final/` folder, or a Hugging Face folder.
    """
    path = Path(path)
    if not path.exists():
        raise DwmlError(f"{path}: no such run or model folder")
    final = path / "final" if (path / "final" / "summary.json").is_file() else path
    summary_file = final / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DwmlError(f"{summary_file}: invalid JSON ({e.msg})") from None
        omega = summary.get("omega")
        if not isinstance(omega, list) or not omega or not all(isinstance(w, (int, float)) for w in omega):
            raise DwmlError(f"{summary_file}: field 'omega' must be a non-empty list of numbers")
        peers = [(f"peer{i}", final / f"peer{i}") for i in range(len(omega))]
        missing = [str(d) for _, d in peers if not (d / "config.json").is_file()]
        if missing:
            raise DwmlError(f"{summary_file}: {len(omega)} omega weights but missing peer folder(s) {missing}")
        for _, d in peers:  # the run's own tokenizer (recorded at training), not one swapped in since
            check_model_tokenizer(d)
            check_same_tokenizer(d, exported_tokenizer_sha(summary), f"the one {path} was trained with")
        return peers, [float(w) for w in omega]
    if (path / "config.json").is_file():
        return [(path.name or "model", path)], None
    raise DwmlError(f"{path}: expected a DWML run (final/summary.json) or a Hugging Face model folder (config.json)")


def _check_same_vocab(tokenizers: list[tuple[str, object]]) -> None:
    (name0, tok0), rest = tokenizers[0], tokenizers[1:]
    vocab0 = tok0.get_vocab()
    for name, tok in rest:
        if tok.get_vocab() != vocab0:
            raise DwmlError(f"ensemble: {name}'s tokenizer differs from {name0}'s; peers must share one vocabulary")


def evaluate_path(path: str | Path, tasks: str | Sequence[str] = DEFAULT_TASKS, *, method: str = "pll",
                  token_budget: int | None = None, device: str | torch.device | None = "auto",
                  limit: int | None = None, data_dir: str | Path | None = None, ensemble: bool = True,
                  out_file: str | Path | None = None, log: Callable[[str], None] | None = None,
                  precision: str = "fp32", ewok_pairing: str = EWOK_PAIRINGS[0],
                  reference_data: str | Path | None = None, reference: bool = True,
                  models: Sequence[str] | None = None) -> dict:
    """Evaluate a model folder, or every peer and the omega-weighted ensemble of a DWML run.

    `models` (a run only): score just these peers (`peer0`, ...); the ensemble, which needs every peer, is then
    scored only when all of them are named.

    `out_file` also writes the result there as JSON (atomically). The texts are tokenised and their masked copies
    built once for all models (`dwml.evaluation.scoring.cached_masked_copies`).

    Returns {"path", "kind": "model"|"run", "method", "precision", "ewok_pairing", "ties_count_as", "tasks", "limit",
             "device", "omega", "models": {name: {"tasks": {task: summarize(...)}, "summary": {task: macro %},
                                        "strict_summary": {task: macro % with ties wrong}, "ties": {task: n},
                                        "seconds"}},
             "reference": lines of token counts (`dwml.evaluation.reference.reference_results`) of `reference_data`,
                          else of the prepared data a run was trained on; absent when neither is known or not `reference`}.
    """
    if method not in METHODS:
        raise DwmlError(f"--method: expected one of {list(METHODS)}, got {method!r}")
    check_token_budget(token_budget)  # every argument is checked before a model is loaded
    check_precision(precision)
    check_ewok_pairing(ewok_pairing)
    task_names = parse_tasks(tasks)
    dev = resolve_device(device)
    if precision == "bf16" and dev.type == "cpu" and not cpu_has_bf16_kernels():
        raise DwmlError("--precision bf16: this CPU has no bf16 matmul kernels (AVX512, AMX or ARM bf16), so bf16 "
                        "scoring would be far slower than fp32 here; use --precision fp32")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    # read once, shared by all models
    task_pairs = {t: load_babylm_task(t, data_dir, limit) if is_babylm_task(t) else
                  load_task(t, data_dir, limit, ewok_pairing) for t in task_names}
    entries, omega = find_models(path)
    if models is not None:
        entries = select_models(entries, models, path)
    result = {"path": str(path), "kind": "run" if omega is not None else "model", "method": method,
              "precision": precision, "ewok_pairing": ewok_pairing, "ties_count_as": TIES_RULE,
              "tasks": task_names, "limit": limit, "data_dir": str(data_dir), "device": str(dev),
              "token_budget": token_budget, "omega": omega,
              "metrics": {c: metric_of(c) for c in score_columns(task_names)}, "models": {}}
    ref_dir = (Path(reference_data) if reference_data is not None else run_prepared_dir(path)) if reference else None
    if ref_dir is not None:  # before any model loads; cached in the prepared directory after the first time
        line_ends = all(reads_line_ends(d) for _, d in entries)  # tokenised as the models read the texts
        result["reference"] = reference_results(ref_dir, task_names, data_dir=data_dir, limit=limit,
                                                ewok_pairing=ewok_pairing, task_pairs=task_pairs, log=log,
                                                line_ends=line_ends)

    def run(name, model, tokenizer):
        if log:
            log(f"{name}:")
        start = time.perf_counter()
        res = evaluate_model(model, tokenizer, task_names, method=method, token_budget=token_budget, device=dev,
                             task_pairs=task_pairs, log=log, precision=precision)
        acc = {t: r for t, r in res.items() if metric_of(t) == "accuracy"}  # summary: every column's number
        result["models"][name] = {"tasks": res, "summary": {c: v for t, r in res.items()
                                                            for c, v in task_scores(t, r).items()},
                                  "strict_summary": {t: r["strict_macro_accuracy"] for t, r in acc.items()},
                                  "ties": {t: r["ties"] for t, r in acc.items()},
                                  "seconds": round(time.perf_counter() - start, 3)}

    loaded = [(name, *load_masked_lm(folder, dev)) for name, folder in entries]
    with_ensemble = ensemble and omega is not None and len(loaded) == len(omega) > 1
    if with_ensemble:  # fail before any scoring
        _check_same_vocab([(n, t) for n, _, t in loaded])
    for name, model, tokenizer in loaded:
        run(name, model, tokenizer)
    if with_ensemble:
        run("ensemble", PeerEnsemble([m for _, m, _ in loaded], omega), loaded[0][2])
    if out_file is not None:
        write_json(out_file, result_document("eval", result))
    return result


# ------------------------------------------------------------------------------------------------ tables


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(row: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def format_report(result: dict, groups: bool = True) -> str:
    """Plain-text tables: macro accuracy per model and task (BabyLM form), their mean, the mean with ties wrong and the
    ties; then per group / field for every task."""
    models = list(result["models"])
    tasks = result["tasks"]
    out = [f"{result['path']}  method={result['method']}  precision={result.get('precision', 'fp32')}  "
           f"ewok_pairing={result.get('ewok_pairing', 'contexts')}  limit={result['limit']}",
           "(accuracy %, task score = macro average over groups; a tie counts correct as in BabyLM, "
           "strict = ties wrong)"]
    acc_tasks, columns = [t for t in tasks if metric_of(t) == "accuracy"], score_columns(tasks)
    if len(acc_tasks) < len(tasks):
        out.append("(wug_*: Spearman rho x 100; reading_*: gain in R^2, % of the possible gain; not accuracies, so "
                   "not in the means)")
    rows = []
    for m in models:
        res = result["models"][m]["tasks"]
        scores = {c: v for t in tasks for c, v in task_scores(t, res[t]).items()}
        macro = [res[t]["macro_accuracy"] for t in acc_tasks]
        strict = [_strict_macro(res[t]) for t in acc_tasks]
        rows.append([m] + ["n/a" if scores.get(c) is None else f"{scores[c]:.2f}" for c in columns]
                    + ([f"{sum(macro) / len(macro):.2f}", f"{sum(strict) / len(strict):.2f}",
                        str(sum(res[t]["ties"] for t in acc_tasks))] if acc_tasks else []))
    ref = result.get("reference")  # lines of token counts: what a model must beat to have learned more than counting
    rows += reference_rows(ref, columns, acc_tasks) if ref else []
    out += ["", _table(["model"] + columns + (["mean", "strict mean", "ties"] if acc_tasks else []), rows)]
    out += [reference_note(ref)] if ref else []
    if groups:
        for t in tasks:
            first = result["models"][models[0]]["tasks"][t]
            if "groups" not in first:  # WUG, reading: their own numbers
                per = [detail_rows(result["models"][m]["tasks"][t]) for m in models]
                rows = [[label] + [p[i][1] for p in per] for i, (label, _) in enumerate(per[0])]
                out += ["", f"== {t}", _table(["measure"] + models, rows)]
                continue
            sections = [("groups", sorted(first["groups"]))]
            if "fields" in first:
                sections.append(("fields", sorted(first["fields"])))
            rows = []
            for key, names in sections:
                for name in names:
                    rows.append([name if key == "groups" else f"[{name}]"]
                                + [f"{result['models'][m]['tasks'][t][key][name]['accuracy']:.2f}" for m in models])
            per = [result["models"][m]["tasks"][t] for m in models]
            rows.append(["MACRO"] + [f"{r['macro_accuracy']:.2f}" for r in per])
            rows.append(["MACRO strict"] + [f"{_strict_macro(r):.2f}" for r in per])
            rows.append(["micro"] + [f"{r['accuracy']:.2f}" for r in per])
            rows.append(["ties / pairs"] + [f"{r['ties']}/{first['n']}" for r in per])
            out += ["", f"== {t}", _table(["group"] + models, rows)]
    return "\n".join(out)


def _strict_macro(task_result: dict) -> float:
    """Macro accuracy with ties wrong; results written before both forms were reported held only that one."""
    return task_result.get("strict_macro_accuracy", task_result["macro_accuracy"])


format_results = format_report  # the name dwml.experiments.demo imports


# ------------------------------------------------------------------------------------------------ CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="zero-shot BLiMP / supplement / EWoK accuracy of a model or of a DWML run's peers + ensemble",
        description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="DWML run folder (RUN/ or RUN/final/) or a Hugging Face masked-LM folder")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated, from {sorted(TASKS)} "
                   f"(default: {DEFAULT_TASKS})")
    p.add_argument("--method", choices=METHODS, default="pll",
                   help="pll (Salazar et al. 2020) or pll_word_l2r (Kauf & Ivanova 2023)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default; true fp32, no TF32: the numbers to report) or bf16 (autocast: faster on GPUs)")
    p.add_argument("--ewok-pairing", choices=EWOK_PAIRINGS, default=EWOK_PAIRINGS[0],
                   help="targets (default, BabyLM's: Context1 + Target1 vs Context1 + Target2) or contexts (Target1 "
                        "after Context1 vs after Context2)")
    p.add_argument("--out", default=None, help="write the full results as JSON here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not a previous result of this command")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens (rows x padded length) per forward batch (default 8192 on CPU, 65536 on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--limit", type=int, default=None, help="first N pairs of every file (quick runs)")
    p.add_argument("--data-dir", default=None, help="eval data root (default: ../shared/data/eval or $DWML_EVAL_DATA)")
    p.add_argument("--no-ensemble", action="store_true", help="for a run: evaluate the peers only")
    p.add_argument("--models", default=None,
                   help="for a run: comma-separated peers to score (e.g. peer0); the ensemble only if all are named")
    p.add_argument("--no-groups", action="store_true", help="print only the summary table")
    p.add_argument("--reference-data", default=None,
                   help="prepared data (`dwml prepare` output) whose train token counts give the reference lines "
                        "(unigram, KN trigram; default: the data a DWML run was trained on, when still there)")
    p.add_argument("--no-reference", action="store_true", help="no reference lines of token counts")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    check_output_file(args.out, "eval", overwrite=args.overwrite)  # before any work: refused now, not after it
    result = evaluate_path(args.path, args.tasks, method=args.method, token_budget=args.token_budget,
                           device=args.device, limit=args.limit, data_dir=args.data_dir, ensemble=not args.no_ensemble,
                           out_file=args.out, log=lambda s: print(s, file=sys.stderr, flush=True),
                           precision=args.precision, ewok_pairing=args.ewok_pairing,
                           reference_data=args.reference_data, reference=not args.no_reference,
                           models=None if args.models is None else [m.strip() for m in args.models.split(",")])
    print(format_report(result, groups=not args.no_groups))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0
