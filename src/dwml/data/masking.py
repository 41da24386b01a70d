"""Batching and dynamic masked-language-model corruption (BERT/RoBERTa 80/10/10 scheme, or any other split).

`BatchStream` turns a sequence dataset (e.g. `dwml.data.shards.PackedSequences`) into an endless, deterministic stream of
`MaskedBatch`es: one seeded permutation per epoch, split across DDP ranks, and counter-based masking noise that
depends on (seed, epoch, sequence index, position) alone. The stream's whole state is therefore (epoch, cursor): a
run resumed from `state_dict()` sees bit-identical batches to one that never stopped. A batch is built with whole-batch
array operations (no per-sequence Python), and `Prefetcher` builds the next ones in a background thread.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..config import check_replace
from ..errors import DwmlError
from .tokenizer import MASK_ID, N_SPECIAL, PAD_ID

# What becomes of a token selected for prediction: (share replaced by <mask>, share replaced by a random token); the
# rest stays as it is. BERT's 80/10/10. BabyBERTa (Huebner et al. 2021) found that never leaving the token visible
# ((1.0, 0.0): no "unmasking") helped small models' grammar on child-directed speech.
BERT_REPLACE = (0.8, 0.1)


@dataclass
class MaskedBatch:
    """input_ids/attention_mask (B, T) long; positions (N,) ascending flat indices into B*T of the masked tokens;
    labels (N,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskedBatch":
        return MaskedBatch(*(t.to(device, non_blocking=non_blocking) for t in
                             (self.input_ids, self.attention_mask, self.positions, self.labels)))

    def pin_memory(self) -> "MaskedBatch":
        """Page-locked copies, so `.to(cuda, non_blocking=True)` is an asynchronous copy."""
        return MaskedBatch(*(t.pin_memory() for t in
                             (self.input_ids, self.attention_mask, self.positions, self.labels)))

    def head(self, rows: int) -> "MaskedBatch":
        """The first `rows` sequences with their masked positions (flat indices stay valid: rows come first). These
        are the batch's first `head(rows).labels.numel()` positions, so `x[:n]` restricts a per-position tensor of the
        batch (e.g. logits at its masked positions) to the head."""
        if rows >= self.input_ids.shape[0]:
            return self
        keep = self.positions < rows * self.input_ids.shape[1]
        return MaskedBatch(self.input_ids[:rows], self.attention_mask[:rows], self.positions[keep], self.labels[keep])

    @property
    def n_tokens(self) -> int:
        """Non-pad tokens in the batch."""
        return int(self.attention_mask.sum())


def collate(
    seqs: Sequence[np.ndarray | Sequence[int] | torch.Tensor], pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences to the longest one: (input_ids, attention_mask), both (B, T) long."""
    if len(seqs) == 0:
        raise ValueError("collate: empty batch")
    lengths = [len(s) for s in seqs]
    input_ids = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), max(lengths)), dtype=torch.long)
    for row, (s, n) in enumerate(zip(seqs, lengths)):
        input_ids[row, :n] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        attention_mask[row, :n] = 1
    return input_ids, attention_mask


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    generator: torch.Generator,
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_id: int = MASK_ID,
    n_special: int = N_SPECIAL,
    replace: tuple[float, float] = BERT_REPLACE,
) -> MaskedBatch:
    """Select each real (non-special, non-pad) token with probability mask_prob; of those, a share replace[0]
    (BERT: 80%) become <mask>, replace[1] (10%) a random non-special token, the rest stay. At least one token per
    batch is selected. Inputs are not modified.

    The noise comes from `generator`, drawn for the full (B, T) grid so it advances by the same amount for any
    content. (`BatchStream` uses counter-based noise instead: see `sequence_noise`.)"""
    _check_mask_args(mask_prob, vocab_size, n_special)
    shape = input_ids.shape
    select_u, action_u, fallback_u = (torch.rand(shape, generator=generator, dtype=torch.float64).numpy()
                                      for _ in range(3))
    random_ids = torch.randint(n_special, vocab_size, shape, generator=generator).numpy()
    return _corrupt(
        input_ids.numpy(), attention_mask.numpy(), select_u, action_u,
        random_at=lambda flat: random_ids.reshape(-1)[flat], fallback=lambda: fallback_u,
        mask_prob=mask_prob, mask_id=mask_id, n_special=n_special, replace=replace,
    )


def _check_mask_args(mask_prob: float, vocab_size: int, n_special: int,
                     replace: tuple[float, float] = BERT_REPLACE) -> None:
    if not 0.0 < mask_prob < 1.0:
        raise DwmlError(f"mask_prob: expected a number in (0, 1), got {mask_prob!r}")
    check_replace(*replace)
    if vocab_size <= n_special:
        raise DwmlError(f"vocab_size: expected more than {n_special} (the special tokens), got {vocab_size}")


def _corrupt(input_ids: np.ndarray, attention_mask: np.ndarray, select_u: np.ndarray, action_u: np.ndarray, *,
             random_at, fallback, mask_prob: float, mask_id: int, n_special: int,
             replace: tuple[float, float] = BERT_REPLACE) -> MaskedBatch:
    """The corruption given the noise (a selected token becomes <mask> where its action uniform < replace[0],
    a random token below replace[0] + replace[1], else stays): uniforms for selection and action over the (B, T) grid,
    `random_at(flat_positions)` -> replacement ids there, `fallback()` -> a (B, T) grid of uniforms used only when
    nothing was selected (the replacement ids and fallback are computed only where and when needed)."""
    candidates = (attention_mask != 0) & (input_ids >= n_special)
    selected = candidates & (select_u < mask_prob)
    if not selected.any():
        if not candidates.any():
            raise DwmlError("mask_tokens: the batch has no maskable tokens (only special/pad tokens)")
        # Guarantee a loss term: select the candidate with the largest independent uniform draw.
        selected = np.zeros(candidates.size, dtype=bool)
        selected[np.where(candidates, fallback(), -1.0).argmax()] = True
        selected = selected.reshape(candidates.shape)
    positions = np.flatnonzero(selected)
    labels = input_ids.reshape(-1)[positions]
    action = action_u.reshape(-1)[positions]
    values = labels.copy()
    mask_below, random_below = replace[0], replace[0] + replace[1]
    values[action < mask_below] = mask_id
    randomised = (action >= mask_below) & (action < random_below)
    values[randomised] = random_at(positions[randomised])
    corrupted = input_ids.copy()
    corrupted.reshape(-1)[positions] = values
    return MaskedBatch(torch.from_numpy(corrupted), torch.from_numpy(attention_mask.astype(np.int64)),
                       torch.from_numpy(positions.astype(np.int64)), torch.from_numpy(labels.astype(np.int64)))


# SplitMix64 (Steele et al. 2014): the k-th output of the stream with state `key` is mix(key + k * GAMMA). Counting k
# over (sequence index, position) gives every token its own noise in closed form, for a whole batch at once.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_U32 = 2.0**-32


def _splitmix(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64 by design
        z = key + counters * _GAMMA
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return z


def _stream_keys(seed: int, epoch: int) -> np.ndarray:
    """Three 64-bit keys (selection+action, replacement ids, fallback) that depend only on (seed, epoch)."""
    return np.random.SeedSequence([seed, epoch, 0x6D61736B]).generate_state(3, dtype=np.uint64)


def sequence_noise(seed: int, epoch: int, indices: np.ndarray, width: int, vocab_size: int, n_special: int):
    """Counter-based masking noise of sequences `indices` (one row each, `width` positions) in `epoch`.

    Token (i, t) draws from SplitMix64 at counter (i << 32 | t) of keys from (seed, epoch): its noise depends on
    (seed, epoch, sequence index, position) alone, so a sequence is masked the same way in any batch, batch size,
    padded length or DDP rank, and a whole batch costs a few array operations. Returns (select_u, action_u,
    random_at, fallback) for `_corrupt`: 32-bit uniforms from the high and low halves of one draw, and closures
    that draw replacement ids (multiply-shift of 32 random bits onto [n_special, vocab_size)) and fallback
    uniforms only where needed.
    """
    keys = _stream_keys(seed, epoch)
    counters = (np.asarray(indices, dtype=np.uint64)[:, None] << np.uint64(32)) | np.arange(width, dtype=np.uint64)
    draw = _splitmix(keys[0], counters)
    select_u = (draw >> np.uint64(32)).astype(np.float64) * _U32
    action_u = (draw & np.uint64(0xFFFFFFFF)).astype(np.float64) * _U32
    span = np.uint64(vocab_size - n_special)

    def random_at(flat: np.ndarray) -> np.ndarray:
        bits = _splitmix(keys[1], counters.reshape(-1)[flat]) >> np.uint64(32)
        return n_special + ((bits * span) >> np.uint64(32)).astype(np.int64)

    def fallback() -> np.ndarray:
        return (_splitmix(keys[2], counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    return select_u, action_u, random_at, fallback


def epoch_order(seed: int, epoch: int, n_sequences: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the sequences, over all ranks (rank r takes every world_size-th)."""
    return np.random.default_rng([seed, epoch]).permutation(n_sequences)


class BatchStream:
    """Endless deterministic stream of masked batches over `sequences` (anything with len() and [i] -> ids).

    Epoch e visits a permutation drawn from (seed, e); rank r of world_size takes every world_size-th entry of it,
    so ranks see disjoint sequences and the same number of batches (the < world_size leftover sequences of an epoch
    are skipped). With drop_last=False the last batch of an epoch may be smaller.
    """

    def __init__(
        self,
        sequences: Any,
        batch_size: int,
        *,
        seed: int,
        vocab_size: int,
        rank: int = 0,
        world_size: int = 1,
        mask_prob: float = 0.15,
        mask_prob_end: float = 0.0,
        schedule_batches: int = 0,
        replace: tuple[float, float] = BERT_REPLACE,
        drop_last: bool = True,
        pad_id: int = PAD_ID,
        mask_id: int = MASK_ID,
        n_special: int = N_SPECIAL,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DwmlError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise DwmlError(f"rank/world_size: expected 0 <= rank < world_size, got {rank}/{world_size}")
        _check_mask_args(mask_prob, vocab_size, n_special, replace)
        self.replace = (float(replace[0]), float(replace[1]))
        if mask_prob_end:
            _check_mask_args(mask_prob_end, vocab_size, n_special)
            if not isinstance(schedule_batches, int) or schedule_batches < 1:
                raise DwmlError(f"schedule_batches: a masking schedule needs its length in batches, got "
                                f"{schedule_batches!r}")
        self.mask_prob_end, self.schedule_batches = mask_prob_end, schedule_batches
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = int(seed)
        self.vocab_size = vocab_size
        self.rank = rank
        self.world_size = world_size
        self.mask_prob = mask_prob
        self.drop_last = drop_last
        self.pad_id, self.mask_id, self.n_special = pad_id, mask_id, n_special
        self.n_sequences = len(sequences)
        self.per_rank = self.n_sequences // world_size
        full, rest = divmod(self.per_rank, batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        if self.batches_per_epoch == 0:
            raise DwmlError(
                f"batch_size: {self.n_sequences} sequences over {world_size} rank(s) cannot fill one batch of "
                f"{batch_size}; use a smaller batch_size or more data"
            )
        self._epoch = 0
        self._cursor = 0
        self._tokens_seen = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    # -- order ------------------------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sequence indices for `epoch`, in visiting order."""
        perm = epoch_order(self.seed, epoch, self.n_sequences)
        return perm[self.rank : self.per_rank * self.world_size : self.world_size]

    def _indices(self, epoch: int, cursor: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_indices(epoch), epoch
        return self._order[cursor * self.batch_size : (cursor + 1) * self.batch_size]

    # -- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> MaskedBatch:
        idx = self._indices(self._epoch, self._cursor)
        input_ids, lengths = self._gather(idx)
        attention_mask = np.arange(input_ids.shape[1]) < lengths[:, None]
        # Noise from (seed, epoch, sequence index, position) alone: dynamic masking (new masks every epoch) that does
        # not depend on the batch size or the DDP world size, so a 2-rank run sees the same masks as one process with
        # the union batch.
        select_u, action_u, random_at, fallback = sequence_noise(
            self.seed, self._epoch, idx, input_ids.shape[1], self.vocab_size, self.n_special)
        batch = _corrupt(input_ids, attention_mask, select_u, action_u, random_at=random_at, fallback=fallback,
                         mask_prob=self.rate(self.step), mask_id=self.mask_id, n_special=self.n_special,
                         replace=self.replace)
        self._tokens_seen += int(lengths.sum())
        self._cursor += 1
        if self._cursor == self.batches_per_epoch:
            self._epoch, self._cursor = self._epoch + 1, 0
        return batch

    def rate(self, batch: int) -> float:
        """Masking rate of this rank's `batch`-th batch: mask_prob, or linear from mask_prob (batch 0) to
        mask_prob_end (batch schedule_batches - 1, and after). A function of the stream's position alone, so a
        resumed run masks exactly as one that never stopped. A token is masked where its uniform < the rate: the
        same noise masks a subset of the earlier positions as the rate falls."""
        if not self.mask_prob_end:
            return self.mask_prob
        frac = min(batch / max(self.schedule_batches - 1, 1), 1.0)
        return self.mask_prob + (self.mask_prob_end - self.mask_prob) * frac

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids (B, T) int64 right-padded, lengths (B,)): vectorised when the dataset has `gather` (PackedSequences)."""
        if hasattr(self.sequences, "gather"):
            return self.sequences.gather(idx, self.pad_id)
        ids, mask = collate([self.sequences[int(i)] for i in idx], self.pad_id)
        return ids.numpy(), mask.sum(1).numpy()

    next = __next__

    # -- progress and state -----------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next batch (0-based)."""
        return self._epoch

    @property
    def step(self) -> int:
        """Batches produced so far by this rank."""
        return self._epoch * self.batches_per_epoch + self._cursor

    @property
    def tokens_seen(self) -> int:
        """Non-pad tokens produced so far by this rank."""
        return self._tokens_seen

    @property
    def epoch_progress(self) -> float:
        """Fractional epochs completed."""
        return self._epoch + self._cursor / self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "cursor": self._cursor,
            "tokens_seen": self._tokens_seen,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "n_sequences": self.n_sequences,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "rank", "world_size", "batch_size", "n_sequences"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DwmlError(
                    f"batch stream state: {key}={state[key]} was saved, but this stream has {getattr(self, key)}; "
                    f"an exact resume needs the same data and batching"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.batches_per_epoch:
            raise DwmlError(f"batch stream state: epoch={epoch}, cursor={cursor} out of range")
        self._epoch, self._cursor = epoch, cursor
        self._tokens_seen = int(state.get("tokens_seen", 0))


class Prefetcher:
    """A `BatchStream` whose next `depth` batches are built in a background thread, in the same order.

    `state_dict()` is the stream's position after the last batch handed to the caller, not after what the thread
    has read ahead, so a checkpoint resumes at exactly the batch the loop would have taken next. The thread starts
    at the first `next()` from that position; `load_state_dict` stops it and moves the position. `wait_s` sums the
    time the caller spent blocked on data (0 when batch construction is fully overlapped). With `pin_memory` the
    batches come page-locked (for asynchronous host-to-GPU copies).
    """

    def __init__(self, stream: BatchStream, depth: int = 2, pin_memory: bool = False):
        if not isinstance(depth, int) or depth < 1:
            raise DwmlError(f"prefetch depth: expected a positive integer, got {depth!r}")
        self.stream, self.depth, self.pin = stream, depth, pin_memory
        self._state = stream.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.wait_s = 0.0

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> MaskedBatch:
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def _start(self) -> None:
        self.stream.load_state_dict(self._state)  # undo any read-ahead of a previous thread
        self._queue, self._stop = queue.Queue(self.depth), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True,
                                        name="dwml-prefetch")
        self._thread.start()

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = next(self.stream)
                item = (batch.pin_memory() if self.pin else batch, self.stream.state_dict())
                self._put(out, stop, item)
        except BaseException as e:  # handed to the caller, raised by its next()
            self._put(out, stop, e)

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop the thread (the read-ahead batches are dropped; the position stays that of the last handed out)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = None

    @property
    def tokens_seen(self) -> int:
        return int(self._state["tokens_seen"])

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()
