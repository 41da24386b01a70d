from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from dwml.data.corpus import (
    Document,
    clean_line,
    clean_lines,
    discover_files,
    limit_documents,
    read_corpus,
    read_file,
    rule_for,
    split_documents,
)
from dwml.errors import DwmlError


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)
    return path


# ---------------------------------------------------------------------------------------------------- discovery


def test_discover_recurses_until_a_level_holds_data(tmp_path):
    write(tmp_path / "a" / "one.train", "x\n")
    write(tmp_path / "a" / "SOURCE.txt", "provenance, not data\n")
    write(tmp_path / "a" / "README.md", "no\n")
    write(tmp_path / "b" / "deep" / "two.test", "y\n")
    write(tmp_path / "c" / "export.txt", "z\n")
    write(tmp_path / "c" / "raw" / "export_source.csv.gz", "text\nz\n")
    files, skipped, _ = discover_files([tmp_path])
    assert [f.name for f in files] == ["one.train", "two.test", "export.txt"]
    assert skipped == [tmp_path / "c" / "raw"]
    # Naming the skipped folder (or a file) reads it.
    files, _, _ = discover_files([tmp_path / "c" / "raw", tmp_path / "a" / "one.train"])
    assert [f.name for f in files] == ["export_source.csv.gz", "one.train"]


def test_broken_links_and_link_loops_are_reported_not_skipped_silently(tmp_path):
    """A dangling symlink (named like a data file) and a link back to an enclosing folder are listed in
    `broken_links`, and `dwml prepare`'s summary says so; neither stops the read nor loops."""
    from dwml.data.prepare import format_summary, prepare

    write(tmp_path / "corpus" / "one.train", "The cat sat on the mat.\nA dog ran.\n" * 50)
    (tmp_path / "corpus" / "gone.train").symlink_to(tmp_path / "nowhere.train")
    write(tmp_path / "corpus2" / "sub" / "two.train", "Birds fly.\n" * 50)
    (tmp_path / "corpus2" / "back").symlink_to(tmp_path / "corpus2", target_is_directory=True)
    found = discover_files([tmp_path / "corpus", tmp_path / "corpus2"])
    assert [f.name for f in found.files] == ["one.train", "two.train"]
    assert found.broken_links == [tmp_path / "corpus" / "gone.train", tmp_path / "corpus2" / "back"]
    meta = prepare([tmp_path / "corpus", tmp_path / "corpus2"], tmp_path / "data", vocab_size=300)
    assert meta["skipped_links"] == [str(p) for p in found.broken_links]
    summary = format_summary(meta)
    assert f"skipped {tmp_path / 'corpus' / 'gone.train'} (a symbolic link whose target is missing" in summary


def test_missing_and_empty_inputs_name_the_path(tmp_path):
    with pytest.raises(DwmlError, match="nope"):
        discover_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DwmlError, match="empty"):
        discover_files([tmp_path / "empty"])
    write(tmp_path / "docs" / "notes.md", "x")
    with pytest.raises(DwmlError, match="no corpus files"):
        read_corpus(tmp_path / "docs")
    with pytest.raises(DwmlError, match="not a corpus file"):
        discover_files([tmp_path / "docs" / "notes.md"])


def test_file_with_only_blank_lines_is_an_error(tmp_path):
    f = write(tmp_path / "blank.txt", "\n  \n\t\n")
    with pytest.raises(DwmlError, match="blank.txt"):
        read_corpus([f])


# ---------------------------------------------------------------------------------------------------- reading


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    f = write(tmp_path / "bad.train", b"hello\nab\xffc\n")
    with pytest.raises(DwmlError, match=r"bad\.train.*0xff at byte offset 8"):
        read_file(f)
    g = write(tmp_path / "bad.txt.gz", b"ok\n\xc3(\n")
    with pytest.raises(DwmlError, match=r"bad\.txt\.gz.*byte offset 3 of the decompressed"):
        read_file(g)
    # Replacement is an explicit opt-in.
    assert [d.text for d in read_file(f, errors="replace")] == ["hello", "ab\ufffdc"]


def test_lines_are_documents_blank_lines_dropped_and_source_named(tmp_path):
    f = write(tmp_path / "stories.train", "First  line.\n\n   \nSecond\tline.\r\nThird\n")
    assert read_file(f) == [Document("First line.", "stories"), Document("Second line.", "stories"),
                            Document("Third", "stories")]


def test_switchboard_speaker_tags(tmp_path):
    f = write(tmp_path / "switchboard.train", "A:\tI'm sure they are.\nB:\tUh-huh.\nB:\t\nA:  Yes, A: no\n")
    assert [d.text for d in read_file(f)] == ["I'm sure they are.", "Uh-huh.", "Yes, A: no"]
    # kept: every tag form becomes "A: " (the supplement's), a tag alone is still dropped, "A: " in mid-line stays
    assert [d.text for d in read_file(f, speaker_tags=True)] == ["A: I'm sure they are.", "B: Uh-huh.",
                                                                 "A: Yes, A: no"]


def test_speaker_tags_kept_in_one_form():
    text = "*MOT:\tlook !\n *CHI: \nSp1:\t uh-huh\nA: plain\nNo: way\nA:\t"
    assert clean_lines(text, "childes", speaker_tags=True) == ["MOT: look!", "Sp1: uh-huh", "A: plain", "No: way"]
    assert clean_lines(text, "childes") == ["look!", "uh-huh", "plain", "No: way"]
    # "A: " is a tag only in dialogue sources, and prose is untouched by the option
    assert clean_lines("A: plain\nB: x", "stories", speaker_tags=True) == clean_lines("A: plain\nB: x", "stories")
    assert clean_line("A:\tyes", "cbt", speaker_tags=True) == "A: yes"


def test_generic_normalisation():
    # NFKC (full-width, ligature), zero-width/BOM removal, typographic quotes, whitespace collapse.
    assert clean_line("\ufeffＨｅｌｌｏ\u200b  \u201cwor\ufb01ld\u201d\u00a0 it\u2019s") == 'Hello "worfild" it\'s'
    # A CHAT tier tag and a "X:\t" tag are stripped everywhere; "A: " only in dialogue sources.
    assert clean_line("*MOT:\tlook !") == "look !"
    assert clean_line("A: plain text") == "A: plain text"
    assert clean_line("A: plain text", "switchboard") == "plain text"


@pytest.mark.parametrize(
    "rule, raw, clean",
    [
        ("childes", "look at the bunny+rabbit and Pooh_Bear xxx .", "look at the bunny rabbit and Pooh Bear."),
        ("childes", "what's that ?", "what's that?"),
        ("childes", "yyy", ""),
        ("cbt", "_BOOK_TITLE_ : Andrew_Lang___The_Yellow_Fairy_Book.txt.out", ""),
        ("cbt", "` You can not stay here , ' they said .", '"You can not stay here," they said.'),
        ("cbt", "he did n't know , but the King 's son did .", "he didn't know, but the King's son did."),
        ("wikipedia", "= = Early life = =", ""),
        ("wikipedia", "it is 1 @,@ 000 km ( 1 @.@ 6 mi ) long .", "it is 1,000 km (1.6 mi) long."),
        ("wikipedia", "the sla was identical to apollo 11 ' s .", "the sla was identical to apollo 11's."),
        ("subtitles", "- Where are you going?", "Where are you going?"),
        ("stories", "\u201cHe said \u2018no\u2019 ,\u201d she said .", "\"He said 'no' ,\" she said ."),
    ],
)
def test_source_rules(rule, raw, clean):
    assert clean_line(raw, rule) == clean


def test_rules_are_keyed_by_file_name():
    assert rule_for("switchboard.train") == "switchboard"
    assert rule_for("aochildes.test") == "childes"
    assert rule_for("childes_en_validation_random.csv") == "childes"
    assert rule_for("Bates.csv.gz", columns=["id", "gloss", "speaker_role"]) == "childes"
    assert rule_for("cbt.test") == "cbt"
    assert rule_for("simple_wiki.train") == "wikipedia"
    assert rule_for("gutenberg.train") == "generic"


def test_clean_lines_is_line_local():
    text = "A:\tone .\n\nB:\ttwo ?\n= = x = =\nthree"
    assert clean_lines(text, "childes") == ["one.", "two?", "= = x = =", "three"]
    assert clean_lines(text.split("\n"), "childes") == clean_lines(text, "childes")


def test_csv_inputs(tmp_path):
    gloss = write(
        tmp_path / "t" / "Bates.csv.gz",
        "id,gloss,speaker_role\n1,what's that,Mother\n2,my ball,Target_Child\n3,,Father\n4,\"look, a dog\",Father\n",
    )
    assert [d.text for d in read_file(gloss)] == ["what's that", "look, a dog"]
    assert {d.source for d in read_file(gloss)} == {"Bates"}
    text = write(tmp_path / "t" / "wikipedia_en_validation.csv", 'text\n"a , b ."\nc .\n')
    assert [d.text for d in read_file(text)] == ["a, b.", "c."]
    bad = write(tmp_path / "t" / "other.csv", "id,sentence\n1,x\n")
    with pytest.raises(DwmlError, match=r"other\.csv.*'text' or a 'gloss'"):
        read_file(bad)


def test_real_files_clean(shared_data):
    corpus = shared_data / "corpus"
    swb = read_file(corpus / "babylm_2024_train_10M_partial" / "switchboard.train")
    assert len(swb) == 18000  # every line non-empty, one document each
    assert not any(d.text.startswith(("A:", "B:")) or "\t" in d.text for d in swb)
    tagged = read_file(corpus / "babylm_2024_train_10M_partial" / "switchboard.train", speaker_tags=True)
    assert [d.text.split(": ", 1)[1] for d in tagged] == [d.text for d in swb]
    assert {d.text[:3] for d in tagged} == {"A: ", "B: "}
    wiki = read_file(corpus / "childes_wiki_padovani_valid" / "wikipedia_en_validation.csv")
    assert len(wiki) == 16316 and all(d.source == "wikipedia_en_validation" for d in wiki)


def test_max_docs_keeps_a_prefix_of_every_source():
    docs = [Document(f"a{i}", "a") for i in range(300)] + [Document(f"b{i}", "b") for i in range(100)]
    kept = limit_documents(docs, 40)
    assert [d.text for d in kept] == [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)]
    with pytest.raises(DwmlError, match="max_docs"):
        limit_documents(docs, 0)


# ---------------------------------------------------------------------------------------------------- split


def make_docs(counts: dict[str, int]) -> list[Document]:
    return [Document(f"{s} {i}", s) for s, n in counts.items() for i in range(n)]


def test_split_is_deterministic_per_source_and_order_preserving():
    docs = make_docs({"big": 5000, "mid": 300, "small": 7})
    train, valid = split_documents(docs, valid_fraction=0.02, seed=0)
    assert (train, valid) == split_documents(docs, valid_fraction=0.02, seed=0)
    assert valid != split_documents(docs, valid_fraction=0.02, seed=1)[1]
    position = {d: i for i, d in enumerate(docs)}.__getitem__
    assert sorted(train + valid, key=position) == docs and not set(train) & set(valid)
    assert train == sorted(train, key=position) and valid == sorted(valid, key=position)
    for source, n in {"big": 5000, "mid": 300, "small": 7}.items():
        n_valid = sum(d.source == source for d in valid)
        assert 1 <= n_valid < n
        if n >= 300:
            assert abs(n_valid / n - 0.02) < 0.01
    # Adding a source leaves the split of the others unchanged.
    train2, valid2 = split_documents(docs + make_docs({"new": 50}), valid_fraction=0.02, seed=0)
    assert [d for d in valid2 if d.source != "new"] == valid


def test_split_uses_contiguous_blocks():
    docs = make_docs({"dialogue": 10000})
    _, valid = split_documents(docs, valid_fraction=0.02, seed=3, block_size=32)
    position = {d: i for i, d in enumerate(docs)}
    idx = sorted(position[d] for d in valid)
    starts = [i for i in idx if i - 1 not in set(idx)]
    assert len(idx) == 6 * 32 and all(s % 32 == 0 for s in starts)  # round(0.02 * 313 blocks) = 6


def test_split_small_inputs():
    train, valid = split_documents(make_docs({"s": 2}), valid_fraction=0.02)
    assert len(train) == 1 and len(valid) == 1
    with pytest.raises(DwmlError, match="cannot be split"):
        split_documents(make_docs({"a": 1, "b": 1}))
    with pytest.raises(DwmlError, match="valid_fraction"):
        split_documents(make_docs({"s": 10}), valid_fraction=0.0)
