"""Masked-LM sentence scores: pseudo-log-likelihood and its within-word left-to-right variant.

PLL (Salazar et al. 2020, "Masked Language Model Scoring", eq. 2): mask each token t in turn and sum log P(w_t | W_\\t).
PLL-word-l2r (Kauf & Ivanova 2023, "A Better Way to Do Masked Language Model Scoring"): when scoring token t of a
multi-token word, also mask the tokens of the same word to its right. Plain PLL lets the visible rest of a word give
its first pieces away, which inflates the score of words the tokenizer splits; l2r removes that leak.

The batched scorer builds every masked copy of every sentence, sorts the copies by length, packs them into batches of
at most `token_budget` tokens (rows x padded length), runs one forward per batch and applies the LM head only at the
single masked position of each row (the vocabulary projection dominates a small MLM's cost). Log-softmax is taken in
fp32, under `torch.inference_mode`, with bf16 autocast on CUDA. Per-token log-probs are summed in float64 so that a
sentence's score does not depend on the order (batch) in which its terms arrive; that keeps exact ties exact.
`score_sentences_naive` is the one-copy-at-a-time reference it is tested against.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.modeling_outputs import MaskedLMOutput

from .errors import DwmlError
from .model import encoder_and_head, masked_logits

METHODS = ("pll", "pll_word_l2r")
DEFAULT_TOKEN_BUDGET = {"cpu": 8192, "cuda": 65536}


@dataclass
class MaskedCopies:
    """All masked copies of a list of texts. Copy k masks tokens [pos[k], end[k]) of text sent[k], reads pos[k]."""

    ids: torch.Tensor  # (S, T_max) long: the tokenized texts, right-padded
    lengths: torch.Tensor  # (S,) long
    sent: torch.Tensor  # (N,) long
    pos: torch.Tensor  # (N,) long
    end: torch.Tensor  # (N,) long; pos + 1 for PLL
    target: torch.Tensor  # (N,) long: the true token id at pos
    mask_id: int
    pad_id: int


def build_masked_copies(tokenizer, texts: Sequence[str], prefix_chars: Sequence[int], method: str,
                        max_length: int | None = None) -> MaskedCopies:
    """Tokenize `texts` (with special tokens) and list the copies to score.

    A token is scored when it is not special and ends after character `prefix_chars[i]` (0 = whole text): the same
    rule as BabyLM's pipeline, which scores the tokens overlapping the completion's character span.
    """
    _check_method(method)
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
    if mask_id is None:
        raise DwmlError("tokenizer has no mask token; masked-LM scoring needs one")
    if pad_id is None:
        pad_id = mask_id  # any id works: padded positions are excluded by the attention mask
    try:
        enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True,
                        return_special_tokens_mask=True, return_attention_mask=False)
    except NotImplementedError:
        raise DwmlError("scoring needs a fast (Rust) tokenizer with offset mappings") from None
    all_ids = enc["input_ids"]
    lengths = [len(ids) for ids in all_ids]
    if max_length is not None and lengths and max(lengths) > max_length:
        i = max(range(len(lengths)), key=lengths.__getitem__)
        raise DwmlError(f"text of {lengths[i]} tokens exceeds the model's {max_length}: {texts[i][:60]!r}...")
    sent, pos, end, target = [], [], [], []
    for i, ids in enumerate(all_ids):
        special, offsets = enc["special_tokens_mask"][i], enc["offset_mapping"][i]
        scored = [t for t in range(len(ids)) if not special[t] and offsets[t][1] > prefix_chars[i]]
        if method == "pll":
            ends = [t + 1 for t in scored]
        else:
            words = _word_ids(enc, i, offsets, special)
            ends = []
            for t in scored:  # mask t and the following tokens of its word
                e = t + 1
                while e < len(ids) and words[e] is not None and words[e] == words[t]:
                    e += 1
                ends.append(e)
        sent += [i] * len(scored)
        pos += scored
        end += ends
        target += [ids[t] for t in scored]
    padded = torch.full((len(all_ids), max(lengths, default=1)), pad_id, dtype=torch.long)
    for i, ids in enumerate(all_ids):
        padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return MaskedCopies(padded, *(torch.tensor(x, dtype=torch.long) for x in (lengths, sent, pos, end, target)),
                        mask_id=mask_id, pad_id=pad_id)


def _word_ids(enc, i: int, offsets, special) -> list[int | None]:
    """Word index of every token: the fast tokenizer's pre-tokenizer words (byte-level BPE: a `Ġ`-prefixed piece
    starts a word; punctuation is its own word). Without them, tokens touching in the text form one word."""
    try:
        words = enc.word_ids(i)
    except (ValueError, AttributeError):
        words = None
    if words is not None:
        return [None if special[t] else w for t, w in enumerate(words)]
    out: list[int | None] = []
    word, prev_end = -1, None
    for t, (start, stop) in enumerate(offsets):
        if special[t]:
            out.append(None)
            continue
        if prev_end is None or start != prev_end:
            word += 1
        out.append(word)
        prev_end = stop
    return out


def masked_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities (len(positions), V) at the flat indices `positions` of the (B*T) grid.

    RoBERTa and ModernBERT models run the encoder and apply the LM head to the gathered positions only
    (`dwml.model.masked_logits`); any other AutoModelForMaskedLM falls back to full logits; a `PeerEnsemble` mixes
    its peers' distributions.
    """
    if hasattr(model, "masked_log_probs"):
        return model.masked_log_probs(input_ids, attention_mask, positions)
    if encoder_and_head(model) is not None:
        logits = masked_logits(model, input_ids, attention_mask, positions)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
    return torch.log_softmax(logits.float(), dim=-1)


def score_sentences(model, tokenizer, sentences: Sequence[str], *, method: str = "pll",
                    prefixes: Sequence[str | None] | None = None, token_budget: int | None = None,
                    device: str | torch.device | None = None, prefix_sep: str = " ") -> list[float]:
    """Sum of masked log-probs of each sentence's tokens (natural log), batched.

    With `prefixes`, text i is `prefixes[i] + prefix_sep + sentences[i]` and only the tokens of `prefix_sep +
    sentences[i]` are summed, each conditioned on the visible prefix (EWoK's target given its context). `device`
    moves the model there (None: where the model already is). Duplicate (prefix, sentence) inputs are scored once.
    """
    texts, prefix_chars, index = _unique_texts(sentences, prefixes, prefix_sep)
    device = _place(model, device)
    copies = build_masked_copies(tokenizer, texts, prefix_chars, method, _max_tokens(model))
    if token_budget is None:
        token_budget = DEFAULT_TOKEN_BUDGET.get(device.type, DEFAULT_TOKEN_BUDGET["cpu"])
    if token_budget < 1:
        raise DwmlError(f"--token-budget: expected a positive number of tokens, got {token_budget}")
    sums = torch.zeros(len(texts), dtype=torch.float64)
    copy_len = copies.lengths[copies.sent]
    order = torch.argsort(copy_len, stable=True)  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            for rows in _pack(order, copy_len, token_budget):
                sent, pos, end = copies.sent[rows], copies.pos[rows], copies.end[rows]
                width = int(copies.lengths[sent].max())
                cols = torch.arange(width)
                ids = copies.ids[sent, :width]  # advanced indexing: a fresh tensor, safe to overwrite
                ids[(cols >= pos[:, None]) & (cols < end[:, None])] = copies.mask_id
                attention = (cols < copies.lengths[sent][:, None]).long()
                flat = torch.arange(len(rows)) * width + pos
                logp = masked_log_probs(model, ids.to(device), attention.to(device), flat.to(device))
                token_logp = logp.gather(1, copies.target[rows].to(device)[:, None]).squeeze(1)
                sums.index_add_(0, sent, token_logp.double().cpu())
    finally:
        model.train(was_training)
    return [float(sums[j]) for j in index]


def score_sentences_naive(model, tokenizer, sentences: Sequence[str], *, method: str = "pll",
                          prefixes: Sequence[str | None] | None = None, device: str | torch.device | None = None,
                          prefix_sep: str = " ") -> list[float]:
    """Reference implementation: one masked copy at a time through the full model, no padding, no shortcuts."""
    texts, prefix_chars, index = _unique_texts(sentences, prefixes, prefix_sep)
    device = _place(model, device)
    copies = build_masked_copies(tokenizer, texts, prefix_chars, method, _max_tokens(model))
    sums = [0.0] * len(texts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for k in range(len(copies.sent)):
                s, p, e = int(copies.sent[k]), int(copies.pos[k]), int(copies.end[k])
                ids = copies.ids[s, : int(copies.lengths[s])].clone()
                ids[p:e] = copies.mask_id
                logits = model(input_ids=ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device))
                logp = torch.log_softmax(logits.logits[0, p].float(), dim=-1)
                sums[s] += float(logp[int(copies.target[k])])
    finally:
        model.train(was_training)
    return [sums[j] for j in index]


class PeerEnsemble(torch.nn.Module):
    """The omega-weighted peer ensemble as one masked LM: P(x) = sum_i omega_i softmax(z_i)(x).

    We mix the peers' *distributions* rather than averaging their logits: the mixture is itself a probability model,
    so every PLL term is the log of a real ensemble probability, and it never falls below omega_i * p_i - one
    confident peer is enough to keep a token plausible. Logit averaging would instead be a renormalised weighted
    geometric mean (a product of experts) that any single peer can veto. Peers must share one vocabulary.
    """

    def __init__(self, peers: Sequence[torch.nn.Module], omega: Sequence[float]):
        super().__init__()
        if len(peers) == 0 or len(peers) != len(omega):
            raise DwmlError(f"ensemble: expected one omega per peer, got {len(omega)} weights for {len(peers)} peers")
        w = torch.tensor([float(x) for x in omega], dtype=torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise DwmlError(f"ensemble: omega must be non-negative with a positive sum, got {list(omega)}")
        sizes = {int(p.get_output_embeddings().weight.shape[0]) if p.get_output_embeddings() is not None
                 else int(p.config.vocab_size) for p in peers}
        if len(sizes) != 1:
            raise DwmlError(f"ensemble: peers have different vocabulary sizes {sorted(sizes)}")
        self.peers = torch.nn.ModuleList(peers)
        self.omega = (w / w.sum()).tolist()

    @property
    def config(self):
        return self.peers[0].config

    def _mix(self, peer_log_probs) -> torch.Tensor:
        # log sum_i omega_i p_i, computed stably in fp32; zero-weight peers are skipped entirely.
        terms = [lp + torch.log(torch.tensor(w, dtype=lp.dtype, device=lp.device))
                 for w, lp in peer_log_probs if w > 0]
        return torch.logsumexp(torch.stack(terms), dim=0)

    def masked_log_probs(self, input_ids, attention_mask, positions) -> torch.Tensor:
        return self._mix((w, masked_log_probs(peer, input_ids, attention_mask, positions))
                         for w, peer in zip(self.omega, self.peers) if w > 0)

    def forward(self, input_ids, attention_mask=None, **kwargs) -> MaskedLMOutput:
        """`logits` are the ensemble's log-probabilities (already normalised, so log_softmax leaves them as is)."""
        return MaskedLMOutput(logits=self._mix(
            (w, torch.log_softmax(peer(input_ids=input_ids, attention_mask=attention_mask).logits.float(), dim=-1))
            for w, peer in zip(self.omega, self.peers) if w > 0))


# ---------------------------------------------------------------------------------------------------------- helpers


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise DwmlError(f"--method: expected one of {list(METHODS)}, got {method!r}")


def _unique_texts(sentences, prefixes, sep):
    """Full texts, the character where scoring starts, and for every input the index of its unique text."""
    if prefixes is not None and len(prefixes) != len(sentences):
        raise DwmlError(f"scoring: {len(prefixes)} prefixes for {len(sentences)} sentences")
    seen: dict[tuple[str, int], int] = {}
    texts: list[str] = []
    starts: list[int] = []
    index: list[int] = []
    for i, sentence in enumerate(sentences):
        prefix = prefixes[i] if prefixes is not None else None
        key = (sentence, 0) if not prefix else (prefix + sep + sentence, len(prefix))
        if key not in seen:
            seen[key] = len(texts)
            texts.append(key[0])
            starts.append(key[1])
        index.append(seen[key])
    return texts, starts, index


def _place(model, device) -> torch.device:
    if device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


def _max_tokens(model) -> int | None:
    """Longest input the position embeddings allow (RoBERTa reserves padding_idx + 1 positions)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is None:
        return None
    if "roberta" in str(getattr(cfg, "model_type", "")) or "camembert" in str(getattr(cfg, "model_type", "")):
        limit -= (getattr(cfg, "pad_token_id", None) or 0) + 1
    return limit


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pack(order: torch.Tensor, length: torch.Tensor, budget: int):
    """Consecutive slices of `order` (ascending lengths) whose rows x longest row stays within `budget` tokens."""
    n, start = len(order), 0
    sorted_len = length[order]
    while start < n:
        stop = min(n, start + max(1, budget // int(sorted_len[start])))
        while stop - start > 1 and (stop - start) * int(sorted_len[stop - 1]) > budget:
            stop = start + max(1, budget // int(sorted_len[stop - 1]))
        yield order[start:stop]
        start = stop
