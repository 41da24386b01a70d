"""A run's metrics: `RUN/metrics.jsonl`, one JSON object per line, safe to resume; optionally the same numbers as
TensorBoard scalars in `RUN/tensorboard/` (`train.tensorboard = true`), to watch a run live.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import MISSING_TENSORBOARD, tensorboard_available
from ..errors import DwmlError
from ..io import write_text

TENSORBOARD_DIR = "tensorboard"
def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl record: a number keeps its key (`lr`, `tokens_per_s`,
    `valid_ensemble_loss`, ...), a per-peer list becomes `key/peer{i}` (`train_ce/peer0`, `omega/peer1`,
    `valid_loss/peer2`, ...); `step` is the x axis, anything else (None, text, booleans) is skipped."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{key}/peer{i}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class TensorBoardLog:
    """Scalars of every record, flushed at once so a running TensorBoard shows them live.

    A resumed run appends a new event file to the same folder, starting with a purge marker at the checkpoint's step
    + 1: TensorBoard drops the killed segment's points past the checkpoint, as metrics.jsonl drops its lines."""

    def __init__(self, log_dir: Path, resume_step: int | None):
        if not tensorboard_available():
            raise DwmlError(MISSING_TENSORBOARD)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # installed but unusable (e.g. a protobuf mismatch)
            raise DwmlError(f"train.tensorboard: cannot import torch.utils.tensorboard ({e})") from None
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        self.written: set[tuple[str, int]] = set()

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            # omega is in the train and the validation record of a step: one point per (tag, step), the first.
            if (tag, step) not in self.written:
                self.writer.add_scalar(tag, value, global_step=step)
                self.written.add((tag, step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, up to a torn last line (a killed run's); [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint's step are dropped.

    With `tensorboard`, every record also goes to RUN/tensorboard/ as scalars (see `scalars`). Only the process with
    `enabled` (rank 0) writes anything."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.tb: TensorBoardLog | None = None
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run
        write_text(path, "".join(x + "\n" for x in kept))
        if tensorboard:
            self.tb = TensorBoardLog(path.parent / TENSORBOARD_DIR, resume_step)

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                self.tb.write(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
