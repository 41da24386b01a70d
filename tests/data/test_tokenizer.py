from __future__ import annotations

import json
import random

import pytest
from transformers import AutoProcessor, AutoTokenizer, RobertaConfig

from dwml.errors import DwmlError
from dwml.data.tokenizer import (
    MASK_ID,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    copy_tokenizer,
    load_raw,
    load_tokenizer,
    reads_line_ends,
    save_tokenizer,
    train_tokenizer,
    with_line_ends,
)

WORDS = "the a cat dog sat on mat big small red ran jumped house tree girl boy saw with and it is was".split()

# Text that NFKC changes (full-width, ligatures, circled digits, fractions, compatibility spaces, decomposed
# accents), mixed case, emoji, a literal <mask> and an unseen script.
PROBES = [
    "The Cat sat on the Mat.",
    "THE BIG RED DOG RAN HOME!",
    "Ｔｈｅ ｃａｔ ﬁnds ﬂowers \u2460\u2461 \u00bd cup",
    "Cafe\u0301 na\u00efve \u212b\u00c5 \u2126 \u00b5",
    "tab\tand\u3000ideographic space, non\u00a0breaking",
    "emoji \U0001F600 and \u4e2d\u6587 and \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "the <mask> sat on the mat",
    "ǅungla İstanbul ΣΊΣΥΦΟΣ ß",
    "",
    " leading and trailing spaces ",
]


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!"]))
    return lines


@pytest.fixture(scope="module", params=[False, True], ids=["cased", "lowercase"])
def saved(request, tmp_path_factory):
    tok = train_tokenizer(corpus(), vocab_size=400, min_frequency=2, lowercase=request.param)
    out = save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer", model_max_length=128)
    return request.param, tok, out


def test_specials_and_vocab(saved):
    _, tok, _ = saved
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert MIN_VOCAB_SIZE < tok.get_vocab_size() <= 400
    enc = tok.encode("the cat")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2 and len(enc.ids) > 2


def test_saved_files(saved):
    """The folder names the generic class that exists in transformers 4.x and 5.x (not 5.x's TokenizersBackend),
    also as processor_class (AutoProcessor), and RoBERTa's special tokens; tokenizer.json is the trained pipeline."""
    _, tok, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == config["processor_class"] == "PreTrainedTokenizerFast"
    assert {k: config[k] for k in ("bos_token", "eos_token", "cls_token", "sep_token", "unk_token", "pad_token",
                                   "mask_token")} == {
        "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "mask_token": "<mask>"}
    assert config["model_max_length"] == 128
    assert json.loads((path / "tokenizer.json").read_text()) == json.loads(tok.to_str())


@pytest.mark.parametrize("loader", [AutoTokenizer, AutoProcessor], ids=["AutoTokenizer", "AutoProcessor"])
def test_autotokenizer_parity(saved, loader):
    lowercase, tok, path = saved
    hf = loader.from_pretrained(str(path))
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")  # one class in 5.x, two names
    for text in PROBES + corpus(50, seed=1):
        assert hf(text)["input_ids"] == tok.encode(text).ids, text
    assert hf(PROBES)["input_ids"] == [e.ids for e in tok.encode_batch(PROBES)]
    assert hf.mask_token_id == MASK_ID and hf.pad_token_id == 1 and hf.bos_token_id == 0 and hf.eos_token_id == 2
    assert hf.model_max_length == 128
    assert json.loads(hf.backend_tokenizer.to_str())["normalizer"] == json.loads(tok.to_str())["normalizer"]
    text = "The dog ran . Then , it sat !"
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == (text.lower() if lowercase else text)


def test_copy_tokenizer_repairs_old_folders(saved, tmp_path):
    """Folders written by transformers 5's save_pretrained name `TokenizersBackend`; copying rewrites them."""
    _, tok, path = saved
    old = tmp_path / "old"
    save_tokenizer(load_raw(path), old, model_max_length=64)
    config = json.loads((old / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    del config["processor_class"]
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    copy_tokenizer(old, tmp_path / "new")
    new = json.loads((tmp_path / "new" / "tokenizer_config.json").read_text())
    assert new["tokenizer_class"] == new["processor_class"] == "PreTrainedTokenizerFast"
    assert new["model_max_length"] == 64
    assert (tmp_path / "new" / "tokenizer.json").read_text() == (old / "tokenizer.json").read_text()
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": "long"}))
    with pytest.raises(DwmlError, match="model_max_length"):
        copy_tokenizer(old, tmp_path / "bad")


def test_normalisation_survives_loading(saved):
    lowercase, tok, path = saved
    hf = AutoTokenizer.from_pretrained(str(path))
    ids = lambda t: hf(t)["input_ids"]  # noqa: E731
    # NFKC: full-width letters and ligatures tokenise like their ASCII forms.
    assert ids("Ｔｈｅ ﬁnal") == ids("The final")
    if lowercase:
        assert ids("THE CAT SAT.") == ids("the cat sat.")
        assert tok.normalizer.normalize_str("ÀB") == "àb"
    else:
        assert ids("THE CAT SAT.") != ids("the cat sat.")


def test_parity_inside_a_model_folder(saved, tmp_path):
    """A model folder (RoBERTa config.json next to the tokenizer files) must still load our pipeline.

    transformers 5 builds RobertaTokenizer from vocab+merges for such folders unless tokenizer_config.json names
    the generic class - dropping NFKC/lowercasing at evaluation time (the reference implementation's bug)."""
    lowercase, tok, path = saved
    folder = tmp_path / "model"
    save_tokenizer(load_raw(path), folder, model_max_length=128)
    RobertaConfig(vocab_size=tok.get_vocab_size()).save_pretrained(str(folder))
    hf = load_tokenizer(folder)
    for text in PROBES:
        assert hf(text)["input_ids"] == tok.encode(text).ids
    # The failure mode load_tokenizer guards against, reproduced by naming the RoBERTa class:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "RobertaTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DwmlError, match="normalizer"):
        load_tokenizer(folder)


def test_decode_roundtrip_and_mask_lstrip(saved):
    lowercase, tok, path = saved
    text = "The red dog jumped on the big house!"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == (text.lower() if lowercase else text)
    # "<mask>" absorbs the space before it, as RoBERTa's does: "the <mask>" = "the" + <mask>.
    masked = tok.encode("the <mask> sat", add_special_tokens=False).ids
    assert masked[:2] == tok.encode("the", add_special_tokens=False).ids + [MASK_ID]


def test_bad_settings():
    with pytest.raises(DwmlError, match="vocab_size.*261"):
        train_tokenizer(corpus(10), vocab_size=260)
    with pytest.raises(DwmlError, match="min_frequency"):
        train_tokenizer(corpus(10), vocab_size=300, min_frequency=0)


@pytest.mark.parametrize("loader", [AutoTokenizer, AutoProcessor], ids=["AutoTokenizer", "AutoProcessor"])
def test_line_ends_read_a_line_break_as_eos(saved, tmp_path, loader):
    """An exported tokenizer of an eos-separator run reads "\n" (and the spaces around it) as </s>: the form of
    two consecutive corpus lines in training; every text without a line break keeps its ids exactly."""
    _, tok, path = saved
    lines = with_line_ends(tok)
    plain = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    q, a = "the cat sat on the mat?", "a dog ran."
    want = [0, *plain(q), 2, *plain(a), 2]
    for text in (f"{q}\n{a}", f"{q} \n  {a}", f"{q}\r\n{a}"):
        assert lines.encode(text).ids == want, text
    assert lines.encode(f"{q}\n\n{a}").ids == want  # one line end however many breaks
    assert tok.encode(f"{q}\n{a}").ids != want  # the prepared tokenizer: the byte-level newline token
    for text in PROBES + corpus(200, seed=2):
        assert lines.encode(text).ids == tok.encode(text).ids, text
    enc = lines.encode(f"{q}\n{a}")  # the </s> spans the line break's characters (BabyLM's pipeline scores it)
    assert enc.offsets[enc.ids.index(2)] == (len(q), len(q) + 1)
    assert with_line_ends(lines).to_str() == lines.to_str()  # idempotent
    out = copy_tokenizer(path, tmp_path / "lines", line_ends=True)
    assert reads_line_ends(out) and not reads_line_ends(path) and not reads_line_ends(tmp_path / "nothing")
    hf = loader.from_pretrained(str(out))  # transformers keeps the reading (checked by load_tokenizer too)
    assert hf(f"{q}\n{a}")["input_ids"] == want
    assert load_tokenizer(path, line_ends=True)(f"{q}\n{a}")["input_ids"] == want
    assert load_tokenizer(path)(f"{q}\n{a}")["input_ids"] == tok.encode(f"{q}\n{a}").ids
