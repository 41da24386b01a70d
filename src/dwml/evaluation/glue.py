"""The BabyLM (Super)GLUE tasks for `dwml finetune`: task specs, reading and carving the data, metrics, the config.

Inputs follow the BabyLM pipeline's templates: a single sentence (cola, sst2) or a sentence pair (RoBERTa encodes
it as `<s> A </s></s> B </s>`); MultiRC pairs "Question: q Answer: a" with the paragraph and WSC pairs
'Does "span2" refer to "span1" in this passage?' with the text.

Four train files are missing from the data at hand (boolq, multirc, qnli, sst2). For those a stratified, seeded part
of the valid file is carved off for training and the rest is evaluated (rows sharing a paragraph, passage or question
stay on one side); every result says so, because such scores are not comparable with published ones. The carving
seed is separate from the training seed so that every model (and every peer of a run) is scored on the same
held-out examples.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import DwmlError, require
from ..training import runtime

# The repository's data lives next to it: <repo>/../shared/data (see ../shared/data/README.md).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "eval" / "glue_filtered"


# --------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class TaskSpec:
    """How one glue_filtered task is read, encoded and scored."""

    name: str
    num_labels: int
    first: tuple[str, ...]  # fields forming text A
    second: str | None = None  # field forming text B (None: single-sentence task)
    template: str | None = None  # how the `first` fields are combined (None: the single field as is)
    metrics: tuple[str, ...] = ("accuracy",)
    primary: str = "accuracy"  # the score BabyLM reports for the task
    epoch_factor: int = 1  # BabyLM trains WSC (554 examples) for 3x the epochs of the other tasks
    # When a train split is carved from valid, examples sharing this field stay on one side: MultiRC has ~29
    # question/answer rows per paragraph (83 paragraphs in 2,424 rows), so a row-level split would train on the
    # very paragraphs (and questions) it then scores.
    group_by: str | None = None


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("cola", 2, ("sentence",), metrics=("accuracy", "mcc"), primary="mcc"),
        TaskSpec("sst2", 2, ("sentence",)),
        TaskSpec("mrpc", 2, ("sentence1",), "sentence2", metrics=("accuracy", "f1"), primary="f1"),
        TaskSpec("qqp", 2, ("question1",), "question2", metrics=("accuracy", "f1"), primary="f1"),
        TaskSpec("mnli", 3, ("premise",), "hypothesis"),
        TaskSpec("qnli", 2, ("question",), "sentence", group_by="question"),
        TaskSpec("rte", 2, ("sentence1",), "sentence2"),
        TaskSpec("boolq", 2, ("question",), "passage", group_by="passage"),
        TaskSpec("multirc", 2, ("question", "answer"), "paragraph", template="Question: {} Answer: {}",
                 group_by="paragraph"),
        TaskSpec("wsc", 2, ("span2_text", "span1_text"), "text",
                 template='Does "{}" refer to "{}" in this passage?', epoch_factor=3),
    )
}


DEFAULT_TASKS = tuple(TASKS)


# The MNLI model is also scored on the mismatched-genre valid file, reported as its own row (as BabyLM does).
MNLI_MM = "mnli-mm"


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: int
    group: str | None = field(default=None, compare=False, repr=False)  # TaskSpec.group_by value, for carving


@dataclass
class TaskData:
    task: str
    train: list[Example]
    eval: list[Example]
    train_source: str
    eval_source: str
    carved: bool  # train split carved from the valid file (no train file)
    note: str = ""
    extra_evals: dict[str, tuple[list[Example], str]] = field(default_factory=dict)  # name -> (examples, source)


@dataclass
class FinetuneConfig:
    """Fine-tuning hyperparameters. Defaults follow BabyLM's pipeline (lr 3e-5, batch 32, 10 epochs, WSC x3);
    for CPU runs lower `epochs` and set `max_train_examples` / `max_eval_examples`."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    data_dir: str = ""  # "" = <repo>/../shared/data/eval/glue_filtered
    epochs: int = 10
    lr: float = 3e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128  # tokens incl. specials; capped by the model's position embeddings
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 42  # classifier-head init, shuffling, dropout
    carve_fraction: float = 0.5  # share of a valid file carved off for training where the train file is missing
    carve_seed: int = 0  # fixed across models so every model is scored on the same held-out examples
    max_train_examples: int = 0  # 0 = all; otherwise a seeded random subset (quick runs)
    max_eval_examples: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    progress: bool = True  # one line per epoch on stderr

    def validate(self) -> "FinetuneConfig":
        require(len(self.tasks) > 0, "finetune.tasks: expected at least one task")
        for t in self.tasks:
            if t == MNLI_MM:
                raise DwmlError(f"finetune.tasks: {MNLI_MM!r} is reported automatically with 'mnli'; ask for 'mnli'")
            require(t in TASKS, f"finetune.tasks: unknown task {t!r}; expected some of {list(TASKS)}")
        require(len(set(self.tasks)) == len(self.tasks), f"finetune.tasks: duplicate task in {self.tasks}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"finetune.{name}: expected an integer >= 1, got {value!r}")
        require(self.max_length >= 8, f"finetune.max_length: expected >= 8, got {self.max_length}")
        require(self.lr > 0, f"finetune.lr: expected > 0, got {self.lr}")
        require(0.0 <= self.warmup_ratio < 1.0, f"finetune.warmup_ratio: expected [0, 1), got {self.warmup_ratio}")
        require(self.weight_decay >= 0, f"finetune.weight_decay: expected >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"finetune.grad_clip: expected >= 0 (0 = off), got {self.grad_clip}")
        require(0.0 < self.carve_fraction < 1.0,
                f"finetune.carve_fraction: expected a value in (0, 1), got {self.carve_fraction}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"finetune.{name}: expected an integer >= 0, got {value!r}")
        resolve_device(self.device)
        return self


def resolve_device(name: str) -> torch.device:
    return runtime.resolve_device(name, field="finetune.device")


# --------------------------------------------------------------------------------------------------------------
# Data


def _label(value: Any, spec: TaskSpec, where: str) -> int:
    # JSON labels are ints here; accept booleans and digit strings too (other (Super)GLUE exports use them).
    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < spec.num_labels:
        raise DwmlError(f"{where}: field 'label': expected an integer in [0, {spec.num_labels}), got {value!r}")
    return value


def read_examples(path: Path, spec: TaskSpec) -> list[Example]:
    """Read one glue_filtered jsonl file into (text A, text B, label) examples, checking every field."""
    if not path.is_file():
        raise DwmlError(f"{path}: file not found (task {spec.name})")
    fields = tuple(dict.fromkeys(spec.first + tuple(f for f in (spec.second, spec.group_by) if f)))
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DwmlError(f"{where}: invalid JSON ({e.msg})") from None
            require(isinstance(row, dict), f"{where}: expected a JSON object per line")
            for key in fields + ("label",):
                require(key in row,
                        f"{where}: missing field {key!r} (task {spec.name} needs {list(fields)} and 'label')")
            for key in fields:
                require(isinstance(row[key], str), f"{where}: field {key!r}: expected a string, got {row[key]!r}")
            parts = [row[k] for k in spec.first]
            text_a = spec.template.format(*parts) if spec.template else " ".join(parts)
            text_b = row[spec.second] if spec.second else None
            group = row[spec.group_by] if spec.group_by else None
            examples.append(Example(text_a, text_b, _label(row["label"], spec, where), group))
    require(len(examples) > 0, f"{path}: no examples (empty file)")
    return examples


def carve_split(
    labels: Sequence[int], fraction: float, seed: int, groups: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices into (train, eval), about `fraction` to train, stratified by label.

    Without `groups` every example is its own group and exactly round(fraction * n_c) examples of each class c go
    to train. With `groups`, examples sharing a group go to the same side; each group is stratified under its
    majority label, and groups (in seeded random order) join train while that brings the stratum's train count
    closer to round(fraction * n_stratum). Returns sorted index arrays.
    """
    labels = np.asarray(labels)
    keys = list(range(len(labels))) if groups is None else list(groups)
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(keys):
        members.setdefault(g, []).append(i)
    strata: dict[int, list[list[int]]] = {}
    for idx in members.values():  # insertion order = first appearance in the file: deterministic
        counts = np.bincount(labels[idx])
        strata.setdefault(int(counts.argmax()), []).append(idx)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    for label in sorted(strata):
        stratum = strata[label]
        target = round(fraction * sum(len(idx) for idx in stratum))
        taken = 0
        for k in rng.permutation(len(stratum)):
            idx = stratum[k]
            if abs(taken + len(idx) - target) < abs(taken - target):
                train.extend(idx)
                taken += len(idx)
    train_idx = np.sort(np.asarray(train, dtype=np.int64))
    eval_idx = np.setdiff1d(np.arange(len(labels)), train_idx)
    return train_idx, eval_idx


def subsample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded random subset of `n` examples in file order (all of them if n is 0 or >= len)."""
    if n <= 0 or n >= len(examples):
        return examples
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in idx]


def load_task(task: str, cfg: FinetuneConfig) -> TaskData:
    """Train and eval examples of one task, carving a train split from valid where the train file is missing."""
    require(task in TASKS, f"finetune: unknown task {task!r}; expected some of {list(TASKS)}")
    spec = TASKS[task]
    data_dir = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
    require(data_dir.is_dir(), f"{data_dir}: glue_filtered data directory not found (set --data-dir)")
    train_path, valid_path = data_dir / f"{task}.train.jsonl", data_dir / f"{task}.valid.jsonl"
    valid = read_examples(valid_path, spec)
    if train_path.is_file():
        train, evals = read_examples(train_path, spec), valid
        carved, note = False, ""
        train_source, eval_source = train_path.name, valid_path.name
    else:
        groups = [e.group for e in valid] if spec.group_by else None
        train_idx, eval_idx = carve_split([e.label for e in valid], cfg.carve_fraction, cfg.carve_seed, groups)
        require(len(train_idx) > 0 and len(eval_idx) > 0,
                f"{valid_path}: too few examples ({len(valid)}) to carve train and eval splits")
        train, evals = [valid[i] for i in train_idx], [valid[i] for i in eval_idx]
        carved = True
        pct = round(100 * cfg.carve_fraction)
        how = f"grouped by {spec.group_by}, stratified" if spec.group_by else "stratified"
        note = (f"train carved from valid ({pct}% of {valid_path.name}, {how}, seed {cfg.carve_seed}; "
                f"no {train_path.name})")
        train_source = f"{valid_path.name} [carved {pct}%]"
        eval_source = f"{valid_path.name} [remaining {100 - pct}%]"
    data = TaskData(
        task=task,
        train=subsample(train, cfg.max_train_examples, cfg.seed),
        # The eval subset uses the carving seed so that it does not change with the training seed.
        eval=subsample(evals, cfg.max_eval_examples, cfg.carve_seed),
        train_source=train_source,
        eval_source=eval_source,
        carved=carved,
        note=note,
    )
    mm_path = data_dir / f"{MNLI_MM}.valid.jsonl"
    if task == "mnli" and mm_path.is_file():
        data.extra_evals[MNLI_MM] = (subsample(read_examples(mm_path, spec), cfg.max_eval_examples, cfg.carve_seed),
                                     mm_path.name)
    return data


# --------------------------------------------------------------------------------------------------------------
# Metrics (plain numpy; the predictions are class ids)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def binary_f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class: 2TP / (2TP + FP + FN); 0 when there are no positives at all (sklearn's value)."""
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multiclass form of Gorodkin 2004; binary MCC for two classes).

    With confusion counts C, t_k = true count of class k, p_k = predicted count, c = correct, s = total:
    MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), defined as 0 when a factor is 0 (constant predictions/labels).
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    t = np.array([(labels == k).sum() for k in classes], dtype=np.float64)
    p = np.array([(preds == k).sum() for k in classes], dtype=np.float64)
    c, s = float((preds == labels).sum()), float(len(labels))
    denom = (s * s - p @ p) * (s * s - t @ t)
    return float((c * s - t @ p) / math.sqrt(denom)) if denom > 0 else 0.0


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "mcc": matthews_corrcoef,
}


def compute_metrics(names: Sequence[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {name: METRICS[name](preds, labels) for name in names}
