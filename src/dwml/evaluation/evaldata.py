"""Zero-shot minimal-pair benchmarks: BLiMP (BabyLM-filtered), the BLiMP supplement and EWoK.

Every task is reduced to a list of `MinimalPair`s: the model is right on a pair when it scores `good` strictly higher
than `bad` (see `dwml.evaluation.evaluate`). A pair may carry a prefix per side; then only the continuation is scored, conditioned
on the visible prefix (EWoK).

Conventions follow BabyLM's 2025 evaluation pipeline (`evaluation_pipeline/sentence_zero_shot/read_files.py`):
- BLiMP: one pair per line, grouped by its `UID` (paradigm) and `field` ("syntax_semantics" is spelled
  "syntax/semantics", as the pipeline does).
- Supplement: grouped by file name; sentences are scored verbatim, so the "\\n" between dialogue turns stays in the
  text and becomes an ordinary (byte-level) token, as in the pipeline.
- EWoK, `ewok_pairing="targets"` (default, as BabyLM's pipeline scores it: `decode_ewok` of evaluation-pipeline-2025,
  read at 248fbcc): `Context1 + " " + Target1` (good) vs `Context1 + " " + Target2` (bad), only the
  target tokens (completions `" " + Target`) summed - which target fits the context better.
  `ewok_pairing="contexts"` (dwml's earlier default): the same `Target1` after `Context1` (good) vs after `Context2`
  (bad) - in which context is the target more plausible. Only `targets` numbers are comparable with BabyLM's. BabyLM's `ewok_filtered` files hold every item twice (the second
  copy with contexts and targets swapped), so both pairings test both targets and both contexts.

EWoK's terms forbid plain text online, so it is read straight from its password-protected zip and never written out.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DwmlError

EWOK_PASSWORD = b"ewok"
EWOK_ZIP = "ewok/ewok_data_babylm.zip"
EWOK_PAIRINGS = ("targets", "contexts")  # the first is the default (BabyLM's)


@dataclass(frozen=True)
class MinimalPair:
    """Two texts to compare; `group` is the BLiMP paradigm / supplement task / EWoK domain."""

    good: str
    bad: str
    group: str
    field: str
    good_prefix: str | None = None
    bad_prefix: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's files live under the eval data root (first existing candidate wins) and how to read them."""

    name: str
    kind: str  # "blimp" | "supplement" | "ewok"; not pairs (babylm_data): "entity_tracking" | "wug" | "reading"
    dirs: tuple[str, ...]  # candidate folders of *.jsonl files, relative to the data root
    zip_member: str | None = None  # EWoK: folder inside the password zip


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        # The vocabulary-filtered BLiMP that BabyLM reports as "BLiMP" (59,875 pairs), and its 200-per-paradigm subset.
        TaskSpec("blimp_filtered", "blimp", ("blimp_filtered", "full_eval/blimp_filtered")),
        TaskSpec("blimp_fast", "blimp", ("blimp_fast", "fast_eval/blimp_fast")),
        # The original BLiMP release (67 x 1000 pairs), for comparison with non-BabyLM papers.
        TaskSpec("blimp_original", "blimp", ("blimp/data",)),
        TaskSpec("blimp_supplement", "supplement",
                 ("blimp_supplement", "supplement_filtered", "full_eval/supplement_filtered")),
        TaskSpec("supplement_fast", "supplement",
                 ("blimp_supplement_fast", "supplement_fast", "fast_eval/supplement_fast")),
        TaskSpec("ewok", "ewok", ("ewok_filtered", "full_eval/ewok_filtered"), zip_member="ewok_filtered"),
        TaskSpec("ewok_fast", "ewok", ("ewok_fast", "fast_eval/ewok_fast"), zip_member="ewok_fast"),
        # The rest of BabyLM 2025's zero-shot suite: read and scored by babylm_data / babylm_tasks, not as pairs.
        TaskSpec("entity_tracking", "entity_tracking", ("entity_tracking", "full_eval/entity_tracking")),
        TaskSpec("wug_adj", "wug", ("wug_adj_nominalization", "full_eval/wug_adj_nominalization")),
        TaskSpec("wug_past", "wug", ("wug_past_tense", "full_eval/wug_past_tense")),
        TaskSpec("reading", "reading", ("reading", "full_eval/reading")),
    )
}
TASK_ALIASES = {"blimp": "blimp_filtered", "supplement": "blimp_supplement", "ewok_filtered": "ewok",
                "blimp_supplement_fast": "supplement_fast", "wug_adj_nominalization": "wug_adj",
                "wug_past_tense": "wug_past"}


def default_data_dir() -> Path:
    """`$DWML_EVAL_DATA`, else the shared read-only data next to the repository (`../shared/data/eval`)."""
    env = os.environ.get("DWML_EVAL_DATA")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[3]
    return repo_root.parent / "shared" / "data" / "eval"


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> canonical task names (aliases resolved, duplicates dropped, order kept)."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    out: list[str] = []
    for name in names:
        if not name:
            continue
        canon = TASK_ALIASES.get(name, name)
        if canon not in TASKS:
            raise DwmlError(f"--tasks: unknown task {name!r}; expected some of {sorted(TASKS)}")
        if canon not in out:
            out.append(canon)
    if not out:
        raise DwmlError("--tasks: no task given")
    return out


def load_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None,
              ewok_pairing: str = EWOK_PAIRINGS[0]) -> list[MinimalPair]:
    """All pairs of one task, files in sorted order; `limit` keeps the first N pairs of every file (quick runs);
    `ewok_pairing` says what an EWoK pair compares (see the module docstring)."""
    check_ewok_pairing(ewok_pairing)
    spec = TASKS.get(TASK_ALIASES.get(name, name))
    if spec is None:
        raise DwmlError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    if spec.kind not in ("blimp", "supplement", "ewok"):
        raise DwmlError(f"task {spec.name} is not made of minimal pairs; read it with babylm_data.load_babylm_task")
    if limit is not None and limit < 1:
        raise DwmlError(f"--limit: expected a positive number of pairs per file, got {limit}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if spec.kind == "ewok":
        folder = _first_dir(root, spec.dirs)
        if folder is not None:  # a user's own unpacked copy
            files = [(p.stem, _utf8(p.read_bytes(), str(p)), str(p)) for p in _jsonl_files(folder)]
        else:
            files = list(_read_zip_folder(root / EWOK_ZIP, spec.zip_member))
        return [pair for stem, text, where in files
                for pair in _decode_file(spec.kind, stem, text, where, limit, ewok_pairing)]
    folder = _first_dir(root, spec.dirs)
    if folder is None:
        tried = ", ".join(str(root / d) for d in spec.dirs)
        raise DwmlError(f"task {spec.name}: no data folder found (tried {tried}); pass --data-dir")
    pairs: list[MinimalPair] = []
    for path in _jsonl_files(folder):
        pairs.extend(_decode_file(spec.kind, path.stem, _utf8(path.read_bytes(), str(path)), str(path), limit))
    return pairs


def load_ewok_zip(zip_path: str | os.PathLike, member: str = "ewok_filtered", limit: int | None = None,
                  password: bytes = EWOK_PASSWORD, ewok_pairing: str = EWOK_PAIRINGS[0]) -> list[MinimalPair]:
    """EWoK pairs read in memory from the password-protected zip (nothing is extracted to disk)."""
    check_ewok_pairing(ewok_pairing)
    return [pair for stem, text, where in _read_zip_folder(Path(zip_path), member, password)
            for pair in _decode_file("ewok", stem, text, where, limit, ewok_pairing)]


def check_ewok_pairing(pairing: str, field: str = "--ewok-pairing") -> None:
    if pairing not in EWOK_PAIRINGS:
        raise DwmlError(f"{field}: expected one of {list(EWOK_PAIRINGS)}, got {pairing!r}")


# ---------------------------------------------------------------------------------------------------------- internals


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DwmlError(f"{where}:{line}: not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None


def _first_dir(root: Path, candidates: tuple[str, ...]) -> Path | None:
    for rel in candidates:
        if (root / rel).is_dir():
            return root / rel
    return None


def _jsonl_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jsonl" and p.is_file())
    if not files:
        raise DwmlError(f"{folder}: no *.jsonl files")
    return files


def _read_zip_folder(zip_path: Path, member: str, password: bytes = EWOK_PASSWORD) -> Iterator[tuple[str, str, str]]:
    """(file stem, decoded text, 'zip:member') for every *.jsonl directly under `member/` inside the zip."""
    if not zip_path.is_file():
        raise DwmlError(f"{zip_path}: EWoK zip not found; pass --data-dir pointing at the eval data root")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = sorted(n for n in zf.namelist()
                           if n.startswith(member.rstrip("/") + "/") and n.endswith(".jsonl"))
            if not names:
                raise DwmlError(f"{zip_path}: no {member}/*.jsonl inside")
            for name in names:
                try:
                    data = zf.read(name, pwd=password)
                except RuntimeError as e:  # zipfile reports a bad password as RuntimeError
                    raise DwmlError(f"{zip_path}:{name}: cannot decrypt ({e}); expected the EWoK password") from None
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:  # bad CRC, torn deflate stream
                    raise DwmlError(f"{zip_path}:{name}: corrupt zip member ({e})") from None
                yield Path(name).stem, _utf8(data, f"{zip_path}:{name}"), f"{zip_path}:{name}"
    except zipfile.BadZipFile as e:
        raise DwmlError(f"{zip_path}: not a readable zip ({e})") from None


_REQUIRED = {
    "blimp": ("sentence_good", "sentence_bad"),
    "supplement": ("sentence_good", "sentence_bad"),
    "ewok:targets": ("Context1", "Target1", "Target2"),
    "ewok:contexts": ("Context1", "Context2", "Target1"),
}


def _decode_file(kind: str, stem: str, text: str, where: str, limit: int | None,
                 ewok_pairing: str = EWOK_PAIRINGS[0]) -> list[MinimalPair]:
    required = _REQUIRED[f"ewok:{ewok_pairing}" if kind == "ewok" else kind]
    pairs: list[MinimalPair] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if limit is not None and len(pairs) >= limit:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DwmlError(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
        missing = [k for k in required if not isinstance(row.get(k), str)]
        if missing:
            raise DwmlError(f"{where}:{lineno}: missing or non-string field(s) {missing}")
        pairs.append(_decode_row(kind, stem, row, ewok_pairing))
    if not pairs:
        raise DwmlError(f"{where}: no pairs")
    return pairs


def _decode_row(kind: str, stem: str, row: dict, ewok_pairing: str) -> MinimalPair:
    if kind == "blimp":
        field = str(row.get("field", "unknown"))
        # One paradigm spells it "syntax/semantics", the others "syntax_semantics"; BabyLM merges them the same way.
        return MinimalPair(row["sentence_good"], row["sentence_bad"], group=str(row.get("UID", stem)),
                           field="syntax/semantics" if field == "syntax_semantics" else field)
    if kind == "supplement":
        return MinimalPair(row["sentence_good"], row["sentence_bad"], group=stem, field="supplement")
    group = str(row.get("Domain", stem))
    if ewok_pairing == "targets":  # BabyLM: the matching (good) and the mismatching (bad) target after Context1
        return MinimalPair(row["Target1"], row["Target2"], group=group, field="ewok",
                           good_prefix=row["Context1"], bad_prefix=row["Context1"])
    # contexts: the same target after the matching (good) and the mismatching (bad) context
    return MinimalPair(row["Target1"], row["Target1"], group=group, field="ewok",
                       good_prefix=row["Context1"], bad_prefix=row["Context2"])
