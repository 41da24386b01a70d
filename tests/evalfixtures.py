"""Small shared fixtures for the evaluation tests: a byte-level BPE tokenizer trained on the fly on real corpus lines
(RoBERTa specials <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), tiny random RoBERTa models, and paths to the shared data."""
from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EVAL_DATA = DATA / "eval"
CORPUS_FILE = DATA / "corpus" / "childes_aochildes_transcripts" / "aochildes_cds_gloss.txt"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def corpus_lines(n: int = 400) -> list[str]:
    with CORPUS_FILE.open(encoding="utf-8") as f:
        return [line.strip() for line in itertools.islice(f, n) if line.strip()]


def blimp_sentences(n_pairs: int = 10, files: int = 2) -> list[str]:
    """Real BLiMP sentences (good and bad) from the first `files` blimp_fast paradigms."""
    out = []
    for path in sorted((EVAL_DATA / "blimp_fast").glob("*.jsonl"))[:files]:
        with path.open(encoding="utf-8") as f:
            for line in itertools.islice(f, n_pairs):
                row = json.loads(line)
                out += [row["sentence_good"], row["sentence_bad"]]
    return out


@functools.lru_cache(maxsize=4)
def make_tokenizer(vocab_size: int = 600, n_lines: int = 400):
    """A RoBERTa-style fast tokenizer; a small vocabulary splits many words into several pieces (useful for l2r)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(n_lines) + blimp_sentences(5, 4), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def make_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 2):
    from dwml.models.model import Arch, build_model

    arch = Arch(layers=layers, heads=heads, hidden=hidden, intermediate=4 * hidden, vocab_size=len(tokenizer),
                max_positions=130)
    return build_model(arch, seed=seed).eval()


def save_run(run_dir: Path, tokenizer, seeds: list[int], omega: list[float]) -> Path:
    """A minimal DWML run layout: RUN/final/peer{i}/ (HF folders) + RUN/final/summary.json."""
    final = run_dir / "final"
    for i, seed in enumerate(seeds):
        make_model(tokenizer, seed=seed).save_pretrained(final / f"peer{i}")
        tokenizer.save_pretrained(final / f"peer{i}")
    summary = {"method": "dwml", "omega": omega, "peers": [{"name": f"peer{i}"} for i in range(len(seeds))]}
    (final / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run_dir
