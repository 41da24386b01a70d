"""`dwml experiment CONFIG`: a whole comparison of methods on the same data and budget, evaluated and reported.

One TOML file describes the experiment (strict: an unknown key is an error naming the file and the key):

    name = "tiny"                    # report title
    out_dir = "runs/experiment-tiny" # the experiment directory (relative to the working directory)
    [prepare]                        # data: `dwml prepare` into OUT/data (inputs = [] -> ../shared/data/corpus) ...
    [data] prepared = "DIR"          # ... or reuse a prepared directory (then no [prepare])
    [base]                           # a RunConfig (data/model/train/distill tables) applied to every run
    [search]                         # `dwml search` settings -> OUT/peers.json, the peers of the runs below
    [[runs]]                         # name, method, optional teacher ("run:NAME" = another run of this file,
                                     # or a model/run directory), optional peers (k = the first k searched peers;
                                     # 0 = all of them for dml/dwml/kd_dwml, [base].model for the others), and
                                     # optional data/model/train/distill tables overriding [base]
    [sweep]                          # base = "RUN"; axis = [values], one axis at a time: `peers` or any [distill]
                                     # field (alpha, learn_omega, ...); run "RUN-alpha0.3" etc.
    [eval]                           # zero-shot tasks, limit, scoring method, precision, ewok_pairing (`dwml eval`)
    [finetune]                       # enabled, models = "best"|"all", and any `dwml finetune` setting

The experiment directory holds data/ (if prepared here), peers.json, one run directory per run, eval_<run>.json,
finetune_<run>.json, timing_<run>.json, flops_<run>.json, results.json (every number of the report),
report.md and figures/*.png. Every stage is skipped when its output exists: re-running the command after an
interruption resumes the interrupted run (`dwml.training.train.train` resumes from its checkpoints) and redoes nothing
finished. A run directory holding another configuration is an error, never silently reused.

Same data and budget: every run trains on the same prepared data, with the same steps, batch size, gradient
accumulation and sequence length (all from [base]; the data stream is seeded by train.seed, so every run sees the
same batches and masks). Every student therefore sees the same tokens. Compute is *not* equalised: a run of M peers
trains M networks (plus, for DWML, an outer omega step every K steps) and kd runs a teacher forward. The report lists
tokens and analytic and measured FLOPs per run (Table 9) so these differences are visible next to the accuracies.

Sweeps vary one axis at a time around the base run (not a grid). A variant whose resolved configuration equals an
existing run's (e.g. alpha = the base's alpha) is not trained again: it points to that run ("alias"). peers = 1 on a
peer method is the single network without mutual learning: dml/dwml become mlm, kd_dwml becomes kd, on the first
searched peer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import METHODS, DistillConfig, RunConfig, from_dict, merge, parse_set, read_toml, to_toml
from ..errors import DwmlError, require
from ..evaluation.finetune import FinetuneConfig
from ..io import claim_dir, write_json
from ..training.metrics import read_records

SECTIONS = ("data", "model", "train", "distill")  # RunConfig tables a run may override
PEER_METHODS = ("dml", "dwml", "kd_dwml")
LEARNED_OMEGA_METHODS = ("dwml", "kd_dwml")
# peers = 1 on a peer method: the same network trained without peers.
SINGLE_PEER_METHOD = {"dml": "mlm", "dwml": "mlm", "kd_dwml": "kd"}
DEFAULT_EVAL_TASKS = ["blimp_filtered", "blimp_supplement", "ewok"]
RESERVED_NAMES = {"data", "figures"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class PrepareSection:
    inputs: list = field(default_factory=list)  # corpus files/directories; empty = ../shared/data/corpus
    vocab_size: int = 8192
    valid_fraction: float = 0.02
    max_docs: int = 0  # 0 = every document
    seed: int = 0
    lowercase: bool = False
    min_frequency: int = 2


@dataclass
class DataSection:
    prepared: str = ""  # a `dwml prepare` directory to reuse; "" = prepare into OUT/data from [prepare]


@dataclass
class EvalSection:
    enabled: bool = True
    tasks: list = field(default_factory=lambda: list(DEFAULT_EVAL_TASKS))
    limit: int = 0  # pairs per file; 0 = all
    method: str = "pll"  # pll | pll_word_l2r
    precision: str = "fp32"  # fp32 (true fp32: the numbers to report) | bf16 (autocast, faster on GPUs)
    ewok_pairing: str = "targets"  # targets (BabyLM: C1+T1 vs C1+T2) | contexts (T1 after C1 vs after C2)
    ensemble: bool = True  # also score the omega-weighted ensemble of multi-peer runs
    token_budget: int = 0  # 0 = the scorer's default
    device: str = "auto"


@dataclass
class FinetuneSection(FinetuneConfig):
    """[finetune]: every `FinetuneConfig` field, plus whether to fine-tune at all and which models of a run."""

    enabled: bool = False
    models: str = "best"  # best (the run's best peer by zero-shot accuracy) | all (every peer)


@dataclass
class RunSpec:
    name: str = ""
    method: str = ""
    teacher: str = ""  # "run:NAME" (a run of this experiment, trained first) or a model / run directory
    peers: int = 0  # k > 0: the first k searched peers; 0: all searched peers (peer methods) or [base].model
    data: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)


@dataclass
class SweepSection:
    base: str = ""
    axes: dict = field(default_factory=dict)  # axis -> list of values, in file order


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    out_dir: str = "runs/experiment"
    description: str = ""
    prepare: PrepareSection = field(default_factory=PrepareSection)
    data: DataSection = field(default_factory=DataSection)
    base: dict = field(default_factory=dict)
    search: Any = None  # dwml.models.search.SearchConfig or None
    runs: list = field(default_factory=list)  # RunSpec
    sweep: SweepSection | None = None
    eval: EvalSection = field(default_factory=EvalSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    source: str = ""  # the config file
    raw: dict = field(default_factory=dict)  # the parsed TOML (after --set), kept for results.json


TOP_KEYS = ("name", "out_dir", "description", "prepare", "data", "base", "search", "runs", "sweep", "eval", "finetune")


def load_experiment(path: str | Path, sets: list[str] | None = None) -> ExperimentConfig:
    """Parse and validate an experiment TOML (+ `--set section.key=value` overrides)."""
    data = read_toml(path)
    for s in sets or []:
        data = merge(data, parse_set(s))
    return parse_experiment(data, str(path))


def parse_experiment(data: dict, where: str = "experiment") -> ExperimentConfig:
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise DwmlError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(TOP_KEYS)}")
    cfg = ExperimentConfig(source=where, raw=data)
    for key in ("name", "out_dir", "description"):
        if key in data:
            require(isinstance(data[key], str), f"{where}: {key}: expected a string, got {data[key]!r}")
            setattr(cfg, key, data[key])
    require(bool(cfg.out_dir), f"{where}: out_dir: expected a directory")
    if "prepare" in data:
        cfg.prepare = from_dict(PrepareSection, data["prepare"], f"{where}: prepare")
    if "data" in data:
        cfg.data = from_dict(DataSection, data["data"], f"{where}: data")
    require(not (cfg.data.prepared and "prepare" in data),
            f"{where}: give either [prepare] (prepare the data here) or [data] prepared (reuse), not both")
    p = cfg.prepare
    require(p.vocab_size > 4, f"{where}: prepare.vocab_size: expected > 4, got {p.vocab_size}")
    require(p.max_docs == 0 or p.max_docs >= 2, f"{where}: prepare.max_docs: expected 0 (all) or >= 2")
    require(0 < p.valid_fraction < 1, f"{where}: prepare.valid_fraction: expected (0, 1), got {p.valid_fraction}")

    base = data.get("base", {})
    require(isinstance(base, dict), f"{where}: base: expected a table")
    unknown = sorted(set(base) - set(SECTIONS))
    if unknown:
        raise DwmlError(f"{where}: base: unknown key(s) {unknown}; expected some of {list(SECTIONS)} "
                        "(out_dir and data.prepared are set by the experiment)")
    require("prepared" not in base.get("data", {}),
            f"{where}: base.data.prepared: set by the experiment; use [data] prepared = DIR to reuse data")
    from_dict(RunConfig, base, f"{where}: base")  # field names and types; values are validated per run
    cfg.base = base

    if "search" in data:
        from ..models.search import SearchConfig

        cfg.search = from_dict(SearchConfig, data["search"], f"{where}: search").validate()

    runs = data.get("runs", [])
    require(isinstance(runs, list) and len(runs) > 0, f"{where}: runs: expected at least one [[runs]] table")
    names: set[str] = set()
    for i, r in enumerate(runs):
        at = f"{where}: runs[{i}]"
        spec = from_dict(RunSpec, r, at)
        require(bool(NAME_RE.match(spec.name)) and spec.name not in RESERVED_NAMES,
                f"{at}: name: expected letters, digits, '.', '_' or '-' (not {sorted(RESERVED_NAMES)}), "
                f"got {spec.name!r}")
        require(spec.name not in names, f"{at}: name: duplicate run name {spec.name!r}")
        require(spec.method in METHODS, f"{at} ({spec.name}): method: expected one of {list(METHODS)}, "
                f"got {spec.method!r}")
        require(spec.peers >= 0, f"{at} ({spec.name}): peers: expected an integer >= 0, got {spec.peers}")
        from_dict(RunConfig, {s: getattr(spec, s) for s in SECTIONS if getattr(spec, s)}, f"{at} ({spec.name})")
        names.add(spec.name)
        cfg.runs.append(spec)
    for spec in cfg.runs:
        if spec.teacher.startswith("run:"):
            require(spec.teacher[4:] in names,
                    f"{where}: runs ({spec.name}): teacher {spec.teacher!r}: no run named {spec.teacher[4:]!r}")
            require(spec.teacher[4:] != spec.name, f"{where}: runs ({spec.name}): a run cannot be its own teacher")

    if "sweep" in data:
        cfg.sweep = parse_sweep(data["sweep"], f"{where}: sweep", names)

    if "eval" in data:
        cfg.eval = from_dict(EvalSection, data["eval"], f"{where}: eval")
    from ..evaluation.evaldata import EWOK_PAIRINGS, parse_tasks
    from ..evaluation.scoring import METHODS as SCORING, PRECISIONS

    try:
        cfg.eval.tasks = parse_tasks(cfg.eval.tasks)
    except DwmlError as e:
        raise DwmlError(f"{where}: eval.tasks: {e}") from None
    require(cfg.eval.method in SCORING, f"{where}: eval.method: expected one of {list(SCORING)}")
    require(cfg.eval.precision in PRECISIONS, f"{where}: eval.precision: expected one of {list(PRECISIONS)}")
    require(cfg.eval.ewok_pairing in EWOK_PAIRINGS,
            f"{where}: eval.ewok_pairing: expected one of {list(EWOK_PAIRINGS)}")
    require(cfg.eval.limit >= 0, f"{where}: eval.limit: expected 0 (all) or a number of pairs per file")

    if "finetune" in data:
        cfg.finetune = from_dict(FinetuneSection, data["finetune"], f"{where}: finetune")
    require(cfg.finetune.models in ("best", "all"),
            f"{where}: finetune.models: expected best|all, got {cfg.finetune.models!r}")
    if cfg.finetune.enabled:
        try:
            cfg.finetune.validate()
        except DwmlError as e:
            raise DwmlError(f"{where}: {e}") from None
    return cfg


def parse_sweep(data: Any, where: str, run_names: set[str]) -> SweepSection:
    require(isinstance(data, dict), f"{where}: expected a table")
    base = data.get("base")
    require(isinstance(base, str) and base in run_names,
            f"{where}.base: expected the name of a run to vary, one of {sorted(run_names)}; got {base!r}")
    distill_fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    allowed = ["peers"] + sorted(distill_fields)
    axes: dict[str, list] = {}
    for axis, values in data.items():
        if axis == "base":
            continue
        require(axis in allowed, f"{where}: unknown key {axis!r}; expected base and sweep axes from {allowed}")
        require(isinstance(values, list) and len(values) > 0, f"{where}.{axis}: expected a non-empty list of values")
        for v in values:
            if axis == "peers":
                require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                        f"{where}.peers: expected integers >= 1, got {v!r}")
            else:  # the type check of the [distill] field itself
                from_dict(DistillConfig, {axis: v}, where)
        require(len(set(map(repr, values))) == len(values), f"{where}.{axis}: duplicate values {values}")
        axes[axis] = list(values)
    require(len(axes) > 0, f"{where}: no sweep axis given (e.g. alpha = [0.3, 0.5, 0.7])")
    return SweepSection(base=base, axes=axes)


def format_value(v: Any) -> str:
    """Sweep values in run names: true/false, 0.3, 2."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------------------------
# Planning: specs -> resolved RunConfigs


@dataclass
class PlannedRun:
    name: str
    method: str
    config: RunConfig
    teacher_run: str | None = None  # a run of this experiment that must finish first
    sweep: dict | None = None  # {"base", "axis", "value"} for a sweep variant
    alias_of: str | None = None  # a sweep variant identical to an existing run


def resolve_run_config(cfg: ExperimentConfig, spec: RunSpec, exp_dir: Path, prepared: Path,
                       peer_archs: list[dict] | None, overrides: dict | None = None) -> RunConfig:
    """[base] <- the run's tables <- what the experiment sets (out_dir, data, method, peers, teacher) <- overrides."""
    where = f"{cfg.source}: runs ({spec.name})"
    d = merge(cfg.base, {s: getattr(spec, s) for s in SECTIONS if getattr(spec, s)})
    d = merge(d, {"out_dir": str(exp_dir / spec.name), "data": {"prepared": str(prepared)},
                  "train": {"method": spec.method}})
    model = d.get("model", {})
    explicit = bool(model.get("peers") or model.get("peers_file"))
    if spec.peers or (spec.method in PEER_METHODS and not explicit):
        require(not explicit, f"{where}: give either peers = k or model.peers / model.peers_file, not both")
        require(peer_archs is not None, f"{where}: uses searched peers, but the experiment has no [search] section")
        k = spec.peers or len(peer_archs)
        require(k <= len(peer_archs), f"{where}: peers = {k}, but [search] finds only {len(peer_archs)} peers")
        require(k >= 2 or spec.method not in PEER_METHODS,
                f"{where}: method {spec.method} needs at least 2 peers, got {k} (raise search.peers)")
        family = d.get("model", {}).get("family", "roberta")
        require(all(a.get("family", family) == family for a in peer_archs[:k]),  # (a table without one inherits)
                f"{where}: model.family is {family}, but the [search] peers are not; set [search] family")
        d = merge(d, {"model": {"peers": [dict(a) for a in peer_archs[:k]]}})
    if spec.teacher:
        teacher = str(exp_dir / spec.teacher[4:]) if spec.teacher.startswith("run:") else spec.teacher
        d = merge(d, {"distill": {"teacher": teacher}})
    if overrides:
        d = merge(d, overrides)
    try:
        return from_dict(RunConfig, d, where).validate()
    except DwmlError as e:
        msg = str(e)
        raise DwmlError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def fingerprint(run_cfg: RunConfig) -> str:
    """The configuration without what depends on where the experiment lives or how it prints: equal fingerprints
    train the same models."""
    c = dataclasses.replace(run_cfg, out_dir="", data=dataclasses.replace(run_cfg.data, prepared=""),
                            train=dataclasses.replace(run_cfg.train, progress=True),
                            distill=dataclasses.replace(run_cfg.distill, teacher=Path(run_cfg.distill.teacher).name
                                                        if run_cfg.distill.teacher else ""))
    return to_toml(c)


def plan_runs(cfg: ExperimentConfig, exp_dir: str | Path, prepared: str | Path,
              peer_archs: list[dict] | None) -> list[PlannedRun]:
    """Every run (explicit runs, then sweep variants), teachers before their students."""
    exp_dir, prepared = Path(exp_dir), Path(prepared)
    specs = {s.name: s for s in cfg.runs}
    plans: list[PlannedRun] = []
    for spec in cfg.runs:
        rc = resolve_run_config(cfg, spec, exp_dir, prepared, peer_archs)
        plans.append(PlannedRun(spec.name, spec.method, rc,
                                teacher_run=spec.teacher[4:] if spec.teacher.startswith("run:") else None))
    if cfg.sweep is not None:
        by_print = {fingerprint(p.config): p.name for p in plans}
        base = specs[cfg.sweep.base]
        for axis, values in cfg.sweep.axes.items():
            for value in values:
                name = f"{base.name}-{axis}{format_value(value)}"
                require(name not in specs, f"{cfg.source}: sweep variant {name!r} collides with a run of that name")
                spec, overrides = base, None
                if axis == "peers":
                    method = SINGLE_PEER_METHOD.get(base.method, base.method) if value == 1 else base.method
                    spec = dataclasses.replace(base, name=name, method=method, peers=value)
                else:
                    spec = dataclasses.replace(base, name=name)
                    overrides = {"distill": {axis: value}}
                rc = resolve_run_config(cfg, spec, exp_dir, prepared, peer_archs, overrides)
                fp = fingerprint(rc)
                sweep = {"base": base.name, "axis": axis, "value": value}
                plans.append(PlannedRun(name, spec.method, rc, sweep=sweep, alias_of=by_print.get(fp),
                                        teacher_run=spec.teacher[4:] if spec.teacher.startswith("run:") else None))
                by_print.setdefault(fp, name)
    return order_by_teacher(plans)


def order_by_teacher(plans: list[PlannedRun]) -> list[PlannedRun]:
    """Stable order in which every teacher run comes before the runs it teaches."""
    by_name = {p.name: p for p in plans}
    out: list[PlannedRun] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(p: PlannedRun) -> None:
        if state.get(p.name) == 2:
            return
        require(state.get(p.name) != 1, f"runs: teacher cycle through {p.name!r}")
        state[p.name] = 1
        if p.teacher_run:
            visit(by_name[p.teacher_run])
        if p.alias_of:
            visit(by_name[p.alias_of])
        state[p.name] = 2
        out.append(p)

    for p in plans:
        visit(p)
    return out


def axis_values(plan: PlannedRun, n_students: int) -> dict[str, Any]:
    """Where a run sits on the sweep axes (the number of peers and every distill field)."""
    d = plan.config.distill
    values = {"peers": n_students}
    values.update({f.name: getattr(d, f.name) for f in dataclasses.fields(DistillConfig)
                   if isinstance(getattr(d, f.name), (int, float, bool, str))})
    return values


# --------------------------------------------------------------------------------------------------------------
# Stages


def prepared_dir(cfg: ExperimentConfig, exp_dir: Path) -> Path:
    return Path(cfg.data.prepared) if cfg.data.prepared else exp_dir / "data"


def ensure_data(cfg: ExperimentConfig, exp_dir: Path, log: Callable[[str], None]) -> Path:
    prepared = prepared_dir(cfg, exp_dir)
    if (prepared / "meta.json").is_file():
        log(f"data: {prepared} (prepared)")
        return prepared
    require(not cfg.data.prepared, f"{cfg.source}: data.prepared: {prepared} has no meta.json (run `dwml prepare`)")
    from ..data.prepare import default_corpus_path, prepare

    p = cfg.prepare
    inputs = p.inputs or [default_corpus_path()]
    log(f"data: prepare {', '.join(map(str, inputs))} -> {prepared}")
    prepare(inputs, prepared, vocab_size=p.vocab_size, valid_fraction=p.valid_fraction, seed=p.seed,
            lowercase=p.lowercase, min_frequency=p.min_frequency, max_docs=p.max_docs or None)
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fresh(path: Path, plan: PlannedRun) -> Any:
    """The JSON at `path` if it was written after the run finished (else None: the run was trained again since)."""
    summary = Path(plan.config.out_dir) / "final" / "summary.json"
    if not path.is_file() or not summary.is_file() or path.stat().st_mtime < summary.stat().st_mtime:
        return None
    return _read_json(path)


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
    from ..models.flops import timed
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
    old = _fresh(path, plan)
    if old is not None:
        return old
    from ..models.flops import measure_step_flops

    measured = measure_step_flops(plan.config)
    write_json(path, measured)
    return measured


def eval_settings(cfg: ExperimentConfig) -> dict:
    e = cfg.eval
    return {"tasks": list(e.tasks), "limit": e.limit or None, "method": e.method, "precision": e.precision,
            "ewok_pairing": e.ewok_pairing}


def eval_stage(cfg: ExperimentConfig, plan: PlannedRun, exp_dir: Path, log: Callable[[str], None]) -> dict | None:
    if not cfg.eval.enabled:
        return None
    path = exp_dir / f"eval_{plan.name}.json"
    old = _fresh(path, plan)
    want = eval_settings(cfg)
    if old is not None and {k: old.get(k) for k in want} == want:
        return old
    from ..evaluation.evaluate import evaluate_path

    e = cfg.eval
    log(f"run {plan.name}: zero-shot eval on {', '.join(e.tasks)}" + (f" (limit {e.limit})" if e.limit else ""))
    return evaluate_path(plan.config.out_dir, e.tasks, method=e.method, token_budget=e.token_budget or None,
                         device=e.device, limit=e.limit or None, ensemble=e.ensemble, out_file=path,
                         precision=e.precision, ewok_pairing=e.ewok_pairing)


def finetune_stage(cfg: ExperimentConfig, plan: PlannedRun, exp_dir: Path, summary: dict, evaluation: dict | None,
                   log: Callable[[str], None]) -> dict | None:
    f = cfg.finetune
    if not f.enabled:
        return None
    from ..evaluation.finetune import finetune_model
    from .report import best_model, model_rows

    ft_cfg = FinetuneConfig(**{x.name: getattr(f, x.name) for x in dataclasses.fields(FinetuneConfig)})
    rows = model_rows(summary, evaluation, None)
    names = [r["name"] for r in rows if r["name"] != "ensemble"]
    if f.models == "best":
        names = [best_model(rows)]
    settings = {k: v for k, v in dataclasses.asdict(ft_cfg).items() if k not in ("progress", "device")}
    path = exp_dir / f"finetune_{plan.name}.json"
    old = _fresh(path, plan)
    if old is not None and old.get("settings") == settings and sorted(old.get("models", {})) == sorted(names):
        return old
    log(f"run {plan.name}: fine-tune {', '.join(names)} on {', '.join(ft_cfg.tasks)}")
    final = Path(plan.config.out_dir) / "final"
    result = {"settings": settings, "models": {n: finetune_model(final / n, ft_cfg) for n in names}}
    write_json(path, result)
    return result


# --------------------------------------------------------------------------------------------------------------
# Results


def omega_trajectory(run_dir: Path) -> dict:
    """{"outer_step": [0, 1, ...], "omega": [[...], ...], "mixed_ratio": [None, r1, ...]} from metrics.jsonl
    (outer step 0 = the initial omega; mixed_ratio = the centred |mixed| / |direct| of each outer step, None where
    it was not logged or undefined)."""
    steps, omegas, ratios = [], [], []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {"outer_step": [], "omega": []}
    for r in read_records(path):
        if r.get("step") == 0 and not steps and "omega" in r:
            steps.append(0)
            omegas.append(r["omega"])
            ratios.append(None)
        if "outer_step" in r:
            steps.append(int(r["outer_step"]))
            omegas.append(r["omega"])
            ratios.append(r.get("mixed_ratio"))
    if len(steps) == 1:  # no outer step was ever taken: no trajectory
        return {"outer_step": [], "omega": [], "mixed_ratio": []}
    return {"outer_step": steps, "omega": omegas, "mixed_ratio": ratios}


def median_or_none(values: list) -> float | None:
    """Median of the numbers among `values` (None entries skipped); None if there are none."""
    import statistics

    xs = [float(v) for v in values if v is not None]
    return statistics.median(xs) if xs else None


def data_stats(prepared: Path, seq_lens: Iterable[int]) -> dict[int, dict]:
    """{seq_len: statistics of the prepared data packed at seq_len} for every length in `seq_lens`; meta.json and the
    train split's unigram entropy (computed from the shard for data prepared before meta.json held it) are read
    and computed once for all lengths."""
    from ..training.plateau import train_unigram_entropy
    from ..data.shards import PackedSequences, load_meta

    meta = load_meta(prepared)
    splits = meta.get("splits", {})
    entropy = train_unigram_entropy(prepared, meta)
    out = {}
    for seq_len in dict.fromkeys(seq_lens):
        lengths = PackedSequences(prepared, "train", seq_len).lengths()
        out[seq_len] = {
            "prepared": str(prepared),
            "vocab_size": int(meta["vocab_size"]),
            "train_tokens": splits.get("train", {}).get("tokens"),
            "train_words": splits.get("train", {}).get("words"),
            "valid_tokens": splits.get("valid", {}).get("tokens"),
            "train_sequences": int(len(lengths)),
            "mean_sequence_length": float(lengths.mean()),
            "unigram_entropy": entropy,
            # Share of the B x T positions that can be masked (real, non-special tokens): the masked fraction of
            # the positions is mask_prob times this.
            "maskable_fraction": splits.get("train", {}).get("tokens", 0) / (len(lengths) * seq_len),
        }
    return out


def run_budget(rc: RunConfig, mean_len: float) -> dict:
    """What every student of the run processes. tokens_per_student counts the positions computed on, B x T per
    sequence (a batch is padded to its longest sequence, which is T in practice: packing fills most sequences);
    real_tokens_per_student the non-pad tokens among them (mean packed length `mean_len`)."""
    t = rc.train
    sequences = t.max_steps * t.batch_size * t.grad_accum
    return {"steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seq_len": rc.data.seq_len,
            "sequences_per_student": sequences, "tokens_per_student": sequences * rc.data.seq_len,
            "real_tokens_per_student": sequences * mean_len}


def analytic_flops(plan: PlannedRun, vocab_size: int, tokens: float, teacher_arch=None,
                   maskable: float = 1.0) -> dict:
    """`run_flops` of the run; the LM heads run at mask_prob x `maskable` (real, non-special share) of the
    positions (1.0 when the data are unknown: an upper bound)."""
    from ..models.flops import run_flops
    from ..training.train import resolve_archs

    rc = plan.config
    archs = [a for _, a in resolve_archs(rc, vocab_size)]
    n_aux = 0
    if plan.method == "sd":
        n_aux = len(rc.distill.sd_layers) or archs[0].layers - 1
    mask_frac = rc.data.mask_prob * maskable
    out = run_flops(archs, tokens, rc.data.seq_len, mask_frac, teacher=teacher_arch, sd_heads=n_aux)
    return {**out, "mask_frac": mask_frac}


def teacher_arch_of(rc: RunConfig, vocab_size: int, plans_by_name: dict[str, PlannedRun]):
    """The teacher's Arch: from its planned run, or from a model directory's config.json."""
    if rc.train.method not in ("kd", "kd_dwml"):
        return None
    from ..training.train import resolve_archs

    name = Path(rc.distill.teacher).name
    if name in plans_by_name and Path(plans_by_name[name].config.out_dir) == Path(rc.distill.teacher):
        return resolve_archs(plans_by_name[name].config, vocab_size)[0][1]
    from ..models.search import resolve_reference

    p = Path(rc.distill.teacher)
    return resolve_reference(str(p / "final" / "peer0" if (p / "final" / "peer0").is_dir() else p))


def run_record(plan: PlannedRun, summary: dict | None, evaluation: dict | None, finetune: dict | None,
               timing: dict | None, measured: dict | None, budget: dict, analytic: dict) -> dict:
    from .report import best_model, model_rows

    rc = plan.config
    rec: dict[str, Any] = {
        "name": plan.name,
        "method": plan.method,
        "alias_of": plan.alias_of,
        "sweep": plan.sweep,
        "teacher": rc.distill.teacher or None,
        "budget": budget,
        "status": "done" if summary else "not trained",
    }
    if plan.alias_of or not summary:
        return rec
    rows = model_rows(summary, evaluation, finetune)
    n_students = len(summary["peers"])
    rec.update({
        "axes": axis_values(plan, n_students),
        "n_students": n_students,
        "omega": summary["omega"],
        "omega_learned": bool(summary.get("omega_learned")),
        "omega_trajectory": omega_trajectory(Path(rc.out_dir)),
        "unroll": rc.distill.unroll,
        "valid_ensemble_loss": summary.get("valid_ensemble_loss"),
        "models": rows,
        "best": best_model(rows),
        "timing": timing,
    })
    rec["mixed_ratio_median"] = median_or_none(rec["omega_trajectory"].get("mixed_ratio", []))
    outer_steps = rc.train.max_steps // rc.distill.outer_every if rec["omega_learned"] else 0
    fl = {"analytic_per_student": analytic["per_student"], "analytic_teacher_forward": analytic["teacher_forward"],
          "analytic_total": analytic["total"], "mask_frac": analytic["mask_frac"], "outer_steps": outer_steps}
    if measured:
        per_step = measured["measured_micro_step"] * measured["micro_steps_per_step"]
        outer = measured.get("measured_outer_step") or 0
        fl.update({k: measured[k] for k in ("measured_micro_step", "analytic_micro_step", "ratio",
                                            "measured_outer_step", "micro_batch", "n_masked")})
        # The counted step is one micro-batch of the first batch; a step has grad_accum of them.
        fl["measured_total"] = per_step * rc.train.max_steps + outer * outer_steps
    rec["flops"] = fl
    return rec


def collect(cfg: ExperimentConfig, plans: list[PlannedRun], exp_dir: Path, prepared: Path,
            peer_archs: list[dict] | None, extra: dict | None = None) -> dict:
    """results.json from whatever the stages left in the experiment directory."""
    seq_len = plans[0].config.data.seq_len
    stats_by_len = data_stats(prepared, [seq_len] + [p.config.data.seq_len for p in plans])
    stats = stats_by_len[seq_len]
    vocab = stats["vocab_size"]
    by_name = {p.name: p for p in plans}
    runs, evaluations = [], {}
    for plan in plans:
        run_dir = Path(plan.config.out_dir)
        summary = _read_json(run_dir / "final" / "summary.json") if not plan.alias_of else None
        own = stats_by_len[plan.config.data.seq_len]
        budget = run_budget(plan.config, own["mean_sequence_length"])
        analytic = analytic_flops(plan, vocab, budget["tokens_per_student"],
                                  teacher_arch_of(plan.config, vocab, by_name), own["maskable_fraction"])
        measured = flops_stage(plan, exp_dir) if summary else None
        evaluations[plan.name] = _fresh(exp_dir / f"eval_{plan.name}.json", plan)
        runs.append(run_record(plan, summary, evaluations[plan.name],
                               _fresh(exp_dir / f"finetune_{plan.name}.json", plan),
                               _fresh(exp_dir / f"timing_{plan.name}.json", plan), measured, budget, analytic))
    from .report import omega_correlation

    results = {
        "name": cfg.name,
        "description": cfg.description,
        "config_file": cfg.source,
        "out_dir": str(exp_dir),
        "data": stats,
        "search": _read_json(exp_dir / "peers.json") if peer_archs is not None else None,
        "eval": eval_settings(cfg) if cfg.eval.enabled else None,
        "finetune": ({"tasks": list(cfg.finetune.tasks), "epochs": cfg.finetune.epochs,
                      "max_train_examples": cfg.finetune.max_train_examples,
                      "max_eval_examples": cfg.finetune.max_eval_examples, "models": cfg.finetune.models}
                     if cfg.finetune.enabled else None),
        "runs": runs,
        "config": cfg.raw,
        **(extra or {}),
    }
    results["correlation"] = omega_correlation(results)
    from ..evaluation.stats import significance_vs_mlm

    results["significance"] = significance_vs_mlm(runs, evaluations)
    return results


def host_info() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def run_experiment(cfg: ExperimentConfig, *, only: list[str] | None = None, report_only: bool = False,
                   log: Callable[[str], None] | None = None) -> dict:
    """Run every stage that has no output yet, then write results.json, report.md and figures/. Returns results."""
    from .report import write_report

    log = log or (lambda s: print(f"[experiment] {s}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    host = host_info()
    exp_dir = claim_dir(cfg.out_dir, "experiment", legacy=("results.json", "peers.json", "data/meta.json"))
    if report_only:
        prepared = prepared_dir(cfg, exp_dir)
        require((prepared / "meta.json").is_file(), f"{prepared}: no prepared data; run the experiment first")
    else:
        prepared = ensure_data(cfg, exp_dir, log)
    from ..data.shards import load_meta

    vocab = int(load_meta(prepared)["vocab_size"])
    if report_only:  # nothing is searched or trained: the peers are those of peers.json, if any
        found = _read_json(exp_dir / "peers.json")
        peer_archs = [p["arch"] for p in found["peers"]] if found else None
    else:
        peer_archs = ensure_peers(cfg, exp_dir, vocab, log)
    plans = plan_runs(cfg, exp_dir, prepared, peer_archs)
    if only:
        unknown = sorted(set(only) - {p.name for p in plans})
        require(not unknown, f"--only: unknown run(s) {unknown}; runs are {[p.name for p in plans]}")
    if not report_only:
        by_name = {p.name: p for p in plans}
        for plan in plans:
            if plan.alias_of:
                log(f"run {plan.name}: same configuration as {plan.alias_of} (not trained again)")
                continue
            if only and plan.name not in only:
                continue
            if plan.teacher_run:
                teacher = Path(by_name[plan.teacher_run].config.out_dir) / "final" / "summary.json"
                require(teacher.is_file(), f"run {plan.name}: its teacher run {plan.teacher_run!r} is not trained")
            summary = train_stage(plan, exp_dir, log)
            evaluation = eval_stage(cfg, plan, exp_dir, log)
            finetune_stage(cfg, plan, exp_dir, summary, evaluation, log)
    log("collecting results, measuring FLOPs of one step per run")
    results = collect(cfg, plans, exp_dir, prepared, peer_archs, extra={"host": host})
    results["wall_time_s"] = time.perf_counter() - start
    try:
        results["host"]["load_avg_end"] = list(os.getloadavg())
    except OSError:
        pass
    write_json(exp_dir / "results.json", results)
    write_report(results, exp_dir)
    log(f"wrote {exp_dir / 'report.md'} ({results['wall_time_s']:.0f} s)")
    return results


# --------------------------------------------------------------------------------------------------------------
# Dry run: the plan and its compute, without data or training


def estimate(cfg: ExperimentConfig, mfu: float = 0.4) -> dict:
    """Analytic FLOPs and GPU hours of every planned run, from the configuration alone.

    Vocabulary: the prepared data's if it exists, else [prepare].vocab_size; tokens per sequence: seq_len (full
    packing); peers: OUT/peers.json if present, else searched now (not written).
    """
    from ..models.flops import H100_BF16_PEAK, gpu_hours
    from ..data.shards import load_meta

    exp_dir = Path(cfg.out_dir)
    prepared = prepared_dir(cfg, exp_dir)
    vocab = int(load_meta(prepared)["vocab_size"]) if (prepared / "meta.json").is_file() else cfg.prepare.vocab_size
    peer_archs = ensure_peers(cfg, exp_dir, vocab, lambda s: print(f"[experiment] {s}", file=sys.stderr),
                              write=False)
    plans = plan_runs(cfg, exp_dir, prepared, peer_archs)
    by_name = {p.name: p for p in plans}
    rows = []
    from ..models.model import count_params
    from ..training.train import resolve_archs

    for plan in plans:
        budget = run_budget(plan.config, plan.config.data.seq_len)
        if plan.alias_of:
            rows.append({"name": plan.name, "method": plan.method, "alias_of": plan.alias_of, **budget})
            continue
        archs = resolve_archs(plan.config, vocab)
        fl = analytic_flops(plan, vocab, budget["tokens_per_student"], teacher_arch_of(plan.config, vocab, by_name))
        rows.append({"name": plan.name, "method": plan.method, "alias_of": None, **budget,
                     "params": [count_params(a) for _, a in archs], "archs": [a.name for _, a in archs],
                     "flops": fl["total"], "gpu_hours": gpu_hours(fl["total"], mfu)})
    total = sum(r.get("flops", 0.0) for r in rows)
    return {"vocab_size": vocab, "mfu": mfu, "peak_flops": H100_BF16_PEAK, "runs": rows, "total_flops": total,
            "total_gpu_hours": gpu_hours(total, mfu)}


def format_estimate(est: dict) -> str:
    lines = [f"vocab {est['vocab_size']}; GPU hours at {100 * est['mfu']:.0f}% MFU of "
             f"{est['peak_flops'] / 1e12:.1f} TFLOP/s (H100 SXM dense bf16); FLOPs are the analytic training "
             "FLOPs of every student (+ teacher forwards; LM heads at mask_prob of all positions, an upper "
             "bound), DWML outer steps not included"]
    head = f"{'run':<24}{'method':<9}{'steps':>8}{'tokens/student':>16}  {'students (params)':<40}{'FLOPs':>10}{'GPU h':>8}"
    lines += [head, "-" * len(head)]
    for r in est["runs"]:
        if r["alias_of"]:
            lines.append(f"{r['name']:<24}{r['method']:<9}{'':>8}{'':>16}  = {r['alias_of']}")
            continue
        params = ", ".join(f"{p / 1e6:.1f}M" for p in r["params"])
        lines.append(f"{r['name']:<24}{r['method']:<9}{r['steps']:>8}{r['tokens_per_student']:>16,.0f}  "
                     f"{params:<40}{r['flops']:>10.2e}{r['gpu_hours']:>8.2f}")
    lines.append(f"total {est['total_flops']:.3e} FLOPs = {est['total_gpu_hours']:.2f} GPU hours")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="run a full comparison of methods (train, evaluate, report.md + figures) from one config",
        description="Prepare data, search peers, train every run of CONFIG (same data and budget), evaluate and "
                    "fine-tune them, and write results.json, report.md and figures/ into the experiment directory. "
                    "Finished stages are skipped, so the same command resumes an interrupted experiment.",
    )
    p.add_argument("config", help="experiment TOML (see configs/experiment-tiny.toml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the experiment file, e.g. --set base.train.max_steps=50 (repeatable)")
    p.add_argument("--only", default="", help="comma-separated runs to train/evaluate now (the report has all)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs with their analytic FLOPs and GPU-hour estimate; train nothing")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for --dry-run (default: 0.4)")
    p.add_argument("--report-only", action="store_true", help="rebuild results.json and report.md from what exists")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_experiment(args.config, args.sets)
    if args.dry_run:
        require(0 < args.mfu <= 1, f"--mfu: expected a fraction in (0, 1], got {args.mfu}")
        print(format_estimate(estimate(cfg, args.mfu)))
        return 0
    only = [x.strip() for x in args.only.split(",") if x.strip()] or None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar for every model evaluated
    results = run_experiment(cfg, only=only, report_only=args.report_only)
    from .report import main_table

    print(main_table(results))
    print(f"\nwrote {Path(cfg.out_dir) / 'report.md'} in {results['wall_time_s']:.0f} s")
    return 0
