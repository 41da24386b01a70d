"""Learning-rate schedules: the multiplier of the peak LR (`train.lr`) at every optimizer step.

All schedules share a linear warm-up over `train.warmup_steps` steps and end at `min_lr_ratio` x the peak at
`max_steps`; they differ in the shape in between (`train.schedule`):

* `cosine`    half a cosine from the peak down to the floor (RoBERTa-style; dwml's original schedule).
* `linear`    a straight line from the peak down to the floor. With a short warm-up this is the schedule of Izsak
              et al. 2021 ("How to train BERT with an academic budget"); with `warmup_steps = max_steps // 2` it is the
              triangular one-cycle of Cramming (Geiping & Goldstein 2023).
* `trapezoid` flat at the peak, then a linear cool-down over the last `cooldown_fraction` of the steps (the
              warm-up / stable / decay shape; the flat part keeps the LR high for longer than cosine does).
* `constant`  flat at the peak after warm-up (ablation; ignores min_lr_ratio).
"""
from __future__ import annotations

import math


def lr_factor(step: int, t) -> float:
    """Multiplier of `t.lr` for optimizer step `step` (0-based) under the schedule of TrainConfig `t`."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    floor = t.min_lr_ratio
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "trapezoid":
        decay_steps = max(1, round(t.cooldown_fraction * t.max_steps))
        start = max(t.warmup_steps, t.max_steps - decay_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, t.max_steps - start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    if t.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {t.schedule!r}")  # RunConfig.validate rejects it first
