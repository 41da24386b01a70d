"""Benchmark loaders: counts from each folder's SOURCE.txt, EWoK read from its password zip, user errors."""
from __future__ import annotations

import json
import zipfile
from collections import Counter

import pytest

from dwml.errors import DwmlError
from dwml.evaluation.evaldata import EWOK_ZIP, load_ewok_zip, load_task, parse_tasks
from evalfixtures import EVAL_DATA

pytestmark = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"shared eval data not found at {EVAL_DATA}")

EWOK_DOMAINS = {"agent-properties", "material-dynamics", "material-properties", "physical-dynamics",
                "physical-interactions", "physical-relations", "quantitative-properties", "social-interactions",
                "social-properties", "social-relations", "spatial-relations"}


def test_blimp_filtered_counts():
    pairs = load_task("blimp_filtered", EVAL_DATA)
    assert len(pairs) == 59_875  # blimp_filtered/SOURCE.txt
    sizes = Counter(p.group for p in pairs)
    assert len(sizes) == 67 and min(sizes.values()) == 681 and max(sizes.values()) == 986
    assert set(p.field for p in pairs) == {"morphology", "syntax", "semantics", "syntax/semantics"}
    assert pairs[0].good_prefix is None and pairs[0].good != pairs[0].bad


def test_fast_subsets():
    blimp = load_task("blimp_fast", EVAL_DATA)
    assert len(blimp) == 13_400 and set(Counter(p.group for p in blimp).values()) == {200}
    supp = load_task("supplement_fast", EVAL_DATA)
    assert len(supp) == 250 and set(Counter(p.group for p in supp).values()) == {50}


def test_supplement_counts_and_dialogue_turns_kept():
    pairs = load_task("blimp_supplement", EVAL_DATA)
    assert Counter(p.group for p in pairs) == {"hypernym": 842, "qa_congruence_easy": 64,
                                               "qa_congruence_tricky": 165, "subject_aux_inversion": 3867,
                                               "turn_taking": 280}
    with_turns = {p.group for p in pairs if "\n" in p.good}
    assert with_turns == {"qa_congruence_easy", "qa_congruence_tricky", "turn_taking"}  # "\n" scored verbatim


def test_ewok_read_from_zip():
    pairs = load_task("ewok", EVAL_DATA)
    assert len(pairs) == 7_618 and set(p.group for p in pairs) == EWOK_DOMAINS  # ewok/SOURCE.txt
    # Default (BabyLM): both targets after Context1; the file holds each item then its context/target-swapped copy.
    assert all(p.good != p.bad and p.good_prefix == p.bad_prefix for p in pairs)
    for a, b in zip(pairs[0::2], pairs[1::2]):
        assert (b.good, b.bad, b.group) == (a.bad, a.good, a.group) and b.good_prefix != a.good_prefix
    # The context pairing: the same target after both contexts.
    ctx = load_task("ewok", EVAL_DATA, ewok_pairing="contexts")
    assert len(ctx) == 7_618 and all(p.good == p.bad and p.good_prefix != p.bad_prefix for p in ctx)
    for a, b in zip(pairs, ctx):  # same row: Context1 + Target1 is the good text of both pairings
        assert (a.good_prefix, a.good, a.group) == (b.good_prefix, b.good, b.group)
    for a, b in zip(ctx[0::2], ctx[1::2]):
        assert (b.good_prefix, b.bad_prefix, b.group) == (a.bad_prefix, a.good_prefix, a.group)
    fast = load_ewok_zip(EVAL_DATA / EWOK_ZIP, "ewok_fast")
    assert len(fast) == 1_100 and set(Counter(p.group for p in fast).values()) == {100}
    assert load_ewok_zip(EVAL_DATA / EWOK_ZIP, "ewok_fast", ewok_pairing="contexts")[0].good == fast[0].good
    with pytest.raises(DwmlError, match="ewok-pairing"):
        load_task("ewok_fast", EVAL_DATA, ewok_pairing="target")


def test_limit_keeps_first_pairs_of_every_file():
    full = load_task("ewok_fast", EVAL_DATA)
    few = load_task("ewok_fast", EVAL_DATA, limit=3)
    assert len(few) == 33 and few[:3] == full[:3]
    assert len(load_task("blimp_fast", EVAL_DATA, limit=2)) == 134
    with pytest.raises(DwmlError, match="limit"):
        load_task("blimp_fast", EVAL_DATA, limit=0)


def test_wrong_password_and_missing_zip(tmp_path):
    with pytest.raises(DwmlError, match="decrypt"):
        load_ewok_zip(EVAL_DATA / EWOK_ZIP, "ewok_fast", password=b"nope")
    with pytest.raises(DwmlError, match="zip not found"):
        load_task("ewok", tmp_path)
    bogus = tmp_path / EWOK_ZIP
    bogus.parent.mkdir(parents=True)
    bogus.write_text("not a zip")
    with pytest.raises(DwmlError, match="not a readable zip"):
        load_task("ewok", tmp_path)


def test_user_layout_and_bad_rows(tmp_path):
    """A user's own BabyLM release layout (fast_eval/...) works; broken rows name file and line."""
    folder = tmp_path / "fast_eval" / "blimp_fast"
    folder.mkdir(parents=True)
    rows = [{"sentence_good": "A cat sat.", "sentence_bad": "A cat sit.", "field": "morphology", "UID": "toy"}] * 3
    (folder / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = load_task("blimp_fast", tmp_path)
    assert len(pairs) == 3 and pairs[0].group == "toy" and pairs[0].field == "morphology"
    (folder / "toy.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"sentence_good": "x"}) + "\n")
    with pytest.raises(DwmlError, match=r"toy.jsonl:2: missing .*sentence_bad"):
        load_task("blimp_fast", tmp_path)
    (folder / "toy.jsonl").write_text("{not json\n")
    with pytest.raises(DwmlError, match=r"toy.jsonl:1: invalid JSON"):
        load_task("blimp_fast", tmp_path)
    (folder / "toy.jsonl").unlink()
    with pytest.raises(DwmlError, match="no \\*.jsonl"):
        load_task("blimp_fast", tmp_path)
    with pytest.raises(DwmlError, match="no data folder"):
        load_task("blimp_filtered", tmp_path)


def test_zip_member_without_files(tmp_path):
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other/a.jsonl", "{}\n")
    with pytest.raises(DwmlError, match="no ewok_filtered"):
        load_ewok_zip(path)


def test_parse_tasks():
    assert parse_tasks("blimp_fast, supplement_fast,ewok_fast") == ["blimp_fast", "supplement_fast", "ewok_fast"]
    assert parse_tasks(["blimp", "ewok_filtered", "blimp_filtered"]) == ["blimp_filtered", "ewok"]
    with pytest.raises(DwmlError, match="unknown task"):
        parse_tasks("blimp,glue")
    with pytest.raises(DwmlError, match="no task"):
        parse_tasks(" , ")
