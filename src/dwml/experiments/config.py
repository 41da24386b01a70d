"""The experiment file of `dwml experiment`: its tables as dataclasses and the strict TOML parser.

`load_experiment` reads the TOML (with `--set` overrides), `parse_experiment` checks every key (an unknown one is an
error naming the file and the key) and returns an `ExperimentConfig`: [prepare] or [data], [base] (a RunConfig
applied to every run), [search], [[runs]], [sweep] (one axis at a time around a base run), [eval] and [finetune].
The format is documented in the docstring of `dwml.experiments.experiment` and in docs/usage.md.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import METHODS, DistillConfig, RunConfig, from_dict, merge, parse_set, read_toml
from ..errors import DwmlError, require
from ..evaluation.glue import FinetuneConfig

SECTIONS = ("data", "model", "train", "distill")  # RunConfig tables a run may override


PEER_METHODS = ("dml", "dwml", "kd_dwml")


LEARNED_OMEGA_METHODS = ("dwml", "kd_dwml")


# peers = 1 on a peer method: the same network trained without peers.
SINGLE_PEER_METHOD = {"dml": "mlm", "dwml": "mlm", "kd_dwml": "kd"}


DEFAULT_EVAL_TASKS = ["blimp_filtered", "blimp_supplement", "ewok"]


RESERVED_NAMES = {"data", "figures"}


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class PrepareSection:
    inputs: list = field(default_factory=list)  # corpus files/directories; empty = ../shared/data/corpus
    vocab_size: int = 8192
    valid_fraction: float = 0.02
    max_docs: int = 0  # 0 = every document
    seed: int = 0
    lowercase: bool = False
    min_frequency: int = 2
    speaker_tags: bool = False  # keep dialogue speaker tags as "A: text" (dwml prepare --speaker-tags)


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
    ensemble: bool = True  # also score the omega-weighted ensemble of multi-peer runs (only with peers = "all")
    peers: str = "all"  # all | best_loss: of a multi-peer run, score only the peer with the lowest validation loss
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
    peer: int = 0  # k > 0: the k-th searched peer alone (a single-network baseline on that shape); not with peers
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
    """Parse and validate an experiment TOML (+ `--set section.key=value` overrides; `--set runs.NAME.key=value`
    sets a key of the [[runs]] table named NAME, e.g. runs.teacher.train.max_steps=40)."""
    data = read_toml(path)
    for s in sets or []:
        data = _merge_set(data, parse_set(s), s, str(path))
    return parse_experiment(data, str(path))


def _merge_set(data: dict, override: dict, expr: str, where: str) -> dict:
    runs = override.get("runs")
    if not isinstance(runs, dict):
        return merge(data, override)
    require(isinstance(data.get("runs"), list), f"--set {expr}: {where} has no [[runs]] tables")
    names = [r.get("name") if isinstance(r, dict) else None for r in data["runs"]]  # aligned with data["runs"]
    data = dict(data, runs=list(data["runs"]))
    for name, table in runs.items():
        require(name in names and isinstance(table, dict),
                f"--set {expr}: expected runs.NAME.key=value with NAME one of {names}")
        i = names.index(name)
        data["runs"][i] = merge(data["runs"][i], table)
    return data


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
        require(spec.peer >= 0, f"{at} ({spec.name}): peer: expected an integer >= 1 (the k-th searched peer)")
        require(not (spec.peer and spec.peers), f"{at} ({spec.name}): give either peers = k or peer = k, not both")
        require(not spec.peer or spec.method not in PEER_METHODS,
                f"{at} ({spec.name}): peer = {spec.peer} trains one network; method {spec.method} needs peers")
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
    from ..evaluation.scoring import METHODS as SCORING
    from ..evaluation.scoring import PRECISIONS

    try:
        cfg.eval.tasks = parse_tasks(cfg.eval.tasks)
    except DwmlError as e:
        raise DwmlError(f"{where}: eval.tasks: {e}") from None
    require(cfg.eval.method in SCORING, f"{where}: eval.method: expected one of {list(SCORING)}")
    require(cfg.eval.precision in PRECISIONS, f"{where}: eval.precision: expected one of {list(PRECISIONS)}")
    require(cfg.eval.ewok_pairing in EWOK_PAIRINGS,
            f"{where}: eval.ewok_pairing: expected one of {list(EWOK_PAIRINGS)}")
    require(cfg.eval.peers in ("all", "best_loss"),
            f"{where}: eval.peers: expected all|best_loss, got {cfg.eval.peers!r}")
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
