"""`dwml prepare`: corpus files -> cleaned text, a trained tokenizer and binary token shards.

Output directory (written whole, atomically - a failure leaves nothing behind):

    OUT/tokenizer/          Hugging Face tokenizer folder (AutoTokenizer.from_pretrained)
    OUT/train.txt           cleaned training documents, one per line (the tokenizer's training text)
    OUT/valid.txt           cleaned validation documents
    OUT/train.{bin,idx.npy,json}, OUT/valid.{bin,idx.npy,json}   token shards (see dwml.data.shards)
    OUT/meta.json           vocabulary, dtype, settings, and docs/words/tokens per split and per source
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from ..checks import tokenizer_fingerprint
from ..errors import DwmlError
from ..io import atomic_dir, check_output_dir, read_json, write_json, write_text
from .corpus import Document, count_words, discover_files, group_by_source, read_corpus, split_documents
from .entropy import unigram_entropy
from .shards import META_FORMAT, dtype_for_vocab, encode_documents, write_shard
from .tokenizer import (DEFAULT_MAX_LENGTH, SPECIAL_TOKENS, check_max_length, check_vocab_size, save_tokenizer,
                        train_tokenizer)

SPLITS = ("train", "valid")


def default_corpus_path() -> Path:
    """The shared BabyLM corpus, `<repo>/../shared/data/corpus`, found from the working directory or this package."""
    repo_from_package = Path(__file__).resolve().parents[3]
    candidates = [
        Path.cwd() / "shared" / "data" / "corpus",
        Path.cwd().parent / "shared" / "data" / "corpus",
        repo_from_package.parent / "shared" / "data" / "corpus",
    ]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise DwmlError(
        f"default corpus not found (looked in {', '.join(map(str, dict.fromkeys(candidates)))}); "
        f"pass corpus files or directories explicitly"
    )


def _split_stats(docs: Sequence[Document], lengths) -> dict:
    sources: dict[str, dict[str, int]] = {}
    for doc, n_tokens in zip(docs, lengths.tolist()):
        s = sources.setdefault(doc.source, {"docs": 0, "words": 0, "tokens": 0})
        s["docs"] += 1
        s["words"] += count_words(doc.text)
        s["tokens"] += n_tokens
    total = {k: sum(s[k] for s in sources.values()) for k in ("docs", "words", "tokens")}
    return {**total, "sources": sources}


def check_reusable(prepared: Path, inputs: Sequence[str | Path], **settings) -> None:
    """Before a demo or an experiment reuses `prepared` (it holds meta.json): it was prepared from these inputs
    with these settings (`vocab_size`, `valid_fraction`, `seed`, `lowercase`, `min_frequency`, `max_docs`, as given
    to `prepare`); otherwise one line naming what differs, instead of silently training on other data."""
    meta = read_json(prepared / "meta.json", "prepared-data metadata")
    wanted = {"inputs": [str(Path(p).resolve()) for p in inputs], **settings}
    if "vocab_size" in wanted:
        wanted["vocab_size_requested"] = wanted.pop("vocab_size")
    differ = [f"{k} {meta.get(k)!r} there, {v!r} asked" for k, v in wanted.items() if meta.get(k, v) != v]
    if differ:
        raise DwmlError(f"{prepared}: prepared with other settings ({'; '.join(differ)}); choose a new output "
                        f"directory, or restore the settings")


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    valid_fraction: float = 0.02,
    seed: int = 0,
    lowercase: bool = False,
    min_frequency: int = 2,
    max_docs: int | None = None,
    dtype: str | None = None,
    model_max_length: int = DEFAULT_MAX_LENGTH,
    errors: str = "strict",
    speaker_tags: bool = False,
    overwrite: bool = False,
) -> dict:
    """Read + clean -> split -> train the tokenizer on train only -> shards, text, meta.json. Returns meta.json.

    `out_dir` must be new, empty or a previous `dwml prepare` output (else `overwrite`), and never an input or
    inside one (see `io.check_output_dir`)."""
    t_start = time.perf_counter()
    check_vocab_size(vocab_size)
    check_max_length(model_max_length)
    dtype_for_vocab(vocab_size, dtype)  # fail before any work if a forced dtype cannot hold the vocabulary
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise DwmlError("inputs: expected at least one corpus file or directory")
    check_output_dir(out_dir, "prepare", inputs=inputs, overwrite=overwrite)
    files, skipped, broken = discover_files(inputs)
    docs = read_corpus(files, errors=errors, max_docs=max_docs, speaker_tags=speaker_tags)
    train, valid = split_documents(docs, valid_fraction=valid_fraction, seed=seed)
    t_read = time.perf_counter()

    tok = train_tokenizer((d.text for d in train), vocab_size=vocab_size, min_frequency=min_frequency,
                          lowercase=lowercase)
    actual_vocab = tok.get_vocab_size()
    t_tok = time.perf_counter()

    out_dir = Path(out_dir)
    splits: dict[str, dict] = {}
    with atomic_dir(out_dir, command="prepare") as tmp:
        save_tokenizer(tok, tmp / "tokenizer", model_max_length=model_max_length)
        for name, split_docs in zip(SPLITS, (train, valid)):
            write_text(tmp / f"{name}.txt", "".join(d.text + "\n" for d in split_docs))
            tokens, offsets = encode_documents(tok, [d.text for d in split_docs],
                                               dtype=dtype_for_vocab(actual_vocab, dtype))
            lengths = offsets[1:] - offsets[:-1]
            stats = _split_stats(split_docs, lengths)
            ranges, first = [], 0
            for source, group in group_by_source(split_docs).items():
                ranges.append({"name": source, "first_doc": first, "n_docs": len(group)})
                first += len(group)
            header = write_shard(tmp, name, tokens, offsets, vocab_size=actual_vocab, dtype=dtype, sources=ranges)
            splits[name] = stats
            if name == "train":
                entropy = unigram_entropy(tokens, actual_vocab)
        t_shards = time.perf_counter()
        meta = {
            "format": META_FORMAT,
            "vocab_size": actual_vocab,
            "vocab_size_requested": vocab_size,
            "dtype": header["dtype"],
            "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
            "lowercase": lowercase,
            "min_frequency": min_frequency,
            "seed": seed,
            "valid_fraction": valid_fraction,
            "max_docs": max_docs,
            "speaker_tags": speaker_tags,
            "model_max_length": model_max_length,
            "inputs": [str(Path(p).resolve()) for p in inputs],
            "files": [str(f) for f in files],
            "skipped_dirs": [str(s) for s in skipped],
            "skipped_links": [str(s) for s in broken],
            "tokenizer": "tokenizer",
            "tokenizer_sha256": tokenizer_fingerprint(tmp / "tokenizer"),  # checked before training and at export
            "splits": splits,
            # nats over the train split's document tokens, i.e. the labels MLM predicts (no specials): the loss of
            # a model that knows token frequencies only (dwml.training.plateau)
            "unigram_entropy": entropy,
            "timings_s": {
                "read_clean_split": round(t_read - t_start, 3),
                "train_tokenizer": round(t_tok - t_read, 3),
                "encode_write": round(t_shards - t_tok, 3),
            },
        }
        write_json(tmp / "meta.json", meta)
    meta["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    return meta


def format_summary(meta: dict) -> str:
    """A small table: docs / words / tokens per split and source."""
    rows = [("split", "source", "docs", "words", "tokens")]
    for split, stats in meta["splits"].items():
        for source, s in stats["sources"].items():
            rows.append((split, source, f"{s['docs']:,}", f"{s['words']:,}", f"{s['tokens']:,}"))
        rows.append((split, "TOTAL", f"{stats['docs']:,}", f"{stats['words']:,}", f"{stats['tokens']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"vocab {meta['vocab_size']} ({meta['dtype']}), lowercase={meta['lowercase']}, "
                 f"{len(meta['files'])} file(s)")
    if "unigram_entropy" in meta:
        lines.append(f"unigram entropy of the train split: {meta['unigram_entropy']:.3f} nats (the loss of a model "
                     f"that knows token frequencies only)")
    for s in meta.get("skipped_dirs", []):
        lines.append(f"skipped {s} (its parent holds corpus files; name it explicitly to include it)")
    for s in meta.get("skipped_links", []):
        lines.append(f"skipped {s} (a symbolic link whose target is missing, or a link loop)")
    if "timings_s" in meta:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in meta["timings_s"].items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    inputs = args.inputs or [default_corpus_path()]
    meta = prepare(
        inputs,
        args.out,
        vocab_size=args.vocab_size,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
        lowercase=args.lowercase,
        min_frequency=args.min_frequency,
        max_docs=args.max_docs,
        dtype=args.dtype,
        model_max_length=args.max_length,
        errors="replace" if args.on_bad_utf8 == "replace" else "strict",
        speaker_tags=args.speaker_tags,
        overwrite=args.overwrite,
    )
    print(format_summary(meta))
    if meta["vocab_size"] < meta["vocab_size_requested"]:
        print(f"note: vocabulary clamped: --vocab-size {meta['vocab_size_requested']} requested, but the corpus "
              f"yields only {meta['vocab_size']} tokens (every merge with frequency >= {meta['min_frequency']})",
              file=sys.stderr)
    print(f"wrote {Path(args.out)}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help="clean a corpus, train the BPE tokenizer and write token shards",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="corpus files or directories (default: ../shared/data/corpus)")
    p.add_argument("--out", required=True,
                   help="output directory (replaced atomically; must be new, empty or an earlier prepare output)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is an existing directory that dwml prepare did not write")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--valid-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lowercase", action="store_true", help="lowercase inside the tokenizer's normalizer")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair frequency for a merge")
    p.add_argument("--speaker-tags", action="store_true",
                   help='keep dialogue speaker tags as "A: text" (the form of the supplement\'s dialogues) '
                        'instead of removing them')
    p.add_argument("--max-docs", type=int, default=None, help="keep about N documents (a prefix of each source)")
    p.add_argument("--dtype", choices=("uint16", "uint32"), default=None, help="force the shard dtype")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokenizer model_max_length")
    p.add_argument("--on-bad-utf8", choices=("error", "replace"), default="error",
                   help="invalid UTF-8 input: fail (default) or replace with U+FFFD")
    p.set_defaults(func=run)
    return p

