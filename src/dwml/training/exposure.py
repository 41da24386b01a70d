"""BabyLM's exposure rules: words seen per optimizer step, the track's budget, and the milestone checkpoints.

BabyLM 2025/2026 (findings paper, section 2; babylm.github.io): in the strict-small track a model may see at most
100M words, counting repeated passes, over at most 10 epochs of its training data (strict: 1B words); the data of an
ancillary model - a KD teacher - counts too. Submissions publish checkpoints after 1M, 2M, ..., 10M words seen and
then 20M, ..., 100M (strict: on to 1B) as Hugging Face revisions `chck_1M` ... `chck_100M`, which the evaluation
pipeline's `eval_zero_shot_fast_all_revisions.sh` and `collate_preds.py` loop over.

Words seen are whitespace words (`dwml.data.words`) of the sequences the training stream has delivered to all ranks.
The stream is deterministic - epoch e visits the permutation drawn from (seed, e), `dwml.data.masking.epoch_order`,
rank r taking every world_size-th sequence - so the words seen after every optimizer step are known before training:
`Exposure` computes them once, exactly, for every step of the plan. That gives the budget check before any step, and
the step of each milestone (the first optimizer step at which the words seen reach it), so a killed and resumed run
writes every milestone once, at the same step, with the same weights (training resumes bit-exactly).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DwmlError
from ..io import atomic_dir, write_json
from .averaging import all_swapped_in

MILLION = 1_000_000


@dataclass(frozen=True)
class Track:
    max_words: int
    max_epochs: float
    milestones: tuple[int, ...]  # words seen, ascending


_SMALL = tuple(m * MILLION for m in (*range(1, 10), *range(10, 101, 10)))
TRACKS = {
    "strict-small": Track(100 * MILLION, 10, _SMALL),
    "strict": Track(1000 * MILLION, 10, _SMALL + tuple(m * MILLION for m in range(200, 1001, 100))),
}


def milestone_name(words: int) -> str:
    """BabyLM's revision name for a milestone: chck_1M ... chck_100M, chck_1000M."""
    return f"chck_{words // MILLION}M"


class Exposure:
    """Words seen after each optimizer step of a training stream, over all ranks, for steps 0..max_steps.

    `words` holds the whitespace words of every sequence of the stream (`dwml.data.words.sequence_words`); the
    stream's batch c of epoch e is, over all ranks, order[c * B * W : (c + 1) * B * W] of that epoch's order
    (B = sequences per rank and micro-batch, W = world size), and an optimizer step takes `grad_accum` batches.
    """

    def __init__(self, words: np.ndarray, stream, grad_accum: int, max_steps: int, train_words: int):
        from ..data.masking import epoch_order

        self.train_words, self.grad_accum = int(train_words), grad_accum
        per_batch = stream.batch_size * stream.world_size
        visited = stream.per_rank * stream.world_size  # the < world_size leftover sequences are never visited
        n_batches = max_steps * grad_accum
        ends = np.minimum(np.arange(1, stream.batches_per_epoch + 1) * per_batch, visited)
        batch_words = [np.zeros(0, dtype=np.int64)]
        for epoch in range(-(-n_batches // stream.batches_per_epoch)):  # the epochs the plan reaches
            order = epoch_order(stream.seed, epoch, stream.n_sequences)[:visited]
            cum = np.concatenate([[0], np.cumsum(words[order], dtype=np.int64)])
            batch_words.append(np.diff(np.concatenate([[0], cum[ends]])))
        flat = np.concatenate(batch_words)[:n_batches]
        self.cum_batches = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
        self.max_steps = max_steps

    def words_after(self, step: int) -> int:
        """Whitespace words delivered to all ranks by the first `step` optimizer steps."""
        return int(self.cum_batches[min(step, self.max_steps) * self.grad_accum])

    def epochs_after(self, step: int) -> float:
        return self.words_after(step) / self.train_words if self.train_words else float("nan")

    def milestones(self, track: Track) -> dict[int, list[str]]:
        """{step: [milestone names]}: every milestone the plan reaches, at the first optimizer step whose words seen
        reach it (a step that passes two milestones, e.g. with large batches, takes both)."""
        per_step = self.cum_batches[:: self.grad_accum]
        out: dict[int, list[str]] = {}
        for m in track.milestones:
            step = int(np.searchsorted(per_step, m, side="left"))
            if 1 <= step <= self.max_steps:
                out.setdefault(step, []).append(milestone_name(m))
        return out


def stream_exposure(stream, prepared: Path, vocab_size: int, grad_accum: int, max_steps: int) -> Exposure:
    """The `Exposure` of a stream over `prepared`'s packed train split, with the prepared tokenizer's word starts;
    the words of all its sequences are the train split's words."""
    from ..data.words import sequence_words, word_start_table

    table = word_start_table(Path(prepared) / "tokenizer" / "tokenizer.json", vocab_size)
    words = sequence_words(stream.sequences, table)
    return Exposure(words, stream, grad_accum, max_steps, int(words.sum()))


def teacher_words(cfg, teacher_folder: Path | None) -> int:
    """The words a KD teacher was trained on: `distill.teacher_words`, else its dwml run's summary."""
    if teacher_folder is None:
        return 0
    if cfg.distill.teacher_words >= 0:
        return cfg.distill.teacher_words
    summary = teacher_folder.parent / "summary.json"
    try:
        words = json.loads(summary.read_text(encoding="utf-8"))["exposure"]["words_seen"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DwmlError(f"distill.teacher: {teacher_folder} records no words seen (not a run of this dwml); a "
                        f"teacher's training data counts toward the BabyLM budget: set distill.teacher_words") from None
    return int(words)


def check_budget(track_name: str, exposure: Exposure, max_steps: int, teacher: int) -> None:
    """Before training: the plan's words (its teacher's included) and epochs stay within the track, or one line with
    the numbers."""
    track = TRACKS.get(track_name)
    if track is None:
        return
    words, epochs = exposure.words_after(max_steps), exposure.epochs_after(max_steps)
    total = words + teacher
    if epochs > track.max_epochs or total > track.max_words:
        with_teacher = f" + the teacher's {teacher:,} = {total:,}" if teacher else ""
        raise DwmlError(f"train.babylm_track {track_name}: {max_steps:,} steps see {words:,} words{with_teacher} "
                        f"({epochs:.2f} epochs of {exposure.train_words:,} train words); the track allows "
                        f"{track.max_words:,} words and {track.max_epochs:g} epochs: lower train.max_steps")


@dataclass
class ExposurePlan:
    """A run's exposure: words per step, its teacher's words (None: unknown, only without a track) and the
    milestone steps of its track."""

    track: str
    exposure: Exposure
    teacher_words: int | None
    milestones: dict[int, list[str]]

    def record(self, step: int) -> dict:
        """The metrics.jsonl fields of a step."""
        return {"words_seen": self.exposure.words_after(step), "epochs": round(self.exposure.epochs_after(step), 4)}

    def summary(self, step: int) -> dict:
        """The `exposure` record of final/summary.json, the experiment report and the model card."""
        words = self.exposure.words_after(step)
        total = None if self.teacher_words is None else words + self.teacher_words
        return {"track": self.track, **self.record(step), "train_words": self.exposure.train_words,
                "teacher_words": self.teacher_words, "total_words": total,
                "milestones": {n: s for s, names in self.milestones.items() for n in names if s <= step}}

    def write(self, step: int, run_dir: Path, students, tokenizer_dir: Path, averages=(), line_ends=False) -> None:
        """The milestones due after `step`, of the averaged weights when the run averages (train.ema_decay)."""
        names = self.milestones.get(step, ())
        if names:
            with all_swapped_in(averages):
                for name in names:
                    write_milestone(run_dir, name, step, self.exposure.words_after(step), students, tokenizer_dir,
                                    line_ends)


def write_milestone(run_dir: Path, name: str, step: int, words: int, students, tokenizer_dir: Path,
                    line_ends: bool = False) -> Path | None:
    """RUN/chck/<name>/ (one student) or RUN/chck/<name>/peer{i}/: Hugging Face folders in `dwml export`'s format
    (the tokenizer as `final/` has it: `line_ends`) with milestone.json (step, exact words seen). A folder already
    there is the same milestone of this run written before a kill (the resumed steps are bit-exact): it is kept, so
    each milestone is written once."""
    from transformers.utils import logging as hf_logging

    from ..data.tokenizer import copy_tokenizer

    target = Path(run_dir) / "chck" / name
    if (target / "milestone.json").is_file():
        return None
    hf_logging.disable_progress_bar()
    with atomic_dir(target) as tmp:
        for i, s in enumerate(students):
            folder = tmp if len(students) == 1 else tmp / f"peer{i}"
            s.mlm.save_pretrained(folder)
            copy_tokenizer(tokenizer_dir, folder, line_ends=line_ends)
        write_json(tmp / "milestone.json", {"revision": name, "step": step, "words_seen": words,
                                            "students": len(students)})
    return target
