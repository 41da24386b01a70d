"""A run's metrics: `RUN/metrics.jsonl`, one JSON object per line, safe to resume."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .io import write_text


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
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

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
