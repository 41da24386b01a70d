"""Batching and dynamic masked-language-model corruption (BERT/RoBERTa 80/10/10 scheme).

`BatchStream` turns a sequence dataset (e.g. `dwml.shards.PackedSequences`) into an endless, deterministic stream of
`MaskedBatch`es: one seeded permutation per epoch, split across DDP ranks, and masking noise drawn from generators
seeded by (seed, epoch, sequence index) alone. The stream's whole state is therefore (epoch, cursor): a run resumed
from `state_dict()` sees bit-identical batches to one that never stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import DwmlError
from .tokenizer import MASK_ID, N_SPECIAL, PAD_ID


@dataclass
class MaskedBatch:
    """input_ids/attention_mask (B, T) long; positions (N,) flat indices into B*T of the masked tokens; labels (N,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskedBatch":
        return MaskedBatch(*(t.to(device, non_blocking=non_blocking) for t in
                             (self.input_ids, self.attention_mask, self.positions, self.labels)))

    def head(self, rows: int) -> "MaskedBatch":
        """The first `rows` sequences with their masked positions (flat indices stay valid: rows come first)."""
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
    generator: torch.Generator | Sequence[torch.Generator],
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_id: int = MASK_ID,
    n_special: int = N_SPECIAL,
) -> MaskedBatch:
    """Select each real (non-special, non-pad) token with probability mask_prob; of those, 80% become <mask>,
    10% a random non-special token, 10% stay. At least one token per batch is selected. Inputs are not modified.

    `generator` is one generator for the whole (B, T) grid, or one per row: then each row's noise depends on that
    row's generator alone, not on its batch-mates or the padded length (`BatchStream` uses this so a sequence is
    masked the same way whatever batch or DDP rank it lands in)."""
    if not 0.0 < mask_prob < 1.0:
        raise DwmlError(f"mask_prob: expected a number in (0, 1), got {mask_prob!r}")
    if vocab_size <= n_special:
        raise DwmlError(f"vocab_size: expected more than {n_special} (the special tokens), got {vocab_size}")
    shape = input_ids.shape
    candidates = attention_mask.bool() & (input_ids >= n_special)
    # Draw every random number for the full grid (or row), so a generator advances by the same amount for any
    # content.
    if isinstance(generator, torch.Generator):
        select_u, action_u, random_ids, fallback_u = _noise(shape, generator, vocab_size, n_special)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"mask_tokens: {len(generator)} generators for {shape[0]} rows")
        rows = [_noise((int(attention_mask[i].sum()),), g, vocab_size, n_special) for i, g in enumerate(generator)]
        select_u, action_u, random_ids, fallback_u = (
            torch.stack([torch.nn.functional.pad(r[k], (0, shape[1] - len(r[k])), value=pad)
                         for r in rows]).view(shape)
            for k, pad in enumerate((1.0, 1.0, n_special, -1.0))
        )

    selected = candidates & (select_u < mask_prob)
    if not bool(selected.any()):
        if not bool(candidates.any()):
            raise DwmlError("mask_tokens: the batch has no maskable tokens (only special/pad tokens)")
        # Guarantee a loss term: select the candidate with the largest independent uniform draw.
        pick = torch.where(candidates, fallback_u, torch.full_like(fallback_u, -1.0)).flatten().argmax()
        selected = selected.flatten().clone()
        selected[pick] = True
        selected = selected.view(shape)

    corrupted = input_ids.clone()
    to_mask = selected & (action_u < 0.8)
    to_random = selected & (action_u >= 0.8) & (action_u < 0.9)
    corrupted[to_mask] = mask_id
    corrupted[to_random] = random_ids[to_random]
    positions = selected.flatten().nonzero().squeeze(1)
    labels = input_ids.flatten()[positions]
    return MaskedBatch(corrupted, attention_mask.clone(), positions, labels)


def _noise(shape, generator: torch.Generator, vocab_size: int, n_special: int):
    """Selection, action and fallback uniforms and random replacement ids for a grid of `shape`."""
    return (torch.rand(shape, generator=generator), torch.rand(shape, generator=generator),
            torch.randint(n_special, vocab_size, shape, generator=generator), torch.rand(shape, generator=generator))


def _mask_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit torch seed that depends only on (seed, epoch, sequence index)."""
    state = np.random.SeedSequence([seed, epoch, index, 0x6D61736B]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


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
        drop_last: bool = True,
        pad_id: int = PAD_ID,
        mask_id: int = MASK_ID,
        n_special: int = N_SPECIAL,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DwmlError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise DwmlError(f"rank/world_size: expected 0 <= rank < world_size, got {rank}/{world_size}")
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
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
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
        input_ids, attention_mask = collate([self.sequences[int(i)] for i in idx], self.pad_id)
        # One generator per sequence from (seed, epoch, sequence index): dynamic masking (new masks every epoch)
        # that does not depend on the batch size or the DDP world size, so a 2-rank run sees the same masks as one
        # process with the union batch.
        generators = [torch.Generator().manual_seed(_mask_seed(self.seed, self._epoch, int(i))) for i in idx]
        batch = mask_tokens(
            input_ids, attention_mask, generator=generators, vocab_size=self.vocab_size,
            mask_prob=self.mask_prob, mask_id=self.mask_id, n_special=self.n_special,
        )
        self._tokens_seen += batch.n_tokens
        self._cursor += 1
        if self._cursor == self.batches_per_epoch:
            self._epoch, self._cursor = self._epoch + 1, 0
        return batch

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
