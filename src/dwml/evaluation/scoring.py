"""Masked-LM sentence scores: pseudo-log-likelihood and its within-word left-to-right variant.

PLL (Salazar et al. 2020, "Masked Language Model Scoring", eq. 2): mask each token t in turn and sum log P(w_t | W_\\t).
PLL-word-l2r (Kauf & Ivanova 2023, "A Better Way to Do Masked Language Model Scoring"): when scoring token t of a
multi-token word, also mask the tokens of the same word to its right. Plain PLL lets the visible rest of a word give
its first pieces away, which inflates the score of words the tokenizer splits; l2r removes that leak.

How the batched scorer keeps an accelerator busy:
- The texts are tokenised in one batch call and every masked copy (text, masked span, scored position) is listed with
  array operations (`build_masked_copies`), once per (tokenizer, texts, method): the result is cached in-process, so
  the peers and the ensemble of one `dwml eval` (and every run of a `dwml experiment`) reuse it.
- Copies are listed by length and packed into batches of *one* length, at most `token_budget` tokens each: no
  padding, no attention mask (the fused attention kernels need none, and no mask check syncs the host).
- The hot loop only launches device work: the copies live on the device, each batch is a slice of them, the masked
  ids are built there, and the LM head runs only at the single masked position of each row (the vocabulary
  projection dominates a small MLM's cost). Per-copy log-probs stay on the device until one transfer at the end.
- Per-token log-probs are summed on the host in float64, in copy order, so a sentence's score does not depend on how
  its terms were batched; that keeps exact ties exact and results reproducible.

Precision (`precision`): `fp32` (default, and what reported numbers use, as BabyLM's pipeline scores in fp32) runs
true fp32 - no autocast, and on CUDA no TF32 matmuls; `bf16` runs the model under bf16 autocast (faster on GPUs; a
few close decisions flip). Log-softmax is always taken in fp32, under `torch.inference_mode`.
`score_sentences_naive` is the one-copy-at-a-time fp32 reference the scorer is tested against.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers.modeling_outputs import MaskedLMOutput

from ..errors import DwmlError
from ..models.model import encoder_and_head, masked_logits

METHODS = ("pll", "pll_word_l2r")
PRECISIONS = ("fp32", "bf16")
DEFAULT_TOKEN_BUDGET = {"cpu": 8192, "cuda": 65536}
_CACHE_SIZE = 8  # entries of masked copies kept per process (a full BLiMP entry is ~40 MB)


@dataclass
class MaskedCopies:
    """All masked copies of a list of texts. Copy k masks tokens [pos[k], end[k]) of text sent[k], reads pos[k].
    Copies are listed by increasing text length (in text and position order within one length)."""

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
    """Tokenize `texts` (with special tokens) and list the copies to score, with array operations over all tokens.

    A token is scored when it ends after character `prefix_chars[i]` (0 = whole text): BabyLM's pipeline's rule, which
    scores the tokens overlapping the completion's character span. The added <s> and </s> span no characters (offsets
    (0, 0)) and are never scored; a special token that stands for text is: the </s> an exported tokenizer reads a
    line break as (`dwml.data.tokenizer.with_line_ends`), as the pipeline scores it. For l2r, copy t masks t and the
    rest of its word: up to the end of the run of tokens sharing t's word id.
    """
    _check_method(method)
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
    if mask_id is None:
        raise DwmlError("tokenizer has no mask token; masked-LM scoring needs one")
    if pad_id is None:
        pad_id = mask_id  # any id works: padded positions are never read
    encodings = _encode(tokenizer, texts)
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    if max_length is not None and len(lengths) and int(lengths.max()) > max_length:
        i = int(lengths.argmax())
        raise DwmlError(f"text of {lengths[i]} tokens exceeds the model's {max_length}: {texts[i][:60]!r}...")
    n_tok = int(lengths.sum())
    chain = itertools.chain.from_iterable
    ids = np.fromiter(chain(e.ids for e in encodings), dtype=np.int64, count=n_tok)
    special = np.fromiter(chain(e.special_tokens_mask for e in encodings), dtype=bool, count=n_tok)
    offsets = np.fromiter(chain(chain(e.offsets for e in encodings)), dtype=np.int64, count=2 * n_tok)
    offsets = offsets.reshape(n_tok, 2)
    starts = np.cumsum(lengths) - lengths  # first flat index of every text
    sent_of = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(n_tok) - starts[sent_of]
    scored = offsets[:, 1] > np.asarray(prefix_chars, dtype=np.int64)[sent_of]
    if method == "pll":
        end = pos + 1
    else:
        word = _word_ids(encodings, special, offsets, pos)
        same_as_next = np.zeros(n_tok, dtype=bool)  # t+1 is in t's text and continues t's word
        same_as_next[:-1] = (sent_of[1:] == sent_of[:-1]) & (word[1:] >= 0) & (word[1:] == word[:-1])
        run_last = np.where(same_as_next, n_tok, np.arange(n_tok))  # last token of t's run: first break at or after t
        run_last = np.minimum.accumulate(run_last[::-1])[::-1]
        end = run_last + 1 - starts[sent_of]
    padded = np.full((len(lengths), int(lengths.max(initial=1))), pad_id, dtype=np.int64)
    padded[sent_of, pos] = ids
    copy = np.flatnonzero(scored)
    copy = copy[np.argsort(lengths[sent_of[copy]], kind="stable")]  # shortest texts first: batches of one length
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return MaskedCopies(t(padded), t(lengths), t(sent_of[copy]), t(pos[copy]), t(end[copy]), t(ids[copy]),
                        mask_id=mask_id, pad_id=pad_id)


def _encode(tokenizer, texts: Sequence[str]) -> list:
    """The Rust `Encoding` (ids, offsets, special-token mask, word ids) of every text, with special tokens. The
    backend is called directly (the Python-side conversion of a full BLiMP costs more than the tokenisation), unless
    the tokenizer was saved with truncation or padding, which its Python call switches off."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DwmlError("scoring needs a fast (Rust) tokenizer with offset mappings")
    if backend.truncation is None and backend.padding is None:
        return backend.encode_batch(list(texts), add_special_tokens=True)
    return tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False).encodings


def _word_ids(encodings, special, offsets, pos) -> np.ndarray:
    """Word index of every flat token (-1 for specials): the fast tokenizer's pre-tokenizer words (byte-level BPE: a
    `Ġ`-prefixed piece starts a word; punctuation is its own word). Without them, tokens touching in the text (each
    token starting where the previous non-special one stopped) form one word."""
    words = [w for e in encodings for w in e.word_ids]
    if any(w is not None for w in words) or not len(words):
        out = np.array([-1 if w is None else w for w in words], dtype=np.int64)
    else:
        prev_stop = np.concatenate([[-1], offsets[:-1, 1]])
        prev_special = np.concatenate([[True], special[:-1]])
        new_word = (pos == 0) | prev_special | (offsets[:, 0] != prev_stop)
        out = np.cumsum(new_word) - 1
    out[special] = -1
    return out


def masked_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     positions: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities (len(positions), V) at the flat indices `positions` of the (B*T) grid.

    RoBERTa and ModernBERT models run the encoder and apply the LM head to the gathered positions only
    (`dwml.models.model.masked_logits`); any other AutoModelForMaskedLM falls back to full logits; a `PeerEnsemble` mixes
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


def check_token_budget(token_budget: int | None) -> None:
    """None (the device's default) or a positive number of tokens per forward batch."""
    if token_budget is not None and (isinstance(token_budget, bool) or not isinstance(token_budget, int)
                                     or token_budget < 1):
        raise DwmlError(f"--token-budget: expected a positive number of tokens, got {token_budget}")


def score_sentences(model, tokenizer, sentences: Sequence[str], *, method: str = "pll",
                    prefixes: Sequence[str | None] | None = None, token_budget: int | None = None,
                    device: str | torch.device | None = None, prefix_sep: str = " ",
                    precision: str = "fp32") -> list[float]:
    """Sum of masked log-probs of each sentence's tokens (natural log), batched.

    With `prefixes`, text i is `prefixes[i] + prefix_sep + sentences[i]` and only the tokens of `prefix_sep +
    sentences[i]` are summed, each conditioned on the visible prefix (EWoK's target given its context). `device`
    moves the model there (None: where the model already is). Duplicate (prefix, sentence) inputs are scored once.
    `precision`: `fp32` (true fp32) or `bf16` (autocast); see the module docstring.
    """
    check_precision(precision)
    texts, prefix_chars, index = _unique_texts(sentences, prefixes, prefix_sep)
    device = _place(model, device)
    copies = cached_masked_copies(tokenizer, texts, prefix_chars, method, _max_tokens(model))
    if token_budget is None:
        token_budget = DEFAULT_TOKEN_BUDGET.get(device.type, DEFAULT_TOKEN_BUDGET["cpu"])
    check_token_budget(token_budget)
    batches = _pack(copies.lengths[copies.sent].tolist(), token_budget)  # planned on the host, before device work
    # The copies (sorted by length), on the device once; every batch below is a slice of them.
    sent, pos, end, target = (x.to(device) for x in (copies.sent, copies.pos, copies.end, copies.target))
    text_ids = copies.ids.to(device)
    cols = torch.arange(text_ids.shape[1], device=device)
    token_logp = torch.empty(len(sent), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _precision(precision, device):
            for start, stop, width in batches:
                s, p, e = sent[start:stop], pos[start:stop], end[start:stop]
                ids = text_ids[s, :width]  # advanced indexing: a fresh tensor, safe to overwrite
                ids.masked_fill_((cols[:width] >= p[:, None]) & (cols[:width] < e[:, None]), copies.mask_id)
                flat = torch.arange(stop - start, device=device) * width + p
                logp = masked_log_probs(model, ids, None, flat)  # one length per batch: no padding, no mask
                token_logp[start:stop] = logp.gather(1, target[start:stop, None]).squeeze(1)
    finally:
        model.train(was_training)
    sums = torch.zeros(len(texts), dtype=torch.float64)
    sums.index_add_(0, copies.sent, token_logp.cpu().double())  # the one host sync
    values = sums.tolist()
    return [values[j] for j in index]


_COPY_CACHE: OrderedDict = OrderedDict()


def clear_copy_cache() -> None:
    """Forget every cached `MaskedCopies` (benchmarks time the cold path with it; memory is freed)."""
    _COPY_CACHE.clear()


def cached_masked_copies(tokenizer, texts: list[str], prefix_chars: list[int], method: str,
                         max_length: int | None) -> MaskedCopies:
    """`build_masked_copies`, memoised per process on (the tokenizer's full definition, texts, method, max_length):
    the models of one evaluation score the same texts with the same tokenizer, so this work is done once."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return build_masked_copies(tokenizer, texts, prefix_chars, method, max_length)
    fingerprint = hashlib.sha1(backend.to_str().encode("utf-8")).hexdigest()
    key = (fingerprint, tokenizer.mask_token_id, tokenizer.pad_token_id, method, max_length, tuple(texts),
           tuple(prefix_chars))
    copies = _COPY_CACHE.get(key)
    if copies is None:
        copies = build_masked_copies(tokenizer, texts, prefix_chars, method, max_length)
        _COPY_CACHE[key] = copies
        while len(_COPY_CACHE) > _CACHE_SIZE:
            _COPY_CACHE.popitem(last=False)
    _COPY_CACHE.move_to_end(key)
    return copies


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
        # (log w as a Python scalar: no host-to-device copy per batch)
        terms = [lp + math.log(w) for w, lp in peer_log_probs if w > 0]
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


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise DwmlError(f"--precision: expected one of {list(PRECISIONS)}, got {precision!r}")


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


@contextlib.contextmanager
def _precision(precision: str, device: torch.device):
    """`bf16`: autocast. `fp32`: autocast off (also inside an outer autocast) and, on CUDA, no TF32 matmuls or
    convolutions; the global switches are restored afterwards."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
        return
    with torch.autocast(device_type=device.type, enabled=False), (
            _no_tf32() if device.type == "cuda" else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def _no_tf32():
    """cuBLAS matmuls and cuDNN convolutions in IEEE fp32 (no TF32), restored afterwards. Uses torch's
    `fp32_precision` switches where they exist: reading the legacy `allow_tf32` flags after someone set the new ones
    raises, while the new ones read correctly after the legacy ones were set (as `dwml.training.runtime` does)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        knobs = [(matmul, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")]
    else:
        knobs = [(matmul, "allow_tf32", False), (cudnn, "allow_tf32", False)]
    saved = [getattr(obj, name) for obj, name, _ in knobs]
    for obj, name, value in knobs:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(knobs, saved):
            setattr(obj, name, value)


def _pack(sorted_len: list[int], budget: int) -> list[tuple[int, int, int]]:
    """(start, stop, width) slices of copies sorted by length: each slice holds copies of one length (no padding),
    at most max(1, budget // length) of them."""
    out, n, start = [], len(sorted_len), 0
    while start < n:
        width = sorted_len[start]
        stop = min(n, start + max(1, budget // width))
        if sorted_len[stop - 1] != width:  # the run of this length ends earlier
            stop = bisect.bisect_right(sorted_len, width, start, stop)
        out.append((start, stop, width))
        start = stop
    return out
