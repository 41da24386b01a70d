"""Reference lines for zero-shot minimal-pair results: what counting the train split's tokens scores, no learning.

A model of token counts does not score 50% on BLiMP: word-order pairs hold the same tokens, so a unigram model ties
them, and a tie counts correct in BabyLM's convention (babylm/evaluation-pipeline-2025 issue #34). Two reference
models are built from the token ids of a prepared directory's train split (`dwml prepare` output) and scored on the
same pairs, tokenised exactly as the models see them (the prepared tokenizer, `<s> ... </s>`, the tokens that the
masked-LM scorer sums: `dwml.evaluation.scoring.build_masked_copies`); outcomes and macro averages over groups come
from the same code as the models' (`dwml.evaluation.outcomes.summarize`), so a tie counts correct and strict = ties wrong.

- `unigram`: add-one unigram of the train tokens, p(w) = (c(w) + 1) / (N + V - 5) over the V - 5 non-special ids; a
  text's score is the sum of log p over its scored tokens.
- `kn_trigram`: interpolated Kneser-Ney trigram with one fixed discount D = 0.75 at every order (Chen & Goodman
  1999, "interpolated KN"; not modified KN). Every train document is `<s> <s> d </s>`, and for u, v, w
  (w a document id or </s>; Z = the V - 4 such ids):
    P3(w|u v) = max(c(u v w) - D, 0) / c(u v .) + D N1+(u v .) / c(u v .) P2(w|v)             [P2 if c(u v .) = 0]
    P2(w|v)   = max(N1+(. v w) - D, 0) / N1+(. v .) + D N1+(v .) / N1+(. v .) P1(w)   [P1 if N1+(. v .) = 0]
    P1(w)     = max(N1+(. w) - D, 0) / N1+(. .) + D |{w: N1+(. w) > 0}| / N1+(. .) / Z
  N1+(. v w) = number of trigram types (x, v, w), N1+(. v .) = sum over w, N1+(v .) = number of w with N1+(. v w) > 0,
  N1+(. w) = number of bigram types (v, w) among those; each level sums to 1 over Z. A text's score is the sum of
  log P3 over its scored tokens and its </s> (context: the tokens before, `<s> <s>` at the start; an EWoK target is
  conditioned on its context, like the models).
Scores are summed with `math.fsum` (exactly rounded, so texts holding the same terms in another order tie exactly).
Counting is whole-array numpy: packed int64 keys ((u V + v) V + w), `np.unique`, `np.searchsorted`.

Results are cached per prepared directory and task: PREPARED/reference/TASK-HASH.json, HASH over the pairs as read
(texts, groups: any change to the eval files, `limit` or the EWoK pairing changes it), the tokenizer and data
fingerprints and these options; a read-only prepared directory is used without a cache. Beside each line comes a 95%
interval of its macro accuracy: `dwml.evaluation.stats.paired_bootstrap` against an all-wrong model (resampled within
groups, so the interval of the macro accuracy itself).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..checks import check_prepared_tokenizer, data_fingerprint, tokenizer_fingerprint
from ..data.shards import Shard, load_meta
from ..data.tokenizer import BOS_ID, EOS_ID, N_SPECIAL, load_tokenizer
from ..errors import DwmlError
from ..io import read_json, write_json
from .evaldata import EWOK_PAIRINGS, TASKS, MinimalPair, load_task, parse_tasks
from .outcomes import item_outcomes, summarize
from .scoring import _unique_texts, build_masked_copies
from .stats import paired_bootstrap

LABELS = {"unigram": "unigram (train counts)", "kn_trigram": "KN trigram"}
DISCOUNT = 0.75
PAIR_KINDS = ("blimp", "supplement", "ewok")
CACHE_FORMAT = "dwml-reference-v1"
N_BOOT, LEVEL = 10_000, 0.95
MODELS_TEXT = ("unigram: add-one unigram of the train tokens; kn_trigram: interpolated Kneser-Ney trigram, fixed "
               f"discount {DISCOUNT} at every order, documents as <s> <s> d </s>, </s> scored")


# ------------------------------------------------------------------------------------------------ the two models


def train_stream(prepared: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(document tokens int64, `<s> <s> d </s>` of every non-empty document concatenated int64, vocab_size) of the
    prepared train split."""
    shard = Shard(prepared, "train")
    tokens = np.asarray(shard.tokens, dtype=np.int64)
    if tokens.size == 0:
        raise DwmlError(f"{Path(prepared) / 'train.bin'}: the train split has no tokens to count")
    lengths = shard.doc_lengths()
    lengths = lengths[lengths > 0]
    doc = np.repeat(np.arange(lengths.size), lengths)
    stream = np.full(tokens.size + 3 * lengths.size, BOS_ID, dtype=np.int64)
    stream[np.arange(tokens.size) + 3 * doc + 2] = tokens  # doc i starts at offset + 3 i: <s> <s> before its tokens
    stream[np.cumsum(lengths) + 3 * np.arange(1, lengths.size + 1) - 1] = EOS_ID
    return tokens, stream, shard.vocab_size


class Unigram:
    """Add-one unigram over the non-special ids: p(w) = (c(w) + 1) / (N + V - N_SPECIAL)."""

    def __init__(self, tokens: np.ndarray, vocab_size: int):
        counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
        p = (counts + 1.0) / (tokens.size + vocab_size - N_SPECIAL)
        p[:N_SPECIAL] = 0.0
        self.log_p = np.log(p, where=p > 0, out=np.full(vocab_size, -np.inf))

    def log_prob(self, w: np.ndarray) -> np.ndarray:
        return self.log_p[w]


def _find(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, found) of `query` in the sorted unique `keys`."""
    i = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return i, keys[i] == query


def _groups(sorted_keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique keys, sum of values, number of entries) per run of equal keys in `sorted_keys`."""
    keys, start = np.unique(sorted_keys, return_index=True)
    return keys, np.add.reduceat(values, start), np.diff(np.append(start, sorted_keys.size))


class KneserNeyTrigram:
    """Interpolated Kneser-Ney trigram with a fixed discount (the formulas of the module docstring)."""

    def __init__(self, stream: np.ndarray, vocab_size: int, discount: float = DISCOUNT):
        if vocab_size > 2**21:  # (u V + v) V + w must fit in an int64
            raise DwmlError(f"KN trigram: vocabulary of {vocab_size} ids is too large for int64 keys (at most 2^21)")
        if not 0 < discount < 1:
            raise DwmlError(f"KN trigram: discount must be in (0, 1), got {discount}")
        V, D = int(vocab_size), float(discount)
        self.V, self.D = V, D
        pos = np.flatnonzero(stream != BOS_ID)  # predicted positions; every document starts with <s> <s>
        keys = (stream[pos - 2] * V + stream[pos - 1]) * V + stream[pos]
        self.tri, self.tri_c = np.unique(keys, return_counts=True)  # c(u v w)
        self.uv, self.uv_c, self.uv_n = _groups(self.tri // V, self.tri_c)  # c(u v .), N1+(u v .)
        self.vw, self.vw_n = np.unique(self.tri % (V * V), return_counts=True)  # N1+(. v w)
        self.v, self.v_n, self.v_types = _groups(self.vw // V, self.vw_n)  # N1+(. v .), N1+(v .)
        cont = np.bincount(self.vw % V, minlength=V).astype(np.float64)  # N1+(. w)
        self.predicted = np.zeros(V, dtype=bool)
        self.predicted[N_SPECIAL:] = True
        self.predicted[EOS_ID] = True
        z = int(self.predicted.sum())
        self.p1 = np.where(self.predicted,
                           (np.maximum(cont - D, 0.0) + D * np.count_nonzero(cont) / z) / cont.sum(), 0.0)

    def prob2(self, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        p1 = self.p1[w]
        j, has_v = _find(self.v, v)
        k, has_vw = _find(self.vw, v * self.V + w)
        top = np.where(has_vw, np.maximum(self.vw_n[k] - self.D, 0.0), 0.0)
        return np.where(has_v, (top + self.D * self.v_types[j] * p1) / self.v_n[j], p1)

    def prob(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        u, v, w = (np.asarray(x, dtype=np.int64) for x in (u, v, w))
        p2 = self.prob2(v, w)
        j, has_uv = _find(self.uv, u * self.V + v)
        k, has_uvw = _find(self.tri, (u * self.V + v) * self.V + w)
        top = np.where(has_uvw, np.maximum(self.tri_c[k] - self.D, 0.0), 0.0)
        return np.where(has_uv, (top + self.D * self.uv_n[j] * p2) / self.uv_c[j], p2)


# ------------------------------------------------------------------------------------------------ scoring of pairs


def text_terms(tokenizer, pairs: Sequence[MinimalPair]) -> tuple[dict, list[int], int]:
    """The terms every text is scored by, tokenised as the models see it: ({"sent", "u", "v", "w"} of the scored
    tokens, {..} of the </s> of every text}, the unique-text index of each side (goods, then bads), n unique texts)."""
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    prefixes = [p.good_prefix for p in pairs] + [p.bad_prefix for p in pairs]
    texts, prefix_chars, index = _unique_texts(sentences, prefixes, " ")
    copies = build_masked_copies(tokenizer, texts, prefix_chars, "pll")
    ids, lengths = copies.ids.numpy(), copies.lengths.numpy()
    rows = np.arange(len(texts))
    if len(texts) and (np.any(ids[:, 0] != BOS_ID) or np.any(ids[rows, lengths - 1] != EOS_ID)):
        raise DwmlError("reference lines: the tokenizer does not wrap texts in <s> ... </s> (not a dwml tokenizer?)")

    def terms(sent, pos, w):
        return {"sent": sent, "u": np.where(pos >= 2, ids[sent, np.maximum(pos - 2, 0)], BOS_ID),
                "v": ids[sent, pos - 1], "w": w}

    scored = terms(copies.sent.numpy(), copies.pos.numpy(), copies.target.numpy())
    ends = terms(rows, lengths - 1, np.full(len(texts), EOS_ID, dtype=np.int64))
    return {"tokens": scored, "ends": ends}, index, len(texts)


def _sums(sent: np.ndarray, log_p: np.ndarray, n: int) -> list[float]:
    """Per text, math.fsum of its terms (exactly rounded: the order of the terms does not matter)."""
    order = np.argsort(sent, kind="stable")
    bounds = np.searchsorted(sent[order], np.arange(n + 1)).tolist()
    values = log_p[order].tolist()
    return [math.fsum(values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def score_reference(unigram: Unigram, trigram: KneserNeyTrigram, tokenizer,
                    pairs: Sequence[MinimalPair]) -> dict[str, tuple[list[float], list[float]]]:
    """{model: (good scores, bad scores)} in nats."""
    terms, index, n = text_terms(tokenizer, pairs)
    t, e = terms["tokens"], terms["ends"]
    per_text = {
        # A line break read as </s> (`with_line_ends`) is the same term of both sides under a unigram, which
        # predicts no specials: skipped. The trigram predicts </s> in its context, as it does at every text's end.
        "unigram": _sums(t["sent"][t["w"] != EOS_ID], unigram.log_prob(t["w"][t["w"] != EOS_ID]), n),
        "kn_trigram": _sums(np.concatenate([t["sent"], e["sent"]]),
                            np.log(np.concatenate([trigram.prob(t["u"], t["v"], t["w"]),
                                                   trigram.prob(e["u"], e["v"], e["w"])])), n),
    }
    out = {}
    for name, values in per_text.items():
        scores = [values[j] for j in index]
        out[name] = (scores[: len(pairs)], scores[len(pairs):])
    return out


def interval(task_result: dict, n_boot: int = N_BOOT, level: float = LEVEL) -> dict:
    """95% interval of the macro accuracy (ties correct) and of the strict one: stratified bootstrap over items."""
    correct, tie, group, _ = item_outcomes(task_result)
    none = np.zeros_like(correct)
    a = paired_bootstrap(correct, none, group, n_boot=n_boot, level=level)
    s = paired_bootstrap(correct & ~tie, none, group, n_boot=n_boot, level=level)
    return {"level": level, "n_boot": n_boot, "low": a["low"], "high": a["high"],
            "strict_low": s["low"], "strict_high": s["high"]}


# ------------------------------------------------------------------------------------------------ cached results


def _pairs_sha(pairs: Sequence[MinimalPair]) -> str:
    rows = [[p.good, p.bad, p.group, p.field, p.good_prefix, p.bad_prefix] for p in pairs]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def reference_results(prepared: str | Path, tasks: str | Sequence[str], *, data_dir: str | Path | None = None,
                      limit: int | None = None, ewok_pairing: str = EWOK_PAIRINGS[0],
                      task_pairs: dict[str, list[MinimalPair]] | None = None,
                      log: Callable[[str], None] | None = None, line_ends: bool = False) -> dict | None:
    """The reference lines of `prepared`'s train split on the minimal-pair tasks among `tasks` (others skipped;
    None when there is none). `line_ends`: texts tokenised with a line break read as </s>, as the models of a run
    trained with data.separator = "eos" read them (`dwml.data.tokenizer.with_line_ends`).

    Returns {"prepared", "tokenizer_sha256", "line_ends", "discount", "models_text", "cached": [tasks read from the
    cache], "seconds", "models": {"unigram" | "kn_trigram": {"label", "tasks": {task: summarize(...) without items, with
    "interval"}, "summary": {task: macro %}, "strict_summary": {...}, "ties": {...}}}}.
    """
    start = time.perf_counter()
    prepared = Path(prepared)
    meta = load_meta(prepared)
    tok_sha = check_prepared_tokenizer(prepared, meta)
    data_sha = data_fingerprint(prepared, meta)
    names = [t for t in parse_tasks(tasks) if TASKS[t].kind in PAIR_KINDS]
    if not names:
        return None
    out = {name: {"label": label, "tasks": {}, "summary": {}, "strict_summary": {}, "ties": {}}
           for name, label in LABELS.items()}
    built: dict = {}
    cached = []
    for task in names:
        pairs = (task_pairs or {}).get(task) or load_task(task, data_dir, limit, ewok_pairing)
        key = {"format": CACHE_FORMAT, "task": task, "models": MODELS_TEXT, "discount": DISCOUNT, "n_boot": N_BOOT,
               "level": LEVEL, "n_pairs": len(pairs), "pairs_sha256": _pairs_sha(pairs), "tokenizer_sha256": tok_sha,
               "data_sha256": data_sha, **({"line_ends": True} if line_ends else {})}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = prepared / "reference" / f"{task}-{digest}.json"
        entry = _read_cache(path, key)
        if entry is not None:
            cached.append(task)
        else:
            if not built:
                t0 = time.perf_counter()
                tokens, stream, vocab = train_stream(prepared)
                built.update(unigram=Unigram(tokens, vocab), trigram=KneserNeyTrigram(stream, vocab),
                             tokenizer=load_tokenizer(prepared / "tokenizer", line_ends=line_ends))
                if log:
                    log(f"reference lines: counted {tokens.size:,} train tokens of {prepared} "
                        f"({time.perf_counter() - t0:.1f}s)")
            t0 = time.perf_counter()
            scores = score_reference(built["unigram"], built["trigram"], built["tokenizer"], pairs)
            entry = {"key": key, "models": {}}
            for name, (good, bad) in scores.items():
                entry["models"][name] = summarize(pairs, good, bad)
                entry["models"][name]["interval"] = interval(entry["models"][name])
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            _write_cache(path, entry, log)
        for name, res in entry["models"].items():
            o = out[name]
            o["tasks"][task] = {k: v for k, v in res.items() if k != "items"}
            o["summary"][task] = res["macro_accuracy"]
            o["strict_summary"][task] = res["strict_macro_accuracy"]
            o["ties"][task] = res["ties"]
        if log:
            u, k = out["unigram"], out["kn_trigram"]
            log(f"  {task}: unigram {u['summary'][task]:.2f}% ({u['strict_summary'][task]:.2f}% with ties wrong), "
                f"KN trigram {k['summary'][task]:.2f}% ({k['strict_summary'][task]:.2f}%)"
                + (" [cached]" if task in cached else ""))
    return {"prepared": str(prepared), "tokenizer_sha256": tok_sha, "line_ends": line_ends, "discount": DISCOUNT,
            "models_text": MODELS_TEXT, "cached": cached, "seconds": round(time.perf_counter() - start, 3),
            "models": out}


def _read_cache(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        entry = read_json(path, "reference cache")
    except DwmlError:
        return None  # unreadable: computed again and replaced
    ok = isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("models"), dict)
    return entry if ok and set(entry["models"]) == set(LABELS) else None


def _write_cache(path: Path, entry: dict, log) -> None:
    try:
        write_json(path, entry)
    except OSError as e:  # a read-only prepared directory: the numbers are still there, only not cached
        if log:
            log(f"reference lines: not cached ({path}: {e.strerror or e})")


# ------------------------------------------------------------------------------------------------ runs and tables


def run_prepared_dir(path: str | Path) -> Path | None:
    """The prepared directory a DWML run was trained on: its final/summary.json names the tokenizer inside it
    (PREPARED/tokenizer). None for a plain model folder, a directory no longer there or no longer holding the run's
    tokenizer (sha256 recorded in the summary)."""
    path = Path(path)
    final = path / "final" if (path / "final" / "summary.json").is_file() else path
    try:
        summary = json.loads((final / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tok = summary.get("tokenizer") if isinstance(summary, dict) else None
    if not isinstance(tok, str) or Path(tok).name != "tokenizer":
        return None
    prepared = Path(tok).parent
    if not (prepared / "meta.json").is_file() or not (prepared / "tokenizer" / "tokenizer.json").is_file():
        return None
    sha = summary.get("tokenizer_sha256")
    if sha and tokenizer_fingerprint(prepared / "tokenizer") != sha:
        return None
    return prepared


def reference_rows(reference: dict, columns: Sequence[str], acc_tasks: Sequence[str]) -> list[list[str]]:
    """Rows of `dwml eval`'s summary table: label, macro accuracy per column ("-" where not a pair task), then the
    mean, strict mean and ties over the accuracy tasks (when every one of them has a reference line)."""
    rows = []
    for r in reference["models"].values():
        row = [r["label"]] + [f"{r['summary'][c]:.2f}" if c in r["summary"] else "-" for c in columns]
        if acc_tasks:
            full = all(t in r["summary"] for t in acc_tasks)
            mean = lambda d: f"{sum(d[t] for t in acc_tasks) / len(acc_tasks):.2f}" if full else "-"  # noqa: E731
            row += [mean(r["summary"]), mean(r["strict_summary"]),
                    str(sum(r["ties"][t] for t in acc_tasks)) if full else "-"]
        rows.append(row)
    return rows


def reference_note(reference: dict) -> str:
    """What the reference lines are, and the KN trigram's interval per task."""
    tri = reference["models"]["kn_trigram"]["tasks"]
    level = next((100 * r["interval"]["level"] for r in tri.values()), 95)
    spans = ", ".join(f"{t} [{r['interval']['low']:.1f}, {r['interval']['high']:.1f}]" for t, r in tri.items())
    return (f"({', '.join(LABELS.values())}: no learning - the token counts of the train split of "
            f"{reference['prepared']}, texts tokenised as the models see them; {reference['models_text']}; "
            f"KN trigram {level:.0f}% interval (bootstrap over items within groups): {spans or 'n/a'})")
