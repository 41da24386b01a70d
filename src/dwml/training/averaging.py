"""Weight averaging (`train.ema_decay`): an exponential moving average of every student's weights, the model a run
produces.

GPT-BERT, BabyLM's 2025 baseline, evaluates an EMA of its weights rather than the last ones: the average smooths the
noise of the last optimizer steps, which a small model on a small corpus feels in zero-shot scores. With
`ema_decay = d > 0` each student keeps an fp32 shadow copy of its parameters, updated after every optimizer step as

    ema <- ema + (1 - d_t) (theta - ema),   d_t = min(d, (1 + t) / (10 + t))    (t = optimizer steps taken)

- the warm-up d_t (as in TensorFlow's ExponentialMovingAverage with num_updates) keeps the first average from being
mostly the initialisation. The live weights train as before (DML / DWML peers see each other's live outputs); the
averaged ones are what validation measures and what the milestone checkpoints and the final export hold
(`all_swapped_in`). The shadow copies are part of the checkpoint, so a resumed run averages exactly as an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from ..errors import DwmlError


def ema_decay_at(decay: float, step: int) -> float:
    """d_t of the module docstring for the update after optimizer step `step` (1-based)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """EMA of one module's floating-point parameters (fp32, on the parameters' device)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: expected a value in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in module.parameters() if p.is_floating_point()]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current parameters (call after each optimizer step)."""
        self.updates += 1
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        live = [p.detach().float() for p in self.params]  # no copy for fp32 parameters
        torch._foreach_lerp_(self.shadow, live, weight)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the module holds the averaged weights; after (also on errors): its live weights, bit-exact."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise DwmlError("weight average: the checkpoint's shadow weights do not match these parameters")
        self.updates = int(state["updates"])
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)


def averages_for(students, decay: float) -> list[WeightAverage]:
    """One average per student, or none when `decay` is 0 (averaging off)."""
    return [WeightAverage(s, decay) for s in students] if decay > 0 else []


def load_averages(averages: list[WeightAverage], states: list[dict]) -> None:
    """Restore every student's average from a checkpoint's list (the config check already matched ema_decay)."""
    if len(states) != len(averages):
        raise DwmlError(f"weight average: the checkpoint holds {len(states)} averages, the run {len(averages)}")
    for a, sd in zip(averages, states):
        a.load_state_dict(sd)


@contextlib.contextmanager
def all_swapped_in(averages: Iterable[WeightAverage]):
    """Every student with its averaged weights inside (nothing changes when averaging is off)."""
    with contextlib.ExitStack() as stack:
        for a in averages:
            stack.enter_context(a.swapped_in())
        yield
