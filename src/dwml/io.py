"""Atomic file output: nothing half-written is ever left behind, and nothing dwml did not write is ever replaced.

Every writer goes to a temporary sibling first and is renamed into place only when complete; `os.replace` is
atomic on POSIX, so a reader (or a resumed run) sees either the old file or the new one, never a torn one.

Temporary names carry the writer's pid and host (`.NAME.dwmltmp.PID.HOST.XXXX`), so the temp files and
directories a killed process left behind are recognisable and removed by the next write to the same target.
Files and directories get the modes the umask allows (mkstemp/mkdtemp alone would make them 0600/0700).

A directory written whole by a command (`dwml prepare --out D`, `dwml export --out D`) holds a marker file,
`D/.dwml-output.json`, naming the command; `check_output_dir` refuses to replace a directory without the marker of
the same command (unless the user passes `--overwrite`), an output that would swallow or sit inside one of the
command's inputs, and an output inside another dwml output such as a run directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

MARKER = ".dwml-output.json"
# The first key of every JSON result written to a user-named --out file: the command that wrote it.
RESULT_KEY = "dwml_result"
# Commands whose output directory is a container of other dwml outputs (prepared data, runs), not one output.
CONTAINER_COMMANDS = ("experiment", "demo")
_TMP_TAG = "dwmltmp"


# --------------------------------------------------------------------------------------------------------------
# Modes and temporary names


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_prefix(name: str) -> str:
    return f".{name}.{_TMP_TAG}.{os.getpid()}.{_host_tag()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """Remove the temp files/dirs for target `parent/name` (any target in `parent` if `name` is None) left by
    killed dwml processes on this host.

    Only names of our own pattern whose writer (pid, on this host) no longer runs are touched; another live
    writer's temp (or one from another host sharing the file system) is left alone. Returns what was removed.
    """
    target = re.escape(name) if name is not None else r".+?"
    pattern = re.compile(rf"\.{target}\.{_TMP_TAG}\.(\d+)\.([0-9a-f]{{8}})\.")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = _host_tag()
    for p in entries:
        m = pattern.match(p.name)
        if not m or m.group(2) != host:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds, delete it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~current_umask())
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; it replaces `path` (whole) only if the block succeeds.

    With `command`, the directory gets the marker `.dwml-output.json` naming it, so a later run of the same
    command recognises the directory as its own output (see `check_output_dir`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    clean_stale_temps(path.parent, f"{path.name}.old")
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        if command:
            write_json(tmp / MARKER, {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())})
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(f"{path.name}.old"), suffix=".tmp", dir=path.parent))
            os.replace(path, old / "old")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# Output guards: never replace what dwml did not write


def output_command(d: Path) -> str | None:
    """The dwml command whose output directory `d` is (its marker), or None. Older run directories without a
    marker are recognised by their checkpoints / final summary."""
    marker = d / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data.get("command") if isinstance(data, dict) else None
    if (d / "checkpoints").is_dir() or (d / "final" / "summary.json").is_file():
        return "train"
    return None


def enclosing_output(real: Path) -> tuple[Path, str] | None:
    """(directory, description) of the nearest directory above `real` (resolved) that is another dwml output - a
    run directory, prepared data, ... but not an experiment/demo directory, which holds outputs - or None."""
    for parent in real.parents:
        kind = output_command(parent)
        if kind and kind not in CONTAINER_COMMANDS:
            return parent, "the run directory" if kind == "train" else f"the `dwml {kind}` output"
    return None


def _is_within(a: Path, b: Path) -> bool:
    """a == b or a lies inside b (both resolved)."""
    return a == b or b in a.parents


def check_output_dir(out: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
                     overwrite: bool = False, allowed_inside: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse (DwmlError, before any work) an output directory that `dwml <command>` must not replace.

    - a non-directory at `out` (a regular file would silently become a directory);
    - `out` equal to an input or to the working directory, holding one (replacing it would delete it) or inside
      an input;
    - `out` inside another dwml output (a run directory, prepared data, ...), except under `allowed_inside`;
    - a run directory (or an experiment/demo directory holding runs), even with `overwrite`;
    - an existing non-empty directory that is not a previous output of the same command, unless `overwrite`.
    Returns `out` as given.
    """
    from .errors import DwmlError

    out = Path(out)
    flag = f"dwml {command} --out"
    if out.exists() and not out.is_dir():
        raise DwmlError(f"{flag} {out}: exists and is not a directory; refusing to replace it")
    real = out.resolve()
    allowed = any(_is_within(real, Path(a).resolve()) for a in allowed_inside)
    for inp in inputs:
        r = Path(inp).resolve()
        if _is_within(r, real):
            raise DwmlError(f"{flag} {out}: would replace the input {inp}; choose another output directory")
        if r.is_dir() and _is_within(real, r) and not allowed and not output_command(r):
            raise DwmlError(f"{flag} {out}: is inside the input {inp}; choose an output directory outside it")
    if _is_within(Path.cwd().resolve(), real):
        raise DwmlError(f"{flag} {out}: is the current directory or holds it; choose an output directory below it")
    enclosing = None if allowed else enclosing_output(real)
    if enclosing:
        parent, what = enclosing
        raise DwmlError(f"{flag} {out}: is inside {what} {parent}; choose an output directory outside it")
    kind = output_command(real) if real.is_dir() else None
    if kind in ("train", *CONTAINER_COMMANDS) and kind != command:  # runs are never replaced, even on request
        what = "a run directory" if kind == "train" else f"a `dwml {kind}` directory (it holds runs)"
        raise DwmlError(f"{flag} {out}: is {what}; choose another output directory")
    if real.is_dir() and any(real.iterdir()) and kind != command and not overwrite:
        raise DwmlError(f"{flag} {out}: exists and is not a previous `dwml {command}` output (no {MARKER} from it); "
                        f"choose another directory or pass --overwrite to replace it")
    return out


def claim_dir(d: str | os.PathLike, command: str, legacy: Iterable[str] = ()) -> Path:
    """Create (or reuse) the directory `d` that `dwml <command>` fills file by file, marking it as its own.

    An existing non-empty directory is reused only when it carries this command's marker or one of the `legacy`
    files an older dwml wrote there; anything else is refused (DwmlError), so a mistyped --out / out_dir never
    scatters results into, or overwrites files of, an unrelated directory.
    """
    from .errors import DwmlError

    d = Path(d)
    if d.exists() and not d.is_dir():
        raise DwmlError(f"{command} output {d}: exists and is not a directory")
    if d.is_dir() and output_command(d) != command:
        if any(d.iterdir()) and not any((d / f).exists() for f in legacy):
            raise DwmlError(f"{command} output {d}: exists and is not a `dwml {command}` directory (no {MARKER}); "
                            "choose a new or empty directory")
    d.mkdir(parents=True, exist_ok=True)
    if output_command(d) != command:
        write_json(d / MARKER, {"command": command,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return d


def result_document(command: str, result: dict) -> dict:
    """`result` with dwml's format marker first: {RESULT_KEY: command, ...}. Every JSON result that a user names
    with `--out` carries it, so a later `--out` can tell a previous result of the same command from anything else."""
    return {RESULT_KEY: command, **{k: v for k, v in result.items() if k != RESULT_KEY}}


def result_command(path: Path) -> str | None:
    """The command whose marked JSON result `path` is, or None (not JSON, not an object, or no marker)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get(RESULT_KEY) if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def owning_output(real: Path) -> tuple[Path, str] | None:
    """(directory, description) of what the file at `real` (resolved) belongs to: any dwml output above it (a run,
    prepared data, an export, an experiment or demo directory), prepared data without a marker (meta.json next to
    tokenizer/), or a Hugging Face model folder (config.json beside it); None for a plain directory."""
    for parent in real.parents:
        kind = output_command(parent)
        if kind:
            return parent, "the run directory" if kind == "train" else f"the `dwml {kind}` output"
    for parent in list(real.parents)[:2]:
        if (parent / "meta.json").is_file() and (parent / "tokenizer").is_dir():
            return parent, "the prepared data directory"
    if (real.parent / "config.json").is_file():
        return real.parent, "the model folder"
    return None


def check_output_file(path: str | os.PathLike | None, command: str, *, overwrite: bool = False,
                      flag: str = "--out") -> None:
    """Refuse, before any work, an output file path that cannot or must not be written by `dwml <command>`:
    - a directory, a path below a regular file, a symbolic link (the atomic write would replace the link);
    - an existing file inside a run, prepared data, a model folder or another dwml output, unless it is a previous
      result of this command: such files are what those directories need, so `--overwrite` does not apply;
    - anywhere else, an existing file that is not a previous result of this command (no `RESULT_KEY` marker naming
      it), unless `overwrite`."""
    from .errors import DwmlError

    if not path:
        return
    p = Path(path)
    if p.is_symlink():
        raise DwmlError(f"{flag} {p}: is a symbolic link; refusing to replace it (name the file itself)")
    if p.is_dir():
        raise DwmlError(f"{flag} {p}: is a directory; expected a file name such as {p / 'results.json'}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DwmlError(f"{flag} {p}: {parent} is not a directory")
            break
    if not p.exists():
        return
    real = p.resolve()
    ours = result_command(real) == command
    owner = owning_output(real)
    if owner and not ours:
        where, what = owner
        raise DwmlError(f"{flag} {p}: is a file of {what} {where}; dwml never overwrites it "
                        f"(--overwrite does not apply); choose another file name")
    if not ours and not overwrite:
        raise DwmlError(f"{flag} {p}: exists and is not a previous `dwml {command}` result (no \"{RESULT_KEY}\" "
                        f"marker); choose another file or pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------------------
# Reading and writing


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse a JSON file; unreadable or malformed files raise DwmlError naming the file."""
    from .errors import DwmlError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DwmlError(f"{path}: unreadable {what} ({e})") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
