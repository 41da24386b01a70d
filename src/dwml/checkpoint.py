"""Training checkpoints: written atomically, validated on load, newest-first discovery for resume."""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import DwmlError
from .io import atomic_path

_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
REQUIRED_KEYS = ("step", "students", "optimizers", "schedulers", "rng", "config")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` for `step` (temp file + rename) and keep only the newest `keep` checkpoints."""
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # through a file object: a full disk raises OSError(ENOSPC), not an opaque error
            torch.save(state, f)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint, turning truncated/corrupt/foreign files into a one-line DwmlError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DwmlError(f"{path}: corrupt or unreadable checkpoint ({reason}); delete it to restart from an earlier one") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise DwmlError(f"{path}: not a dwml checkpoint (expected keys {list(REQUIRED_KEYS)})")
    return state
