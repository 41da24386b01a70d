"""Training checkpoints: written atomically, checksummed, validated on load, newest-first discovery for resume.

Every checkpoint carries `checksum`, a SHA-256 over its whole content (every tensor's bytes, every number and
string, in a fixed traversal order), recomputed on load: a flipped bit anywhere in the data - which torch.load
itself does not notice - is a one-line error naming the file instead of a silently different run.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DwmlError
from ..io import atomic_path, clean_stale_temps

_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
REQUIRED_KEYS = ("step", "students", "optimizers", "schedulers", "rng", "config", "checksum")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def _digest(obj: Any, h) -> None:
    """Feed `obj` into hash `h`, tagging every node with its type so that different structures never collide."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():  # hash the bytes in place (no copy beyond the device -> host one)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"N{a.dtype}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8) if a.size and a.dtype != object else repr(a.tolist()).encode())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():  # insertion order: preserved by pickle, so save and load agree
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic, torch.dtype, torch.device)):
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
    else:  # anything else a state may hold: its repr (stable for the plain types optimizers and RNGs use)
        h.update(f"O{type(obj).__name__}:{obj!r};".encode())


def _to_cpu(obj: Any) -> Any:
    """`obj` with every tensor on the host (containers rebuilt, everything else as it is)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):  # exactly these: a namedtuple's constructor takes fields, not an iterable
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint state's content, the `checksum` key itself excluded."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` for `step` (temp file + rename, with its checksum) and keep only the newest `keep` ones.

    Rotation only removes checkpoints of steps *below* `step`: the one just written - the current run's newest -
    is never removed, whatever else the folder holds.
    """
    path = checkpoint_path(run_dir, step)
    clean_stale_temps(path.parent)  # a checkpoint half-written by a killed run (another step's name)
    state = _to_cpu(state)  # one device -> host copy, shared by the checksum and torch.save
    state = {**state, "checksum": state_checksum(state)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # through a file object: a full disk raises OSError(ENOSPC), not an opaque error
            torch.save(state, f)
    older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return path


def checkpoint_step(path: str | Path) -> int:
    m = _CKPT_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"not a checkpoint file name: {path}")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint, turning truncated/corrupt/foreign/bit-flipped files into a one-line DwmlError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DwmlError(f"{path}: corrupt or unreadable checkpoint ({reason}); delete it to restart from an earlier one") from None
    except Exception as e:  # a flipped bit in the pickle stream can raise almost anything while unpickling
        raise DwmlError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}); delete it to restart "
                        "from an earlier one") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS if k != "checksum"):
        raise DwmlError(f"{path}: not a dwml checkpoint (expected keys {list(REQUIRED_KEYS)})")
    if "checksum" not in state:
        raise DwmlError(f"{path}: checkpoint without a checksum (written by an older dwml); start over with "
                        "--no-resume (the old run is moved aside)")
    if state_checksum(state) != state["checksum"]:
        raise DwmlError(f"{path}: corrupt checkpoint (checksum mismatch: its content changed after it was written); "
                        "delete it to restart from an earlier one")
    return state
