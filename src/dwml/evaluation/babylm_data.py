"""The rest of BabyLM 2025's zero-shot suite as data: entity tracking, the two WUG tests and the reading-time words;
and what each task's score is (`metric_of`, `score_columns`, `task_scores`).

Read as babylm/evaluation-pipeline-2025 reads them (`sentence_zero_shot/read_files.py: decode_entity_tracking,
decode_wug`; `reading/run.py`, read at bf55c11):
- entity tracking (`*.jsonl`): text = `input_prefix + option` (no separator), `options[0]` is right; the group is
  `<file stem>_<numops>_ops`.
- WUG (`*.jsonl`): `sentences` holds the candidate sentences separated by tabs, `ratio` the share of human answers for
  the first one.
- reading (`reading_data.csv`): one row per word with its left context `item`, the word, the previous word and its
  context, and the regressors and reading measures. The pipeline reads it with pandas, so pandas' default missing
  values ("", "NA", "None", "nan", ...) are missing here too: a missing `item` becomes the text "None" (the one
  sentence-initial word whose context is the word "None" was written out as an empty cell), a missing `prev_item`
  means the word has no previous-word surprisal, a missing number is NaN (the row drops out of the regressions that
  need it).

Scores (see `dwml.evaluation.babylm_tasks`): entity tracking is an accuracy (%), WUG a Spearman rho (reported x100,
as BabyLM's results tables do), reading two gains in R^2 (% of the largest possible gain): eye tracking and self-paced
reading. Only accuracies enter the mean zero-shot accuracy of tables.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import DwmlError
from .evaldata import TASK_ALIASES, TASKS, default_data_dir

BABYLM_KINDS = ("entity_tracking", "wug", "reading")
# Score columns whose number is not an accuracy (every other column, and every other task, is an accuracy in %).
METRICS = {"wug_adj": "spearman_rho", "wug_past": "spearman_rho", "reading": "r2_gain",
           "reading_eye_tracking": "r2_gain", "reading_self_paced": "r2_gain"}
READING_COLUMNS = ("reading_eye_tracking", "reading_self_paced")
EYE_TRACKING = ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")
SELF_PACED = "self_paced_reading_time"
REGRESSORS = ("Subtlex_log10", "length", "context_length", "prev_length")
READING_FILE = "reading_data.csv"
# pandas' default missing-value strings (pandas 2.x, the pipeline's 2.2.3).
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


@dataclass(frozen=True)
class EntityItem:
    prefix: str
    options: tuple[str, ...]  # options[0] is the right one
    file: str
    numops: int

    @property
    def group(self) -> str:
        return f"{self.file}_{self.numops}_ops"


@dataclass(frozen=True)
class WugItem:
    candidates: tuple[str, ...]
    ratio: float  # share of human answers for candidates[0]


@dataclass(frozen=True)
class ReadingWord:
    context: str
    word: str
    prev_context: str | None  # None: no previous word (its surprisal is missing)
    prev_word: str | None
    values: Mapping[str, float]  # REGRESSORS + reading measures; NaN where missing


# ---------------------------------------------------------------------------------------------- scores and columns


def is_babylm_task(name: str) -> bool:
    spec = TASKS.get(TASK_ALIASES.get(name, name))
    return spec is not None and spec.kind in BABYLM_KINDS


def metric_of(name: str) -> str:
    """'accuracy', 'spearman_rho' or 'r2_gain': what a task's (or a score column's) number is."""
    return METRICS.get(name, "accuracy")


def score_columns(tasks: Iterable[str]) -> list[str]:
    """The summary columns of `tasks`: one per task, two for reading (eye tracking, self-paced reading)."""
    return [c for t in tasks for c in (READING_COLUMNS if t == "reading" else (t,))]


def task_scores(task: str, result: Mapping) -> dict[str, float | None]:
    """{column: headline number} of one task's result: `scores` (reading), `score` (WUG) or the macro accuracy."""
    if "scores" in result:
        return dict(result["scores"])
    if "score" in result:
        return {task: result["score"]}
    return {task: result["macro_accuracy"]}


# ---------------------------------------------------------------------------------------------- loading


def load_babylm_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list:
    """The items of one task: entity tracking and WUG files in sorted order, `limit` = the first N items of every file.
    Reading ignores `limit`: its regressions need the words of all 205 sentences (1,726 words cost about as much to
    score as a dozen entity-tracking items)."""
    spec = TASKS.get(TASK_ALIASES.get(name, name))
    if spec is None or spec.kind not in BABYLM_KINDS:
        raise DwmlError(f"{name!r} is not one of the tasks {sorted(t for t in TASKS if is_babylm_task(t))}")
    if limit is not None and limit < 1:
        raise DwmlError(f"--limit: expected a positive number of items per file, got {limit}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = next((root / d for d in spec.dirs if (root / d).is_dir()), None)
    if folder is None:
        tried = ", ".join(str(root / d) for d in spec.dirs)
        raise DwmlError(f"task {spec.name}: no data folder found (tried {tried}); pass --data-dir")
    if spec.kind == "reading":
        return read_reading(folder / READING_FILE)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jsonl" and p.is_file())
    if not files:
        raise DwmlError(f"{folder}: no *.jsonl files")
    decode = _entity_item if spec.kind == "entity_tracking" else _wug_item
    items = []
    for path in files:
        rows = _jsonl_rows(path, limit)
        items += [decode(row, path.stem, f"{path}:{lineno}") for lineno, row in rows]
    return items


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DwmlError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DwmlError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None


def _jsonl_rows(path: Path, limit: int | None) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DwmlError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DwmlError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, row))
    if not rows:
        raise DwmlError(f"{path}: no items")
    return rows


def _entity_item(row: dict, stem: str, where: str) -> EntityItem:
    prefix, options, numops = row.get("input_prefix"), row.get("options"), row.get("numops")
    if not isinstance(prefix, str):
        raise DwmlError(f"{where}: field 'input_prefix': expected a string")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise DwmlError(f"{where}: field 'options': expected a list of at least 2 strings")
    if not isinstance(numops, int) or isinstance(numops, bool) or numops < 0:
        raise DwmlError(f"{where}: field 'numops': expected a non-negative integer, got {numops!r}")
    return EntityItem(prefix, tuple(options), stem, numops)


def _wug_item(row: dict, stem: str, where: str) -> WugItem:
    sentences, ratio = row.get("sentences"), row.get("ratio")
    if not isinstance(sentences, str) or len(sentences.split("\t")) < 2:
        raise DwmlError(f"{where}: field 'sentences': expected at least 2 tab-separated sentences")
    try:  # the pipeline takes float(ratio): a number or a numeric string
        value = float(ratio) if not isinstance(ratio, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise DwmlError(f"{where}: field 'ratio': expected a finite number, got {ratio!r}")
    return WugItem(tuple(sentences.split("\t")), value)


def read_reading(path: Path, limit: int | None = None) -> list[ReadingWord]:
    """The words of `reading_data.csv` (see the module docstring for the missing-value rules)."""
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    needed = ("item", "word", "prev_item", "prev_word") + REGRESSORS + EYE_TRACKING + (SELF_PACED,)
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise DwmlError(f"{path}: missing column(s) {missing}")
    words: list[ReadingWord] = []
    try:
        for row in reader:
            if limit is not None and len(words) >= limit:
                break
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise DwmlError(f"{where}: expected {len(reader.fieldnames)} fields")
            values = {c: _number(row[c], f"{where}: field {c!r}") for c in REGRESSORS + EYE_TRACKING + (SELF_PACED,)}
            word = _text(row["word"])
            if word is None:
                raise DwmlError(f"{where}: field 'word': empty")
            prev_context = _text(row["prev_item"])
            prev_word = _text(row["prev_word"]) if prev_context is not None else None
            if prev_context is not None and prev_word is None:
                raise DwmlError(f"{where}: field 'prev_word': empty while 'prev_item' is given")
            words.append(ReadingWord(_text(row["item"]) or "None", word, prev_context, prev_word, values))
    except csv.Error as e:
        raise DwmlError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if not words:
        raise DwmlError(f"{path}: no words")
    return words


def _text(cell: str) -> str | None:
    return None if cell in NA_STRINGS else cell


def _number(cell: str, where: str) -> float:
    if cell in NA_STRINGS:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise DwmlError(f"{where}: expected a number, got {cell!r}") from None
    if not math.isfinite(value):
        raise DwmlError(f"{where}: expected a finite number, got {cell!r}")
    return value
