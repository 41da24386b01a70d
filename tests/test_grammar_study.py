"""benchmarks/grammar_study.py: the parts that decide what the study evaluates."""
import json
from pathlib import Path


def test_the_grammar_study_scores_the_other_tokenizer_form_only_where_a_line_break_is(tmp_path, monkeypatch):
    """benchmarks/grammar_study.py --line-ends: the two tokenizer forms read text without a line break alike, so the
    other form is evaluated only on sets with one (the supplement's dialogues), not again on BLiMP."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import grammar_study

    def write(folder: str, good: str, bad: str) -> None:
        (tmp_path / folder).mkdir()
        row = {"sentence_good": good, "sentence_bad": bad, "field": "syntax", "UID": "toy"}
        (tmp_path / folder / "toy.jsonl").write_text(json.dumps(row) + "\n")

    write("blimp_filtered", "A cat sat.", "A cat sit.")
    write("blimp_supplement", "What did you get?\nA chair.", "What did you get?\nA teacher.")
    data = str(tmp_path)
    assert grammar_study.line_break_tasks("blimp_filtered,blimp_supplement", data) == "blimp_supplement"
    assert grammar_study.line_break_tasks("blimp", data) == ""
    assert grammar_study.line_break_tasks("supplement,wug_adj", data) == "blimp_supplement,wug_adj"  # not pairs: kept
