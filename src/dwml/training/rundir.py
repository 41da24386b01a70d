"""A run directory's safety: one trainer at a time, a run id tying checkpoints to their run, `--no-resume` that
never destroys the previous run, and resume only with the configuration the checkpoint was trained with.

    RUN/.dwml-train.lock     held (fcntl.flock) while a `dwml train` process trains RUN; holds its pid and host.
                             The kernel drops the lock when the process dies, so the file a killed trainer leaves
                             is stale: the next trainer takes it over with a notice.
    RUN/.dwml-output.json    marker: {"command": "train", "run_id": ...}; a new run id at every fresh start;
                             every checkpoint records it, and a checkpoint of another run id is never resumed.
    RUN/previous-<time>/     what `--no-resume` found in RUN (checkpoints, final/, metrics, results), moved aside.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import DwmlError
from ..io import MARKER, enclosing_output, output_command, write_json

LOCK_NAME = ".dwml-train.lock"
PREVIOUS_PREFIX = "previous-"

# Fields a resumed run may change: how long it trains, how often it logs/validates/saves, and how it shows progress,
# where it computes or how far ahead it builds batches (the same batches either way). Every other field changes
# what is trained, so it must match the checkpoint's.
RESUME_MAY_CHANGE = frozenset({
    "out_dir", "train.max_steps", "train.eval_every", "train.log_every", "train.save_every", "train.progress",
    "train.device", "train.compile", "data.prefetch",
})
_PATH_FIELDS = ("data.prepared", "model.peers_file", "distill.teacher")


# --------------------------------------------------------------------------------------------------------------
# Lock


class RunLock:
    """Exclusive lock on a run directory for one training process (a context manager; `enabled=False` on the
    non-master ranks of a DDP job, whose master holds it for all of them).

    A second trainer of the same directory gets a DwmlError naming the holder. The lock file is removed on exit,
    and a run directory this lock created is removed again when nothing else was written into it.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        import fcntl

        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise DwmlError(f"out_dir: {self.run_dir} exists and is not a directory")
        self.created_dir = not self.run_dir.exists()
        while True:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:  # read-only file system, no permission, ...
                raise DwmlError(f"out_dir: cannot write the lock file {self.path} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                self._cleanup_dir()
                raise DwmlError(f"{self.run_dir}: is being trained by {holder} (lock {self.path}); wait for it to "
                                "finish or stop it first") from None
            try:  # the holder we waited for may have removed the file just before we locked it: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous != "an unknown process":
            print(f"dwml: notice: {self.run_dir}: taking over the stale lock of {previous} (no longer running)",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it (see the inode check above)
        finally:
            os.close(self.fd)
            self.fd = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.created_dir:
            try:
                self.run_dir.rmdir()  # only if empty: a failure before anything was written leaves no run dir
            except OSError:
                pass


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "null")
        return f"pid {int(info['pid'])} on {info['host']} (since {info.get('started', '?')})"
    except (OSError, ValueError, TypeError, KeyError):
        return "an unknown process"


# --------------------------------------------------------------------------------------------------------------
# Start of a run: placement checks, --no-resume, run id


def _is_run_dir(d: Path) -> bool:
    return output_command(d) == "train" or ((d / "config.toml").is_file() and (d / "metrics.jsonl").is_file())


def check_run_placement(run_dir: Path, prepared: Path) -> None:
    """A run directory is never the prepared data or inside it or another dwml output, and never an existing
    directory of something else (training writes config.toml, metrics.jsonl, checkpoints/ and final/ into it)."""
    real = run_dir.resolve()
    data = prepared.resolve()
    if real == data or data in real.parents:
        raise DwmlError(f"out_dir: {run_dir} is inside the prepared data {prepared}; choose a run directory outside it")
    enclosing = enclosing_output(real)
    if enclosing:
        parent, what = enclosing
        raise DwmlError(f"out_dir: {run_dir} is inside {what} {parent}; choose a run directory outside it")
    foreign = [p.name for p in real.iterdir() if p.name != LOCK_NAME] if real.is_dir() else []
    if foreign and not _is_run_dir(real):
        raise DwmlError(f"out_dir: {run_dir} exists and is not a dwml run directory (it holds {sorted(foreign)[:3]}"
                        f"{'...' if len(foreign) > 3 else ''}); choose a new or empty directory")


def move_previous_run(run_dir: Path) -> Path | None:
    """Move everything a previous run left in `run_dir` into RUN/previous-<UTC time>/ (nothing is deleted)."""
    keep = {LOCK_NAME, MARKER}
    items = [p for p in run_dir.iterdir() if p.name not in keep and not p.name.startswith(PREVIOUS_PREFIX)]
    if not items:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = run_dir / f"{PREVIOUS_PREFIX}{stamp}", 1
    while dest.exists():
        dest, n = run_dir / f"{PREVIOUS_PREFIX}{stamp}-{n}", n + 1
    dest.mkdir()
    for p in items:
        os.replace(p, dest / p.name)
    return dest


def read_run_id(run_dir: Path) -> str | None:
    try:
        data = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("run_id") if isinstance(data, dict) else None


def begin_run(run_dir: str | Path, prepared: str | Path, resume: bool) -> str:
    """Called by the master at the start of training, under the lock; returns the run id.

    Resuming keeps the directory's run id. A fresh start (`--no-resume`, or nothing to resume) first moves the
    previous run's files aside - so neither a later resume nor checkpoint rotation can ever mix the two runs -
    and writes a new run id.
    """
    from .checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    check_run_placement(run_dir, Path(prepared))
    run_id = read_run_id(run_dir)
    if resume and run_id and list_checkpoints(run_dir):
        return run_id
    if not resume:
        moved = move_previous_run(run_dir)
        if moved is not None:
            print(f"dwml: notice: --no-resume: moved the previous run's files to {moved}", file=sys.stderr)
    run_id = uuid.uuid4().hex  # (checkpoints of a run from before run ids carry none and stay resumable)
    write_json(run_dir / MARKER, {"command": "train", "run_id": run_id,
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return run_id


# --------------------------------------------------------------------------------------------------------------
# Resume: the checkpoint must belong to this run and this configuration


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("data", "model", "train", "distill"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key in _PATH_FIELDS and a and b:
        return Path(a).resolve() == Path(b).resolve()
    return False


def config_changes(old_toml: str, cfg) -> list[str]:
    """Fields whose value differs between a checkpoint's config (TOML text) and `cfg`, beyond RESUME_MAY_CHANGE,
    as 'field: old -> new'."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    old = _flat(tomllib.loads(old_toml))
    new = _flat(dataclasses.asdict(cfg))
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_MAY_CHANGE:
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if not _same(key, a, b):
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


def check_resume(path: str | Path, state: dict, cfg, run_id: str | None) -> None:
    """Refuse to resume from checkpoint `path` when it belongs to another run or another configuration (whether its
    students' tensors fit the configured ones, e.g. after a peers file was rewritten under the same name, is
    `dwml.checks.check_checkpoint_matches`)."""
    theirs = state.get("run_id")
    if theirs and run_id and theirs != run_id:
        raise DwmlError(f"{path}: belongs to another run (run id {theirs}, this directory's is {run_id}); "
                        "move it away or start over with --no-resume")
    try:
        changes = config_changes(state["config"], cfg)
    except ValueError as e:  # TOMLDecodeError
        raise DwmlError(f"{path}: the checkpoint's config is unreadable ({e})") from None
    if changes:
        raise DwmlError(f"{path}: the config changed since this run started ({'; '.join(changes)}); resuming "
                        "may only change train.max_steps, eval/log/save cadence, progress, device, compile and data.prefetch - "
                        "restore those values, or start over with --no-resume (the old run is moved aside)")
