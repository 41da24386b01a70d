"""The peer search's discrete space and objective: every (layers, heads, head_dim) shape of a family with its exact
parameter count (one numpy pass over the grid, `build_space`), the objective J (closeness to the target size plus
an optional diversity bonus against earlier peers) and the exhaustive optimum that the BO result is checked against."""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DwmlError
from .model import Arch, count_params

if TYPE_CHECKING:  # the config class lives with the search driver, which imports this module
    from .search import SearchConfig


# An architecture already chosen by an earlier peer costs this much objective (a factor e in size): enough that BO
# moves away, small enough that the GP's normalised targets are not dominated by a few spikes.
DUPLICATE_PENALTY = 1.0


# Width/depth ratios differing by 4x count as fully different: the diversity bonus saturates there, so it cannot
# push a peer to an absurd shape just to be "more different".
DIVERSITY_CAP = math.log(4.0)


# intermediate = ratio * hidden when search.intermediate_ratio is 0: the FFN widths of equal weight count.
FAMILY_INTERMEDIATE_RATIO = {"roberta": 4.0, "modernbert": 8.0 / 3.0}


@dataclass(frozen=True)
class Space:
    """Every architecture of the search space as parallel flat int64 arrays, in (layers, heads, head_dim) order."""

    head_dim_values: np.ndarray
    layers: np.ndarray
    heads: np.ndarray
    hidden: np.ndarray
    intermediate: np.ndarray
    params: np.ndarray
    vocab_size: int
    max_positions: int
    intermediate_ratio: float
    family: str = "roberta"

    def __len__(self) -> int:
        return len(self.params)

    def arch(self, layers: int, heads: int, head_dim: int) -> Arch:
        hidden = heads * head_dim
        return Arch(layers=int(layers), heads=int(heads), hidden=int(hidden),
                    intermediate=intermediate_size(hidden, self.intermediate_ratio),
                    vocab_size=self.vocab_size, max_positions=self.max_positions, family=self.family)

    def arch_at(self, k: int) -> Arch:
        return Arch(layers=int(self.layers[k]), heads=int(self.heads[k]), hidden=int(self.hidden[k]),
                    intermediate=int(self.intermediate[k]), vocab_size=self.vocab_size,
                    max_positions=self.max_positions, family=self.family)


def intermediate_size(hidden: Any, ratio: float) -> Any:
    """round(ratio * hidden), at least 1; works on ints and numpy arrays alike."""
    out = np.maximum(1, np.rint(np.asarray(hidden, dtype=np.float64) * ratio)).astype(np.int64)
    return int(out) if out.ndim == 0 else out


def build_space(cfg: SearchConfig, vocab_size: int, max_positions: int, family: str = "roberta") -> Space:
    """The whole grid of `family` shapes; `cfg.intermediate_ratio` 0 = the family's (FAMILY_INTERMEDIATE_RATIO)."""
    ratio = float(cfg.intermediate_ratio or FAMILY_INTERMEDIATE_RATIO[family])
    layer_values = np.arange(cfg.layers[0], cfg.layers[1] + 1, dtype=np.int64)
    head_values = np.arange(cfg.heads[0], cfg.heads[1] + 1, dtype=np.int64)
    head_dim_values = np.arange(cfg.head_dim[0], cfg.head_dim[1] + 1, cfg.head_dim_step, dtype=np.int64)
    L, A, D = (g.ravel() for g in np.meshgrid(layer_values, head_values, head_dim_values, indexing="ij"))
    hidden = A * D
    inter = intermediate_size(hidden, ratio)
    # count_params is plain arithmetic on the Arch fields, so it evaluates the whole grid at once on numpy arrays:
    # one formula, shared with the scalar objective (no second copy to drift out of sync).
    grid = types.SimpleNamespace(layers=L, heads=A, hidden=hidden, intermediate=inter,
                                 vocab_size=vocab_size, max_positions=max_positions, family=family)
    return Space(head_dim_values, L, A, hidden, inter, count_params(grid),  # type: ignore[arg-type]
                 vocab_size, max_positions, ratio, family)


def objective(params: Any, hidden: Any, layers: Any, target: int, earlier: list[Arch], diversity_weight: float) -> Any:
    """J without the duplicate penalty (see module docstring); scalars or numpy arrays."""
    score = -np.abs(np.log(np.asarray(params, dtype=np.float64) / target))
    if diversity_weight > 0 and earlier:
        ratio = np.log(np.asarray(hidden, dtype=np.float64) / np.asarray(layers, dtype=np.float64))
        distance = np.min([np.abs(ratio - math.log(a.hidden / a.layers)) for a in earlier], axis=0)
        score = score + diversity_weight * np.minimum(distance, DIVERSITY_CAP)
    return score


def shape_of(a: Arch) -> tuple[int, int, int]:
    """What makes two peers different models: the head count changes no weight shape (and no parameter count),
    so architectures differing only in heads count as the same for distinctness."""
    return (a.layers, a.hidden, a.intermediate)


def exhaustive_best(space: Space, target: int, earlier: list[Arch], diversity_weight: float = 0.0) -> Arch:
    """argmax of J over the whole space, excluding the earlier peers' shapes (first in space order on ties)."""
    score = objective(space.params, space.hidden, space.layers, target, earlier, diversity_weight)
    for a in earlier:
        same = (space.layers == a.layers) & (space.hidden == a.hidden) & (space.intermediate == a.intermediate)
        score[same] = -np.inf
    k = int(np.argmax(score))
    if not np.isfinite(score[k]):
        raise DwmlError("search: the search space has fewer distinct architectures than peers; widen the bounds")
    return space.arch_at(k)


def rel_error(params: int, target: int) -> float:
    return abs(params - target) / target


def peer_targets(n_reference: int, peers: int) -> list[int]:
    """N_i = N / (i + 1) for i = 1..p, rounded to whole parameters."""
    return [round(n_reference / (i + 1)) for i in range(1, peers + 1)]
