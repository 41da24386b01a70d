"""Sentences/s of the batched PLL scorer vs the naive one-masked-copy-at-a-time scorer, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_scorer.py [--sentences 100] [--method pll] [--device cpu]

Model: the `tiny` preset (2 layers, hidden 128, vocabulary 8192), randomly initialised - scoring cost does not depend
on the weights. Tokenizer: byte-level BPE with RoBERTa specials trained here on real corpus lines. Sentences: real
BLiMP sentences (good and bad) from blimp_fast, a few pairs from every paradigm. Also checks the two scorers agree.
"batched" includes tokenisation and building the masked copies (cache cleared before every repeat); "cached" is the
same call when another model already scored these texts (the peers / ensemble of one `dwml eval`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from dwml.models.model import build_model, get_preset
from dwml.evaluation.scoring import METHODS, clear_copy_cache, score_sentences, score_sentences_naive

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def train_tokenizer(vocab_size: int, n_lines: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = []
    for rel in ("childes_aochildes_transcripts/aochildes_cds_gloss.txt",
                "babylm_2023_test_partial/children_stories.test"):
        with (DATA / "corpus" / rel).open(encoding="utf-8") as f:
            lines += [line.strip() for line in itertools.islice(f, n_lines)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def blimp_sentences(n: int) -> list[str]:
    files = sorted((DATA / "eval" / "blimp_fast").glob("*.jsonl"))
    per_file = max(1, -(-n // (2 * len(files))))
    out: list[str] = []
    for path in files:
        with path.open(encoding="utf-8") as f:
            for line in itertools.islice(f, per_file):
                row = json.loads(line)
                out += [row["sentence_good"], row["sentence_bad"]]
    return out[:n]


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=100)
    ap.add_argument("--method", choices=METHODS, default="pll")
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="best of N for the batched scorer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    arch = get_preset("tiny")
    tokenizer = train_tokenizer(arch.vocab_size, n_lines=8_000)
    model = build_model(arch.replace(vocab_size=len(tokenizer)), seed=0).eval().to(args.device)
    sentences = blimp_sentences(args.sentences)
    n_tokens = sum(len(tokenizer(s, add_special_tokens=False).input_ids) for s in sentences)
    kw = dict(method=args.method, device=args.device)

    score_sentences(model, tokenizer, sentences[:8], token_budget=args.token_budget, **kw)  # warm-up
    score_sentences_naive(model, tokenizer, sentences[:2], **kw)
    batched = lambda: score_sentences(model, tokenizer, sentences, token_budget=args.token_budget, **kw)  # noqa: E731
    t_batched, fast = timed(lambda: (clear_copy_cache(), batched())[1], args.repeats)
    t_cached, _ = timed(batched, args.repeats)
    t_naive, slow = timed(lambda: score_sentences_naive(model, tokenizer, sentences, **kw), 1)
    diff = max(abs(a - b) for a, b in zip(fast, slow))

    print(f"model {arch.name} V={len(tokenizer)} | {len(sentences)} BLiMP sentences, {n_tokens} masked copies | "
          f"method {args.method} | device {args.device} | torch threads {torch.get_num_threads()}")
    print(f"naive   : {t_naive:8.3f} s  {len(sentences) / t_naive:9.1f} sentences/s")
    print(f"batched : {t_batched:8.3f} s  {len(sentences) / t_batched:9.1f} sentences/s")
    print(f"cached  : {t_cached:8.3f} s  {len(sentences) / t_cached:9.1f} sentences/s   (copies already built)")
    print(f"speed-up: {t_naive / t_batched:.1f}x, cached {t_naive / t_cached:.1f}x   "
          f"(max |score difference| {diff:.2e})")


if __name__ == "__main__":
    main()
