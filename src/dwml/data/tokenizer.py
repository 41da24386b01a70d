"""Byte-level BPE tokenizer (RoBERTa conventions), trained locally and saved as a Hugging Face fast tokenizer.

All text normalisation (NFKC, optional lowercasing) lives INSIDE the tokenizer's normalizer, never in a separate
preprocessing step, so whoever loads the folder - `AutoTokenizer.from_pretrained(dir)` in an evaluation harness, or
`tokenizers.Tokenizer.from_file` - tokenises exactly as training did.

Saved folders load in transformers 4.x (BabyLM's pipeline pins 4.51.3) and 5.x alike, with identical ids. Two
pitfalls decide the format:
- transformers 5.x: a folder whose `tokenizer_config.json` names `RobertaTokenizer` (or names no class and sits next
  to a RoBERTa `config.json`, as a saved model folder does) is rebuilt from vocab + merges by the RoBERTa class, which
  has no normalizer: lowercasing and NFKC are silently lost at evaluation time.
- transformers 4.x: `TokenizersBackend`, the name transformers 5's `save_pretrained` writes for the generic class,
  does not exist there ("Tokenizer class TokenizersBackend does not exist").
We therefore write `tokenizer_config.json` ourselves, naming `PreTrainedTokenizerFast` (the generic class in 4.x; an
alias of `TokenizersBackend` in 5.x), which runs `tokenizer.json` verbatim in both, and name it as `processor_class`
too, so that `AutoProcessor` (what BabyLM's pipeline calls) finds a tokenizer even in a folder without a model
`config.json`. `load_tokenizer` checks that the loaded pipeline still carries the saved normalizer.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..errors import DwmlError
from ..io import read_json, write_json

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
N_SPECIAL = len(SPECIAL_TOKENS)
N_BYTES = 256  # byte-level BPE starts from all 256 bytes
MIN_VOCAB_SIZE = N_SPECIAL + N_BYTES
DEFAULT_MAX_LENGTH = 128  # = the model's max_positions (130) - POSITION_OFFSET (2)
# The transformers class written into tokenizer_config.json: runs tokenizer.json as saved in 4.x and 5.x.
HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


# Documents longer than this many characters are tokenised in pieces: the tokenizers library holds per-character
# bookkeeping for a whole input at once (a 6 MB line needs ~0.5 GB to train on and ~1 GB to encode, 50 MB lines
# ~10 GB), so one huge line must not be one input. Pieces are cut before a space that starts a word, which is a
# pre-tokenizer boundary anyway, so the ids are the same as for the whole document (see `text_pieces`).
MAX_PIECE_CHARS = 1 << 14


def text_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters whose tokenisations concatenate to the whole's.

    Cuts fall right before a space followed by a non-space character: the byte-level pre-tokenizer always starts a
    new pre-token there (" word", " 42", " !"), so no pre-token spans a cut and BPE (which merges only inside
    pre-tokens) gives the same ids. Text without such a space in a whole window (e.g. 16k characters of one "word")
    is cut hard; only the few tokens at such a cut can differ from encoding the whole.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start, n = [], 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + 1, end)
        while cut > start and text[cut + 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def check_max_length(model_max_length: int) -> None:
    """The tokenizer's model_max_length: at least <s>, one token and </s>."""
    if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 3:
        raise DwmlError(f"--max-length: expected an integer >= 3 (<s>, a token, </s>), got {model_max_length!r}")


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise DwmlError(
            f"vocab_size: expected an integer >= {MIN_VOCAB_SIZE} (5 special tokens + 256 bytes), got {vocab_size!r}"
        )


def build_tokenizer(lowercase: bool = False) -> Tokenizer:
    """The untrained pipeline: NFKC[+lowercase] normalizer, byte-level pre-tokenizer/decoder, empty BPE model."""
    tok = Tokenizer(models.BPE())
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    # add_prefix_space=False as in RoBERTa: a sentence's first word is encoded without a leading space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _special_tokens() -> list[AddedToken]:
    # <mask> absorbs the space before it (as in RoBERTa), so "the <mask> sat" masks the token " cat".
    return [AddedToken(t, special=True, lstrip=(t == "<mask>"), normalized=False) for t in SPECIAL_TOKENS]


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 8192, min_frequency: int = 2, lowercase: bool = False
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; specials get ids 0..4 and `<s> ... </s>` is added on encode."""
    check_vocab_size(vocab_size)
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise DwmlError(f"min_frequency: expected a positive integer, got {min_frequency!r}")
    tok = build_tokenizer(lowercase)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((p for text in texts for p in text_pieces(text)), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", EOS_ID), ("<s>", BOS_ID), trim_offsets=True, add_prefix_space=False
    )
    return tok


def tokenizer_config(model_max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """tokenizer_config.json: the generic class and RoBERTa's special tokens, valid in transformers 4.x and 5.x."""
    return {
        "tokenizer_class": HF_TOKENIZER_CLASS,
        "processor_class": HF_TOKENIZER_CLASS,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "model_max_length": model_max_length,
        "padding_side": "right",
        # Byte-level BPE decodes to the exact text; the clean-up would turn "a ." into "a.".
        "clean_up_tokenization_spaces": False,
    }


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, *, model_max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    """Write a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) loadable by AutoTokenizer and
    AutoProcessor in transformers 4.x and 5.x; the files do not depend on the installed transformers version."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(model_max_length))
    return out_dir


def copy_tokenizer(src: str | Path, out_dir: str | Path, *, line_ends: bool = False) -> Path:
    """Re-write the tokenizer of folder `src` into `out_dir` in the format above (also repairs folders written by
    older dwml versions, whose config named the transformers-5-only `TokenizersBackend`); with `line_ends`, as
    `with_line_ends` has it."""
    src = Path(src)
    config_path = src / "tokenizer_config.json"
    config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH) if isinstance(config, dict) else None
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise DwmlError(f"{config_path}: model_max_length: expected a positive integer, got {max_length!r}")
    tok = load_raw(src)
    return save_tokenizer(with_line_ends(tok) if line_ends else tok, out_dir, model_max_length=max_length)


# A line break, with the spaces around it, as the normalizer's last step writes it: "</s>", which the added </s> (then
# matched in the normalized text) turns into its id. See `with_line_ends`.
LINE_END = {"type": "Replace", "pattern": {"Regex": r"\s*\n\s*"}, "content": SPECIAL_TOKENS[EOS_ID]}


def with_line_ends(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that reads a line break as </s>: "What did you get?\nI got a chair." becomes
    `<s> What did you get? </s> I got a chair. </s>`, the form in which a model trained with data.separator = "eos"
    saw every pair of consecutive lines of its corpus (one document per line, each ended by </s>).

    Without it such a model meets the byte-level newline token (never in its input: `dwml prepare` reads documents
    line by line) in the middle of the BabyLM supplement's dialogue pairs, where an untrained embedding stands between
    question and answer. Text without a line break tokenises exactly as before (the step only matches "\n"), so
    nothing the model was trained on changes. Idempotent."""
    spec = json.loads(tok.to_str())
    steps = (spec.get("normalizer") or {"type": "Sequence", "normalizers": []})
    steps = steps.get("normalizers", []) if steps.get("type") == "Sequence" else [steps]
    if LINE_END not in steps:
        steps = [*steps, LINE_END]
    spec["normalizer"] = {"type": "Sequence", "normalizers": steps}
    for t in spec.get("added_tokens", []):
        if t["id"] == EOS_ID:
            t["normalized"] = True  # matched after the normalizer, so the "</s>" it writes becomes the token
    return Tokenizer.from_str(json.dumps(spec))


def reads_line_ends(path: str | Path) -> bool:
    """Whether the saved tokenizer at `path` (a folder or its tokenizer.json) reads a line break as </s>
    (`with_line_ends`); False for a folder without tokenizer.json (not a dwml tokenizer)."""
    path = Path(path)
    if not (path / "tokenizer.json" if path.is_dir() else path).is_file():
        return False
    return load_raw(path).encode("a\nb", add_special_tokens=False).ids[1:2] == [EOS_ID]


def load_raw(path: str | Path) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a saved folder (or a tokenizer.json file)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DwmlError(f"{file}: tokenizer file not found (expected a folder written by `dwml prepare`)")
    return Tokenizer.from_file(str(file))


def newline_id(path: str | Path) -> int:
    """The id of the token a saved tokenizer gives "\n" alone (the byte-level "Ċ"): the utterance separator of
    `data.separator = "newline"`. Fails unless "\n" is exactly one token."""
    ids = load_raw(path).encode("\n", add_special_tokens=False).ids
    if len(ids) != 1:
        raise DwmlError(f"{path}: the tokenizer splits a newline into {len(ids)} tokens {ids}; data.separator = "
                        "\"newline\" needs exactly one")
    return ids[0]


def load_tokenizer(path: str | Path, *, line_ends: bool = False):
    """`AutoTokenizer.from_pretrained(path)`, checked to run the saved normalizer (see the module docstring); with
    `line_ends`, the tokenizer `with_line_ends` makes of it."""
    from transformers import AutoTokenizer

    path = Path(path)
    if line_ends and not reads_line_ends(path):
        with tempfile.TemporaryDirectory(prefix="dwml-tokenizer-") as tmp:  # loaded into memory: the files can go
            return load_tokenizer(copy_tokenizer(path, tmp, line_ends=True))
    raw = load_raw(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    saved = json.loads(raw.to_str()).get("normalizer")
    loaded = json.loads(hf.backend_tokenizer.to_str()).get("normalizer")
    if saved != loaded:
        raise DwmlError(
            f"{path}: AutoTokenizer loaded {type(hf).__name__} without the saved normalizer {saved}; "
            f"set \"tokenizer_class\": \"{HF_TOKENIZER_CLASS}\" in tokenizer_config.json"
        )
    if hf.mask_token_id != MASK_ID or hf.pad_token_id != PAD_ID:
        raise DwmlError(
            f"{path}: expected <mask>={MASK_ID} and <pad>={PAD_ID}, got {hf.mask_token_id} and {hf.pad_token_id}"
        )
    probe = "a\nb </s>"  # re-registered special tokens would lose the line-end reading (`with_line_ends`)
    if hf(probe)["input_ids"] != raw.encode(probe).ids:
        raise DwmlError(f"{path}: AutoTokenizer does not tokenise {probe!r} as the saved tokenizer.json does")
    return hf
