"""Byte-level BPE tokenizer (RoBERTa conventions), trained locally and saved as a Hugging Face fast tokenizer.

All text normalisation (NFKC, optional lowercasing) lives INSIDE the tokenizer's normalizer, never in a separate
preprocessing step, so whoever loads the folder - `AutoTokenizer.from_pretrained(dir)` in an evaluation harness, or
`tokenizers.Tokenizer.from_file` - tokenises exactly as training did.

transformers 5.x pitfall: a tokenizer folder whose `tokenizer_config.json` names `RobertaTokenizer` (or names no class
and sits next to a RoBERTa `config.json`, as a saved model folder does) is rebuilt from vocab + merges by the RoBERTa
class, which has no normalizer: lowercasing and NFKC are silently lost at evaluation time. We therefore always save
with the generic class (`TokenizersBackend`, a.k.a. `PreTrainedTokenizerFast`), which runs `tokenizer.json` verbatim,
and `load_tokenizer` checks that the loaded pipeline still carries the saved normalizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .errors import DwmlError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
N_SPECIAL = len(SPECIAL_TOKENS)
N_BYTES = 256  # byte-level BPE starts from all 256 bytes
MIN_VOCAB_SIZE = N_SPECIAL + N_BYTES
DEFAULT_MAX_LENGTH = 128  # = the model's max_positions (130) - POSITION_OFFSET (2)
# transformers classes that run tokenizer.json as saved (5.x name, 4.x name).
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


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


def to_hf(tok: Tokenizer, model_max_length: int = DEFAULT_MAX_LENGTH):
    """Wrap a trained `tokenizers.Tokenizer` as a transformers fast tokenizer with RoBERTa special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, *, model_max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    """Save as a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) loadable by AutoTokenizer."""
    out_dir = Path(out_dir)
    hf = to_hf(tok, model_max_length)
    hf.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in GENERIC_CLASSES:
        raise DwmlError(f"{config_path}: unexpected tokenizer_class {config.get('tokenizer_class')!r}")
    return out_dir



def load_raw(path: str | Path) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a saved folder (or a tokenizer.json file)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DwmlError(f"{file}: tokenizer file not found (expected a folder written by `dwml prepare`)")
    return Tokenizer.from_file(str(file))


def load_tokenizer(path: str | Path):
    """`AutoTokenizer.from_pretrained(path)`, checked to run the saved normalizer (see the module docstring)."""
    from transformers import AutoTokenizer

    path = Path(path)
    raw = load_raw(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    saved = json.loads(raw.to_str()).get("normalizer")
    loaded = json.loads(hf.backend_tokenizer.to_str()).get("normalizer")
    if saved != loaded:
        raise DwmlError(
            f"{path}: AutoTokenizer loaded {type(hf).__name__} without the saved normalizer {saved}; "
            f"set \"tokenizer_class\": \"TokenizersBackend\" in tokenizer_config.json"
        )
    if hf.mask_token_id != MASK_ID or hf.pad_token_id != PAD_ID:
        raise DwmlError(
            f"{path}: expected <mask>={MASK_ID} and <pad>={PAD_ID}, got {hf.mask_token_id} and {hf.pad_token_id}"
        )
    return hf
