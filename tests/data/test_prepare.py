from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

import dwml.data.prepare as prep
from dwml.errors import DwmlError
from dwml.data.prepare import default_corpus_path, format_summary, prepare, register
from dwml.data.shards import load_meta
from dwml.data.shards import Shard
from dwml.data.tokenizer import load_raw, train_tokenizer

from conftest import TINY_SLICE, TINY_VOCAB
from runfixtures import synthetic_corpus


def test_tiny_prepared_layout(tiny_prepared):
    meta = load_meta(tiny_prepared)
    for name in ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "train.txt", "valid.txt",
                 "train.bin", "train.idx.npy", "train.json", "valid.bin", "valid.idx.npy", "valid.json"):
        assert (tiny_prepared / name).is_file(), name
    assert meta["vocab_size"] == TINY_VOCAB == len(AutoTokenizer.from_pretrained(str(tiny_prepared / "tokenizer")))
    assert meta["dtype"] == "uint16" and not meta["lowercase"]
    sources = {rel.split("/")[-1].split(".")[0] for rel, _ in TINY_SLICE}
    for split in ("train", "valid"):
        stats = meta["splits"][split]
        shard = Shard(tiny_prepared, split)
        lines = (tiny_prepared / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert stats["tokens"] == shard.n_tokens and stats["docs"] == shard.n_docs == len(lines) > 0
        assert stats["words"] == sum(len(line.split()) for line in lines)
        assert set(stats["sources"]) == sources  # every source is in both splits
        assert sum(s["tokens"] for s in stats["sources"].values()) == stats["tokens"]
        # Shard header ranges agree with meta's per-source counts.
        assert {r["name"]: r["n_docs"] for r in shard.header["sources"]} == {
            k: v["docs"] for k, v in stats["sources"].items()}
    share = meta["splits"]["valid"]["docs"] / (meta["splits"]["valid"]["docs"] + meta["splits"]["train"]["docs"])
    assert 0.01 < share < 0.04
    # Real data was cleaned: no switchboard speaker tags, no CBT title lines.
    train_text = (tiny_prepared / "train.txt").read_text(encoding="utf-8")
    assert "A:\t" not in train_text and "_BOOK_TITLE_" not in train_text
    assert "tiny" not in format_summary(meta) and "TOTAL" in format_summary(meta)


def test_tokenizer_is_trained_on_train_split_only(tiny_prepared):
    """BPE training is deterministic: retraining on train.txt alone reproduces the saved tokenizer exactly."""
    lines = (tiny_prepared / "train.txt").read_text(encoding="utf-8").splitlines()
    retrained = train_tokenizer(lines, vocab_size=TINY_VOCAB, min_frequency=2)
    assert retrained.get_vocab() == load_raw(tiny_prepared / "tokenizer").get_vocab()


def test_prepare_is_deterministic_and_lowercase_option(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus")
    a = prepare([corpus], tmp_path / "a", vocab_size=300, seed=4)
    b = prepare([corpus], tmp_path / "b", vocab_size=300, seed=4)
    for name in ("train.bin", "valid.bin", "train.txt", "valid.txt", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["splits"] == b["splits"]
    c = prepare([corpus], tmp_path / "c", vocab_size=300, seed=5)
    assert (tmp_path / "c" / "valid.txt").read_text() != (tmp_path / "a" / "valid.txt").read_text()
    lower = prepare([corpus], tmp_path / "lower", vocab_size=300, lowercase=True)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "lower" / "tokenizer"))
    assert lower["lowercase"] and hf("THE CAT SAT.")["input_ids"] == hf("the cat sat.")["input_ids"]
    assert c["splits"]["train"]["sources"].keys() == {"stories", "switchboard"}
    assert not a["speaker_tags"] and not any(x.startswith(("A: ", "B: ")) for x in (tmp_path / "a" / "train.txt")
                                              .read_text().splitlines())


def test_speaker_tags_option(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    parser = argparse.ArgumentParser(prog="dwml")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", str(corpus), "--out", str(tmp_path / "t"), "--vocab-size", "300",
                              "--speaker-tags"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    plain = prepare([corpus], tmp_path / "p", vocab_size=300)
    assert meta["speaker_tags"] and not plain["speaker_tags"]
    text = {n: (tmp_path / n / "train.txt").read_text().splitlines() for n in ("t", "p")}
    # the same documents in the same split, Switchboard's tagged
    assert sum(x.startswith(("A: ", "B: ")) for x in text["t"]) == meta["splits"]["train"]["sources"][
        "switchboard"]["docs"] > 0
    assert [x[3:] if x.startswith(("A: ", "B: ")) else x for x in text["t"]] == text["p"]
    with pytest.raises(DwmlError, match="speaker_tags False there, True asked"):
        prep.check_reusable(tmp_path / "p", [corpus], speaker_tags=True)


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    corpus = synthetic_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare([corpus], out, vocab_size=300)
    before = (out / "train.bin").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prep, "write_shard", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare([corpus], out, vocab_size=300, seed=9)
    with pytest.raises(OSError):
        prepare([corpus], tmp_path / "fresh", vocab_size=300)
    assert (out / "train.bin").read_bytes() == before  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no temp dirs, no partial "fresh"


def test_user_errors(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus")
    with pytest.raises(DwmlError, match="vocab_size.*261"):
        prepare([corpus], tmp_path / "o", vocab_size=100)
    with pytest.raises(DwmlError, match="uint16.*70000"):
        prepare([corpus], tmp_path / "o", vocab_size=70000, dtype="uint16")
    with pytest.raises(DwmlError, match="missing"):
        prepare([tmp_path / "missing"], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DwmlError, match="empty"):
        prepare([tmp_path / "empty"], tmp_path / "o")
    (corpus / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DwmlError, match=r"latin1\.txt.*byte offset 3"):
        prepare([corpus], tmp_path / "o", vocab_size=300)
    assert not (tmp_path / "o").exists()
    with pytest.raises(DwmlError, match="meta.json"):
        load_meta(tmp_path)


def test_cli(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    parser = argparse.ArgumentParser(prog="dwml")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", str(corpus), "--out", str(tmp_path / "p"), "--vocab-size", "300",
                              "--valid-fraction", "0.05", "--seed", "2", "--max-docs", "200", "--lowercase",
                              "--dtype", "uint32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "switchboard" in printed and "TOTAL" in printed
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["lowercase"] and meta["valid_fraction"] == 0.05
    assert meta["splits"]["train"]["docs"] + meta["splits"]["valid"]["docs"] == 200
    assert (tmp_path / "p" / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    assert np.asarray(Shard(tmp_path / "p", "train").tokens).dtype == np.uint32


def test_default_corpus_path(shared_data, tmp_path, monkeypatch):
    assert default_corpus_path() == (shared_data / "corpus").resolve()
    monkeypatch.chdir(tmp_path)  # found from the package location too
    assert default_corpus_path() == (shared_data / "corpus").resolve()
    monkeypatch.setattr(prep, "__file__", str(tmp_path / "a" / "b" / "c" / "d.py"))
    with pytest.raises(DwmlError, match="default corpus not found"):
        default_corpus_path()


def test_reuse_of_prepared_data_with_other_settings_is_refused(tiny_corpus, tiny_prepared, tmp_path):
    """A demo or experiment directory's data/ is reused only when it was prepared from the same inputs with the
    same settings: another corpus, vocabulary or seed is one line naming the difference."""
    from dwml.data.prepare import check_reusable

    check_reusable(tiny_prepared, [tiny_corpus], vocab_size=TINY_VOCAB, valid_fraction=0.02, seed=0)
    with pytest.raises(DwmlError, match=r"vocab_size_requested 1000 there, 2000 asked"):
        check_reusable(tiny_prepared, [tiny_corpus], vocab_size=2000)
    with pytest.raises(DwmlError, match=r"inputs .* asked"):
        check_reusable(tiny_prepared, [tmp_path], vocab_size=TINY_VOCAB)
    with pytest.raises(DwmlError, match=r"seed 0 there, 1 asked"):
        check_reusable(tiny_prepared, [tiny_corpus], seed=1)
