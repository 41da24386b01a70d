"""Student architecture search by Bayesian optimisation (paper section 3.1).

Given a reference ("teacher") architecture with N parameters and p peers, peer i = 1..p gets the architecture whose
exact parameter count is closest to N_i = N / (i + 1), i.e. N/2, N/3, ..., N/(p+1).

Search space (discrete; every point is a valid model of the searched family, `family`: RoBERTa by default, or
ModernBERT with `--family modernbert`):
    layers     in [layers[0], layers[1]]
    heads      in [heads[0], heads[1]]
    head_dim   in head_dim[0], head_dim[0] + head_dim_step, ..., <= head_dim[1]
    hidden       = heads * head_dim                      (so hidden % heads == 0 holds by construction)
    intermediate = round(intermediate_ratio * hidden)    (default 4x as in BERT/RoBERTa; a fixed 3072 would make
                                                          the FFN dominate small models and hidden barely matter.
                                                          ModernBERT's default is 8/3: its GeGLU FFN has 3 H I
                                                          weights, so 8H/3 costs what RoBERTa's 4H FFN costs)
We parametrise hidden through the per-head width rather than searching hidden and rejecting `hidden % heads != 0`:
the modulo constraint is a jagged, mostly-infeasible landscape that a GP (or bayes_opt's GP constraint model)
cannot learn, while heads * head_dim is smooth in both inputs and no evaluation is wasted on an invalid shape. The
defaults (layers 1..24, heads 1..16, head_dim 16..128 step 16: 3,072 points) contain every RoBERTa-family shape
(all presets have head_dim 64; RoBERTa-large is 24 x 16 x 64).

Objective, maximised by bayes_opt over the integer parameters (layers, heads, head_dim_index) - `(lo, hi, int)`
bounds in its v3 API:
    J(a) = -|log(params(a) / N_i)| + diversity_weight * min(cap, min_j |log(r(a) / r(a_j))|)
params(a) = `model.count_params(a)`, the exact closed form of the family's `num_parameters()` (no model is
built, so an evaluation costs microseconds); r = hidden / layers is the width/depth ratio and a_j are the
architectures of peers 1..i-1. The log error is scale-free (a 1% miss costs the same for a 60M and a 1M target)
and keeps the GP's targets O(1) even where a candidate is 50x too big.
Distinctness: a shape (layers, hidden, intermediate) taken by an earlier peer is infeasible - it scores
DUPLICATE_PENALTY lower and is never selected. Heads are not part of the shape: they change no weight tensor and no
parameter count, so a heads-only variant of an earlier peer would be the same model.

Verification: `exhaustive_best` maximises the same J over the whole space with numpy (under a millisecond), and
every peer reports BO's raw result next to that optimum; no refinement step hides BO's gap.

The reference (N) keeps its own family: a preset is taken in the searched family (the ModernBERT presets have
the RoBERTa presets' parameter counts within 0.3%), a file or model directory says its family (HF `model_type`).
So `--reference base --family modernbert` finds ModernBERT peers for RoBERTa-base's budgets.

Output JSON (`load_peer_archs` reads it back, i.e. `dwml train --peers-file` / `model.peers_file`):
    {"reference": {"name", layers, heads, hidden, intermediate, vocab_size, max_positions, family, "params"},
     "config": {the SearchConfig fields, as given}, "family": the peers' family, "intermediate_ratio": as used,
     "peers": [{"peer": i, "target": N_i, "params": int, "rel_error": float,
                "arch": {layers, heads, hidden, intermediate, vocab_size, max_positions, family},
                "bo_evaluations": int, "exhaustive_params": int, "exhaustive_arch": {...},
                "exhaustive_rel_error": float, "gap_to_exhaustive": float}, ...],
     "space_size": int, "exhaustive_time_s": float, "wall_time_s": float}
rel_error = |params - target| / target and gap_to_exhaustive = rel_error - exhaustive_rel_error. With
diversity_weight = 0 the gap is >= 0 (up to < 1e-6 where the log objective and the linear error rank two
near-tied candidates differently); with diversity_weight > 0 the exhaustive optimum trades size for diversity, so
the gap may be negative.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import MODEL_FAMILIES, check_family, from_dict, read_toml
from ..errors import DwmlError
from ..io import check_output_file, result_document, write_json
from .model import PRESETS, Arch, count_params, get_preset
from .space import DUPLICATE_PENALTY, Space, build_space, exhaustive_best, objective, peer_targets, rel_error, shape_of

# UCB = mean + kappa * std. bayes_opt's default kappa 2.576 explores too much for 110 evaluations of a 3,072-point
# space: over 6 seeds of the base reference (4 peers) it missed the exhaustive optimum by > 1% on 4 of 24 peers
# (up to 3.5%); kappa 1.0 on 1, kappa 0.5 on none (worst gap 0.53% over base, mini and tiny, 6 seeds each), while
# kappa 0.25 starts to get stuck (3.4% on a tiny peer).
UCB_KAPPA = 0.5
# Restarts of the GP's marginal-likelihood optimiser at each iteration (bayes_opt's default, kept). An anisotropic
# Matern kernel was slightly more accurate in the same test but 3x slower, so we keep the library's isotropic one.
GP_RESTARTS = 5


@dataclass
class SearchConfig:
    """`[search]` section. Bounds are inclusive [lo, hi] pairs of integers."""

    reference: str = "base"  # preset name, JSON/TOML arch file, or Hugging Face model dir (config.json)
    peers: int = 4  # p: peer i gets the target N / (i + 1)
    init_points: int = 10  # random initial evaluations per peer (paper: 10)
    n_iter: int = 100  # Bayesian-optimisation iterations per peer (paper: 100)
    seed: int = 0
    family: str = ""  # model family of the peers: roberta | modernbert; "" = the reference's family
    intermediate_ratio: float = 0.0  # intermediate = round(ratio * hidden); 0 = the family's (4, ModernBERT 8/3)
    layers: list = field(default_factory=lambda: [1, 24])
    heads: list = field(default_factory=lambda: [1, 16])
    head_dim: list = field(default_factory=lambda: [16, 128])  # per-head width; hidden = heads * head_dim
    head_dim_step: int = 16
    diversity_weight: float = 0.0  # > 0 rewards width/depth ratios unlike the earlier peers'
    vocab_size: int = 0  # 0 = the reference's; applies to the reference (N) and to every peer
    max_positions: int = 0  # 0 = the reference's

    def validate(self) -> "SearchConfig":
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise DwmlError(f"search.{msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check(is_int(self.peers) and self.peers >= 1, f"peers: expected an integer >= 1, got {self.peers!r}")
        check(is_int(self.init_points) and self.init_points >= 1,
              f"init_points: expected an integer >= 1, got {self.init_points!r}")
        check(is_int(self.n_iter) and self.n_iter >= 0, f"n_iter: expected an integer >= 0, got {self.n_iter!r}")
        check(is_int(self.seed) and self.seed >= 0, f"seed: expected an integer >= 0, got {self.seed!r}")
        check(isinstance(self.intermediate_ratio, (int, float)) and not isinstance(self.intermediate_ratio, bool)
              and self.intermediate_ratio >= 0,
              f"intermediate_ratio: expected a number > 0 (or 0 = the family's), got {self.intermediate_ratio!r}")
        if self.family != "":  # "" = the reference's
            check_family(self.family, "search.family")
        for name in ("layers", "heads", "head_dim"):
            b = getattr(self, name)
            check(isinstance(b, (list, tuple)) and len(b) == 2 and all(is_int(v) for v in b),
                  f"{name}: expected [lo, hi] integers, got {b!r}")
            check(1 <= b[0] <= b[1], f"{name}: empty or non-positive bounds {list(b)}; expected 1 <= lo <= hi")
        check(is_int(self.head_dim_step) and self.head_dim_step >= 1,
              f"head_dim_step: expected an integer >= 1, got {self.head_dim_step!r}")
        check(isinstance(self.diversity_weight, (int, float)) and self.diversity_weight >= 0,
              f"diversity_weight: expected a number >= 0, got {self.diversity_weight!r}")
        for name in ("vocab_size", "max_positions"):
            v = getattr(self, name)
            check(is_int(v) and v >= 0, f"{name}: expected an integer >= 1 (or 0 = the reference's), got {v!r}")
        return self


def load_search_config(path: str | Path) -> SearchConfig:
    """The `[search]` table of a TOML file (other tables are ignored, so a run config can carry it too)."""
    data = read_toml(path)
    if "search" not in data:
        raise DwmlError(f"{path}: no [search] section")
    return from_dict(SearchConfig, data["search"], f"{path}: search").validate()


# --------------------------------------------------------------------------------------------------------------
# Reference architecture


def resolve_reference(spec: str, family: str = "") -> Arch:
    """A preset name (in `family`, default RoBERTa), a JSON/TOML file with an architecture (top level or an `arch`
    table; a Hugging Face config.json works too), or a Hugging Face model directory holding config.json."""
    if spec in PRESETS:
        return get_preset(spec, family or "roberta")
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise DwmlError(f"search.reference {spec!r}: directory has no config.json")
    if not path.is_file():
        raise DwmlError(f"search.reference {spec!r}: not a preset ({sorted(PRESETS)}) nor an existing file/directory")
    if path.suffix == ".toml":
        data = read_toml(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DwmlError(f"{path}: invalid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("arch"), dict):
        data = data["arch"]
    if not isinstance(data, dict):
        raise DwmlError(f"{path}: expected an architecture object, got {type(data).__name__}")
    if "num_hidden_layers" in data:  # Hugging Face config.json
        hf_keys = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "hidden": "hidden_size",
                   "intermediate": "intermediate_size", "vocab_size": "vocab_size",
                   "max_positions": "max_position_embeddings"}
        missing = sorted(v for v in hf_keys.values() if v not in data)
        if missing:
            raise DwmlError(f"{path}: Hugging Face config lacks {missing}")
        family = data.get("model_type", "roberta")  # (one that is no dwml family is refused by Arch)
        return Arch.from_dict({"family": family, **{k: data[v] for k, v in hf_keys.items()}}, str(path))
    return Arch.from_dict(data, str(path))


# --------------------------------------------------------------------------------------------------------------
# Bayesian optimisation


def _grid_ucb(candidates: np.ndarray):
    """bayes_opt's UCB acquisition (mean + UCB_KAPPA * std), maximised exactly over the not-yet-evaluated points
    of the discrete space `candidates` (rows in bayes_opt's key order).

    bayes_opt's own maximiser samples 10,000 random points and runs scipy's differential evolution at every
    iteration (~0.3 s each), and on integer parameters it keeps re-suggesting an already-evaluated optimum: such a
    repeat is not registered, so the GP does not change and the remaining iterations are all wasted (we measured
    peers ending with 23 distinct evaluations out of 110 and a 40% miss). Scoring every unseen point of our few
    thousand is exact, cheaper, and makes each of the n_iter iterations a new architecture. Subclassing the
    acquisition function is bayes_opt's supported extension point; the GP, the loop and UCB itself are the library's.
    """
    from bayes_opt import acquisition

    class GridUCB(acquisition.UpperConfidenceBound):
        def suggest(self, gp, target_space, n_random=0, n_smart=0, fit_gp=True, random_state=None):
            self.i += 1
            if fit_gp:
                self._fit_gp(gp=gp, target_space=target_space)
            seen = np.zeros(len(candidates), dtype=bool)
            seen[_flat_index(candidates, np.rint(target_space.params).astype(np.int64))] = True
            if seen.all():  # the whole space is evaluated: any point (a cached repeat) ends the loop harmlessly
                return candidates[0].astype(np.float64)
            unseen = candidates[~seen]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mean, std = gp.predict(unseen.astype(np.float64), return_std=True)
            self.decay_exploration()
            return unseen[int(np.argmax(self.base_acq(mean, std)))].astype(np.float64)

    return GridUCB(kappa=UCB_KAPPA)


def _flat_index(candidates: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Row numbers in `candidates` (a full C-order grid whose columns start at their minima) of `points`."""
    lo = candidates.min(axis=0)
    shape = tuple(int(n) for n in candidates.max(axis=0) - lo + 1)
    return np.ravel_multi_index(tuple((points - lo).T), shape)


def _run_bo(space: Space, cfg: SearchConfig, target: int, earlier: list[Arch], peer: int) -> tuple[Arch, int]:
    """BO's best architecture for one peer (the best evaluated point that no earlier peer has) and the number of
    distinct points it evaluated."""
    from bayes_opt import BayesianOptimization

    taken = {shape_of(a) for a in earlier}
    d0, step = cfg.head_dim[0], cfg.head_dim_step

    def f(layers: int, heads: int, head_dim_index: int) -> float:
        a = space.arch(layers, heads, d0 + step * head_dim_index)
        score = float(objective(count_params(a), a.hidden, a.layers, target, earlier, cfg.diversity_weight))
        return score - DUPLICATE_PENALTY if shape_of(a) in taken else score

    pbounds = {
        "layers": (cfg.layers[0], cfg.layers[1], int),
        "heads": (cfg.heads[0], cfg.heads[1], int),
        "head_dim_index": (0, len(space.head_dim_values) - 1, int),
    }
    # The same grid as `space`, in bayes_opt's coordinates (key order as in pbounds).
    candidates = np.stack([space.layers, space.heads, (space.hidden // space.heads - d0) // step], axis=1)
    # Independent, reproducible stream per (seed, peer).
    rng = np.random.RandomState(np.random.SeedSequence([cfg.seed, peer]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Non-float parameters are experimental", sklearn convergence notes
        bo = BayesianOptimization(f=f, pbounds=pbounds, acquisition_function=_grid_ucb(candidates), random_state=rng,
                                  verbose=0, allow_duplicate_points=False)
        bo.set_gp_params(n_restarts_optimizer=GP_RESTARTS)
        bo.maximize(init_points=cfg.init_points, n_iter=cfg.n_iter)
    best: tuple[float, Arch] | None = None
    for r in bo.res:
        p = r["params"]
        a = space.arch(p["layers"], p["heads"], d0 + step * p["head_dim_index"])
        if shape_of(a) not in taken and (best is None or r["target"] > best[0]):
            best = (r["target"], a)
    if best is None:
        raise DwmlError(f"search: peer {peer}: BO evaluated only architectures of earlier peers; "
                        "raise search.n_iter or search.init_points")
    return best[1], len(bo.res)


# --------------------------------------------------------------------------------------------------------------
# Driver


def search(cfg: SearchConfig, reference: Arch | None = None) -> dict[str, Any]:
    """Run the search; returns the JSON-ready result (see module docstring). `reference` overrides cfg.reference."""
    cfg.validate()
    t0 = time.perf_counter()
    ref_name = cfg.reference if reference is None else "custom"
    ref = resolve_reference(cfg.reference, cfg.family) if reference is None else reference
    ref = ref.replace(vocab_size=cfg.vocab_size or ref.vocab_size, max_positions=cfg.max_positions or ref.max_positions)
    n_ref = count_params(ref)
    family = cfg.family or ref.family
    space = build_space(cfg, ref.vocab_size, ref.max_positions, family)
    n_shapes = len(np.unique(np.stack([space.layers, space.hidden]), axis=1).T)
    if n_shapes < cfg.peers:
        raise DwmlError(f"search: only {n_shapes} distinct (layers, hidden) shapes in the search space for "
                        f"{cfg.peers} peers; widen the bounds")
    targets = peer_targets(n_ref, cfg.peers)
    lo, hi = int(np.argmin(space.params)), int(np.argmax(space.params))
    for i, t in enumerate(targets, 1):
        # A target outside [smallest, largest] has no close match: the "best" would just be a corner of the box.
        if t < space.params[lo]:
            raise DwmlError(
                f"search: peer {i} target {t:,} params (N/{i + 1} of {n_ref:,}) is below the smallest model in the "
                f"search space ({int(space.params[lo]):,} params, {space.arch_at(lo).name}); lower the layers/heads/"
                f"head_dim bounds or use fewer peers")
        if t > space.params[hi]:
            raise DwmlError(
                f"search: peer {i} target {t:,} params is above the largest model in the search space "
                f"({int(space.params[hi]):,} params, {space.arch_at(hi).name}); raise the layers/heads/head_dim bounds")

    peers: list[dict[str, Any]] = []
    chosen: list[Arch] = []
    exhaustive_s = 0.0
    for i, target in enumerate(targets, 1):
        arch, n_eval = _run_bo(space, cfg, target, chosen, i)
        t_ex = time.perf_counter()
        best = exhaustive_best(space, target, chosen, cfg.diversity_weight)
        exhaustive_s += time.perf_counter() - t_ex
        params, ex_params = count_params(arch), count_params(best)
        peers.append({
            "peer": i,
            "target": target,
            "params": params,
            "rel_error": rel_error(params, target),
            "arch": arch.to_dict(),
            "bo_evaluations": n_eval,
            "exhaustive_params": ex_params,
            "exhaustive_arch": best.to_dict(),
            "exhaustive_rel_error": rel_error(ex_params, target),
            "gap_to_exhaustive": rel_error(params, target) - rel_error(ex_params, target),
        })
        chosen.append(arch)
    config = dataclasses.asdict(cfg)
    config["reference"] = ref_name
    return {
        "reference": {"name": ref_name, **ref.to_dict(), "params": n_ref},
        "config": config,
        "family": family,
        "intermediate_ratio": space.intermediate_ratio,
        "peers": peers,
        "space_size": len(space),
        "exhaustive_time_s": round(exhaustive_s, 4),
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }


def format_table(result: Mapping[str, Any]) -> str:
    """Plain-text table of a search result (aligned columns)."""
    ref = result["reference"]
    head = ("peer", "target", "params", "rel_err", "layers", "heads", "hidden", "inter", "exhaustive", "ex_err", "gap")
    rows = [head]
    for p in result["peers"]:
        a = p["arch"]
        rows.append((str(p["peer"]), f"{p['target']:,}", f"{p['params']:,}", f"{100 * p['rel_error']:.3f}%",
                     str(a["layers"]), str(a["heads"]), str(a["hidden"]), str(a["intermediate"]),
                     f"{p['exhaustive_params']:,}", f"{100 * p['exhaustive_rel_error']:.3f}%",
                     f"{100 * p['gap_to_exhaustive']:.3f}%"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = [
        f"reference {ref['name']} ({ref.get('family', 'roberta')}): L{ref['layers']} A{ref['heads']} H{ref['hidden']} "
        f"I{ref['intermediate']} vocab {ref['vocab_size']} positions {ref['max_positions']} -> {ref['params']:,} "
        f"params; peers: {result.get('family', 'roberta')}",
    ]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    c = result["config"]
    lines.append(f"{len(result['peers'])} peers x {c['init_points']}+{c['n_iter']} BO evaluations over "
                 f"{result['space_size']:,} architectures in {result['wall_time_s']:.1f} s "
                 f"(exhaustive check {result['exhaustive_time_s']:.3f} s); gap = BO rel_err - exhaustive rel_err")
    return "\n".join(lines)


def run_search_to_file(cfg: SearchConfig, out: str | Path, reference: Arch | None = None,
                       quiet: bool = True) -> dict[str, Any]:
    """`search` + atomic JSON write (+ the table on stdout unless quiet)."""
    result = search(cfg, reference=reference)
    write_json(out, result_document("search", result))
    if not quiet:
        print(format_table(result))
        print(f"wrote {out}")
    return result


def load_peer_archs(path: str | Path) -> list[Arch]:
    """The peers' architectures from a `dwml search` JSON file, in peer order."""
    return [arch for arch, _ in read_peers_file(path)]


def read_peers_file(path: str | Path) -> list[tuple[Arch, dict]]:
    """(Arch, its 'arch' table as written) of every peer of a `dwml search` JSON file, in peer order: the file is
    read and parsed once, and a caller can still tell a vocab_size / max_positions the table leaves out (`Arch`
    fills in defaults) from one it gives."""
    path = Path(path)
    if not path.is_file():
        raise DwmlError(f"{path}: peers file not found (write one with `dwml search --out`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DwmlError(f"{path}: invalid JSON ({e})") from None
    peers = data.get("peers") if isinstance(data, dict) else None
    if not isinstance(peers, list) or not peers:
        raise DwmlError(f"{path}: expected an object with a non-empty 'peers' list (the output of `dwml search`)")
    archs = []
    for k, p in enumerate(peers):
        if not isinstance(p, dict) or not isinstance(p.get("arch"), dict):
            raise DwmlError(f"{path}: peers[{k}]: expected an object with an 'arch' table")
        archs.append((Arch.from_dict(p["arch"], f"{path}: peers[{k}].arch"), p["arch"]))
    return archs


# --------------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="Bayesian-optimisation search for peer architectures of N/2, N/3, ... parameters",
        description="Find for each peer i = 1..p the architecture whose exact parameter count is closest to "
                    "N/(i+1), N = the reference's; prints a table and writes the JSON that `dwml train "
                    "--peers-file` reads.",
    )
    p.add_argument("--config", help="TOML file with a [search] section (flags override it)")
    p.add_argument("--reference", help="preset name, JSON/TOML arch file or HF model dir (default: base)")
    p.add_argument("--peers", type=int, help="number of peers p (default: 4)")
    p.add_argument("--out", default="peers.json", help="output JSON (default: peers.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not a previous result of this command")
    p.add_argument("--init-points", type=int, help="random initial points per peer (default: 10)")
    p.add_argument("--n-iter", type=int, help="BO iterations per peer (default: 100)")
    p.add_argument("--seed", type=int)
    p.add_argument("--vocab-size", type=int, help="vocabulary size of the reference and the peers")
    p.add_argument("--max-positions", type=int, help="position embeddings of the reference and the peers")
    p.add_argument("--family", choices=MODEL_FAMILIES,
                   help="model family of the peers (default: the reference's; presets are RoBERTa)")
    p.add_argument("--intermediate-ratio", type=float,
                   help="intermediate = ratio * hidden (default: 4 for RoBERTa, 8/3 for ModernBERT's GeGLU)")
    p.add_argument("--layers", type=int, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--heads", type=int, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--head-dim", type=int, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--head-dim-step", type=int)
    p.add_argument("--diversity-weight", type=float)
    p.set_defaults(func=run_search_cli)
    return p


def run_search_cli(args) -> int:
    check_output_file(args.out, "search", overwrite=args.overwrite)  # before the search, not after it
    cfg = load_search_config(args.config) if args.config else SearchConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, **{k: list(v) if isinstance(v, list) else v for k, v in overrides.items()})
    run_search_to_file(cfg, args.out, quiet=False)
    return 0
