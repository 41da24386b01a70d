"""Planning an experiment: run specs (and sweep variants) -> resolved, fingerprinted `RunConfig`s.

`plan_runs` applies [base], each run's overrides and its peers to one RunConfig per run, expands the sweep, turns a
variant whose resolved configuration equals an existing run's into an alias of it (`fingerprint`), and orders the
runs so that a teacher is trained before its students (`order_by_teacher`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DistillConfig, RunConfig, from_dict, merge, to_toml
from ..errors import DwmlError, require
from .config import PEER_METHODS, SECTIONS, SINGLE_PEER_METHOD, ExperimentConfig, RunSpec, format_value


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
    if spec.peers or spec.peer or (spec.method in PEER_METHODS and not explicit):
        key = "peer" if spec.peer else "peers"
        require(not explicit, f"{where}: give either {key} = k or model.peers / model.peers_file, not both")
        require(peer_archs is not None, f"{where}: uses searched peers, but the experiment has no [search] section")
        k = spec.peer or spec.peers or len(peer_archs)
        require(k <= len(peer_archs), f"{where}: {key} = {k}, but [search] finds only {len(peer_archs)} peers")
        require(k >= 2 or spec.method not in PEER_METHODS,
                f"{where}: method {spec.method} needs at least 2 peers, got {k} (raise search.peers)")
        chosen = peer_archs[k - 1:k] if spec.peer else peer_archs[:k]
        family = d.get("model", {}).get("family", "roberta")
        require(all(a.get("family", family) == family for a in chosen),  # (a table without one inherits)
                f"{where}: model.family is {family}, but the [search] peers are not; set [search] family")
        d = merge(d, {"model": {"peers": [dict(a) for a in chosen]}})
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


