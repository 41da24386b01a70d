"""The unigram plateau: the step at which a model's validation loss leaves the corpus' unigram entropy.

A masked LM that has learned token frequencies and nothing else predicts every masked token with the training
split's unigram distribution; its expected loss is then the unigram entropy H (`dwml.data.entropy`). A validation
loss at H means "frequencies only"; `PLATEAU_MARGIN` nats below H is where we say a model has started to use context
(`plateau_exit_step`).
"""
from __future__ import annotations

from pathlib import Path

PLATEAU_MARGIN = 0.5  # nats below the unigram entropy that count as "off the plateau"


def plateau_exit_step(valid_records: list[tuple[int, float]], entropy: float,
                      margin: float = PLATEAU_MARGIN) -> int | None:
    """First step whose validation loss is at least `margin` nats below `entropy`; None if never.

    `valid_records` are (step, valid loss) pairs; they are scanned in step order.
    """
    for step, loss in sorted(valid_records):
        if loss <= entropy - margin:
            return int(step)
    return None


def valid_history(metrics_path: str | Path, n_students: int) -> list[list[tuple[int, float]]]:
    """(step, valid loss) of every student from a run's metrics.jsonl (records with `valid_loss`)."""
    from .metrics import read_records

    history: list[list[tuple[int, float]]] = [[] for _ in range(n_students)]
    for rec in read_records(metrics_path):
        losses = rec.get("valid_loss")
        if isinstance(losses, list) and len(losses) == n_students:
            for i, x in enumerate(losses):
                history[i].append((int(rec["step"]), float(x)))
    return history


def describe(valid_loss: float, entropy: float, exit_step: int | None) -> str:
    """One plain sentence: how far below the unigram entropy a model got."""
    gap = entropy - valid_loss
    where = (f"left the plateau ({PLATEAU_MARGIN:g} nats below) at step {exit_step}" if exit_step is not None
             else f"never {PLATEAU_MARGIN:g} nats below it")
    if gap < -0.05:
        verdict = "above the unigram entropy: it has not even learned the token frequencies yet"
    elif gap < 0.05:
        verdict = "on the unigram plateau: it has learned token frequencies only"
    elif gap < PLATEAU_MARGIN:
        verdict = "barely below the unigram plateau"
    else:
        verdict = "off the unigram plateau: it uses context"
    side = "below" if gap >= 0 else "above"
    return (f"valid loss {valid_loss:.3f} = {abs(gap):.3f} nats {side} the unigram entropy {entropy:.3f}: {verdict}; "
            f"{where}")
