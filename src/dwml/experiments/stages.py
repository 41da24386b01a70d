"""The stages of `dwml experiment`, each skipped when its output exists: data, peer search, train, FLOPs, eval, finetune.

Each stage writes one file or directory of the experiment directory (data/, peers.json, the run directory,
flops_<run>.json, eval_<run>.json, finetune_<run>.json); `fresh_output` tells a result written after its run finished
from a stale one (the run was trained again since).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig, from_dict, read_toml
from ..errors import DwmlError, require
from ..evaluation.glue import FinetuneConfig
from ..io import write_json
from .config import ExperimentConfig
from .plan import PlannedRun, fingerprint


def prepared_dir(cfg: ExperimentConfig, exp_dir: Path) -> Path:
    return Path(cfg.data.prepared) if cfg.data.prepared else exp_dir / "data"


def ensure_data(cfg: ExperimentConfig, exp_dir: Path, log: Callable[[str], None]) -> Path:
    from ..data.prepare import check_reusable, default_corpus_path, prepare

    prepared = prepared_dir(cfg, exp_dir)
    p = cfg.prepare
    if (prepared / "meta.json").is_file():
        if not cfg.data.prepared:  # OUT/data from an earlier run of this file: made with today's [prepare]?
            check_reusable(prepared, p.inputs or [default_corpus_path()], vocab_size=p.vocab_size,
                           valid_fraction=p.valid_fraction, seed=p.seed, lowercase=p.lowercase,
                           min_frequency=p.min_frequency, max_docs=p.max_docs or None, speaker_tags=p.speaker_tags)
        log(f"data: {prepared} (prepared)")
        return prepared
    require(not cfg.data.prepared, f"{cfg.source}: data.prepared: {prepared} has no meta.json (run `dwml prepare`)")
    inputs = p.inputs or [default_corpus_path()]
    log(f"data: prepare {', '.join(map(str, inputs))} -> {prepared}")
    prepare(inputs, prepared, vocab_size=p.vocab_size, valid_fraction=p.valid_fraction, seed=p.seed,
            lowercase=p.lowercase, min_frequency=p.min_frequency, max_docs=p.max_docs or None,
            speaker_tags=p.speaker_tags)
    return prepared


def search_settings(cfg: ExperimentConfig, vocab_size: int):
    """The [search] config with the data's vocabulary and the runs' positions filled in."""
    base = from_dict(RunConfig, cfg.base, "base")
    seq_len = base.data.seq_len
    from ..models.model import POSITION_OFFSET

    s = cfg.search
    family = s.family or base.model.family  # the peers of [base]'s family
    return dataclasses.replace(s, vocab_size=s.vocab_size or vocab_size, family=family,
                               max_positions=s.max_positions or seq_len + POSITION_OFFSET)


def ensure_peers(cfg: ExperimentConfig, exp_dir: Path, vocab_size: int, log: Callable[[str], None],
                 write: bool = True) -> list[dict] | None:
    """Peer architectures from OUT/peers.json, searched (again) when missing or made with other settings."""
    if cfg.search is None:
        return None
    from ..models.search import run_search_to_file, search

    settings = search_settings(cfg, vocab_size)
    path = exp_dir / "peers.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("config") == {**dataclasses.asdict(settings), "reference": settings.reference}:
            return [p["arch"] for p in old["peers"]]
        log(f"search: {path} was made with other settings; searching again")
    log(f"search: {settings.peers} peers below {settings.reference} (vocab {settings.vocab_size})")
    result = run_search_to_file(settings, path) if write else search(settings)
    return [p["arch"] for p in result["peers"]]


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def fresh_output(path: Path, plan: PlannedRun) -> Any:
    """The JSON at `path` if it was written after the run finished (else None: the run was trained again since)."""
    summary = Path(plan.config.out_dir) / "final" / "summary.json"
    if not path.is_file() or not summary.is_file() or path.stat().st_mtime < summary.stat().st_mtime:
        return None
    return read_json_or_none(path)


def check_run_dir(plan: PlannedRun) -> None:
    """A run directory made by another configuration is never trained further or reported as this run."""
    path = Path(plan.config.out_dir) / "config.toml"
    if not path.is_file():
        return
    try:
        old = from_dict(RunConfig, read_toml(path), str(path))
    except DwmlError:
        old = None
    if old is None or fingerprint(old) != fingerprint(plan.config):
        raise DwmlError(f"{path}: run {plan.name!r} was started with another configuration; delete "
                        f"{path.parent} (or change out_dir) to train it again")


def train_stage(plan: PlannedRun, exp_dir: Path, log: Callable[[str], None]) -> dict:
    from ..training.measure import timed
    from ..training.runtime import resolve_device
    from ..training.train import train

    run_dir = Path(plan.config.out_dir)
    summary_path = run_dir / "final" / "summary.json"
    check_run_dir(plan)
    if summary_path.is_file():
        log(f"run {plan.name}: trained (skipped)")
        return json.loads(summary_path.read_text(encoding="utf-8"))
    from ..training.checkpoint import list_checkpoints

    resumed = bool(list_checkpoints(run_dir)) if run_dir.is_dir() else False
    log(f"run {plan.name}: train {plan.method}, {plan.config.train.max_steps} steps -> {run_dir}"
        + (" (resuming from its last checkpoint)" if resumed else ""))
    summary, timing = timed(train, plan.config, device=resolve_device(plan.config.train.device))
    timing["resumed"] = resumed  # then wall_s covers only the part trained by this call
    write_json(exp_dir / f"timing_{plan.name}.json", timing)
    log(f"run {plan.name}: trained in {timing['wall_s']:.0f} s")
    return summary


def flops_stage(plan: PlannedRun, exp_dir: Path) -> dict:
    path = exp_dir / f"flops_{plan.name}.json"
    old = fresh_output(path, plan)
    if old is not None:
        return old
    from ..training.measure import measure_step_flops

    measured = measure_step_flops(plan.config)
    write_json(path, measured)
    return measured


def eval_settings(cfg: ExperimentConfig) -> dict:
    e = cfg.eval
    return {"tasks": list(e.tasks), "limit": e.limit or None, "method": e.method, "precision": e.precision,
            "ewok_pairing": e.ewok_pairing}


def models_to_score(cfg: ExperimentConfig, summary: dict) -> list[str] | None:
    """The peers `eval.peers` asks for: None = all (and the ensemble); best_loss = the one peer of a multi-peer run
    with the lowest final validation loss, chosen before any scoring (a run's best peer is otherwise chosen by
    zero-shot accuracy, which needs every peer scored)."""
    peers = summary["peers"]
    if cfg.eval.peers == "all" or len(peers) == 1:
        return None
    losses = [p["valid_loss"] if p.get("valid_loss") is not None else math.inf for p in peers]
    return [f"peer{losses.index(min(losses))}"]


def eval_stage(cfg: ExperimentConfig, plan: PlannedRun, exp_dir: Path, summary: dict,
               log: Callable[[str], None]) -> dict | None:
    if not cfg.eval.enabled:
        return None
    path = exp_dir / f"eval_{plan.name}.json"
    old = fresh_output(path, plan)
    want, models = eval_settings(cfg), models_to_score(cfg, summary)
    if old is not None and {k: old.get(k) for k in want} == want and (
            models is None or sorted(old.get("models", {})) == models):
        return old
    from ..evaluation.evaluate import evaluate_path

    e = cfg.eval
    log(f"run {plan.name}: zero-shot eval on {', '.join(e.tasks)}" + (f" (limit {e.limit})" if e.limit else "")
        + (f", {models[0]} only (lowest validation loss)" if models else ""))
    return evaluate_path(plan.config.out_dir, e.tasks, method=e.method, token_budget=e.token_budget or None,
                         device=e.device, limit=e.limit or None, ensemble=e.ensemble, out_file=path,
                         precision=e.precision, ewok_pairing=e.ewok_pairing, models=models)


def finetune_stage(cfg: ExperimentConfig, plan: PlannedRun, exp_dir: Path, summary: dict, evaluation: dict | None,
                   log: Callable[[str], None]) -> dict | None:
    f = cfg.finetune
    if not f.enabled:
        return None
    from ..evaluation.finetune import finetune_model
    from .analysis import best_model, model_rows

    ft_cfg = FinetuneConfig(**{x.name: getattr(f, x.name) for x in dataclasses.fields(FinetuneConfig)})
    rows = model_rows(summary, evaluation, None)
    names = [r["name"] for r in rows if r["name"] != "ensemble"]
    if f.models == "best":
        names = [best_model(rows)]
    settings = {k: v for k, v in dataclasses.asdict(ft_cfg).items() if k not in ("progress", "device")}
    path = exp_dir / f"finetune_{plan.name}.json"
    old = fresh_output(path, plan)
    if old is not None and old.get("settings") == settings and sorted(old.get("models", {})) == sorted(names):
        return old
    log(f"run {plan.name}: fine-tune {', '.join(names)} on {', '.join(ft_cfg.tasks)}")
    final = Path(plan.config.out_dir) / "final"
    result = {"settings": settings, "models": {n: finetune_model(final / n, ft_cfg) for n in names}}
    write_json(path, result)
    return result
