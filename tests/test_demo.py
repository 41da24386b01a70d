"""`dwml demo` end to end on a small slice (the real job runs the same code on the whole corpus)."""
import json

from dwml.cli import main


def test_demo_end_to_end(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--corpus", str(tiny_corpus), "--out", str(out), "--steps", "6", "--peers", "2",
            "--vocab-size", "600", "--eval-limit", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "demo finished" in text and "dwml ensemble" in text and "final omega" in text
    assert "plateau exit" in text and "unigram entropy of the train split" in text and "mlm tiny: valid loss" in text
    summary = json.loads((out / "dwml" / "final" / "summary.json").read_text())
    assert len(summary["peers"]) == 2 and abs(sum(summary["omega"]) - 1) < 1e-9
    assert (out / "eval_dwml.json").is_file() and (out / "mlm" / "final" / "peer0" / "config.json").is_file()
    # A second invocation reuses the prepared data and the searched peers.
    assert main(args) == 0
    assert "reusing the prepared data" in capsys.readouterr().out


def test_demo_rejects_one_peer(tmp_path, capsys):
    assert main(["demo", "--peers", "1", "--out", str(tmp_path / "d")]) == 2
    assert "at least 2 peers" in capsys.readouterr().err
