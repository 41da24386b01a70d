"""`dwml demo` end to end on a small slice (the real job runs the same code on the whole corpus)."""
import json

from dwml.cli import main
from dwml.experiments.demo import DEMO_CONFIG, DEMO_SEARCH, demo_run_config


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
    # Every model the demo trains is a ModernBERT (the recipe study's winner), and its checkpoint is a plain
    # Hugging Face ModernBERT masked LM.
    from transformers import AutoModelForMaskedLM

    peers = json.loads((out / "peers.json").read_text())
    assert peers["family"] == "modernbert" and {p["arch"]["family"] for p in peers["peers"]} == {"modernbert"}
    assert "search 2 modernbert peer architectures" in text and "train the modernbert tiny MLM baseline" in text
    finals = [out / "mlm" / "final" / "peer0"] + [out / "dwml" / "final" / f"peer{i}" for i in range(2)]
    for d in finals:
        assert json.loads((d / "config.json").read_text())["model_type"] == "modernbert"
        model = AutoModelForMaskedLM.from_pretrained(d)
        assert type(model).__name__ == "ModernBertForMaskedLM"
    assert model.num_parameters() == peers["peers"][1]["params"]
    # A second invocation reuses the prepared data and the searched peers.
    assert main(args) == 0
    assert "reusing the prepared data" in capsys.readouterr().out


def test_demo_rejects_one_peer(tmp_path, capsys):
    assert main(["demo", "--peers", "1", "--out", str(tmp_path / "d")]) == 2
    assert "at least 2 peers" in capsys.readouterr().err


def test_demo_trains_modernbert_everywhere(tmp_path):
    """The demo's MLM baseline, its DWML peers and its peer search are all in the ModernBERT family (the library
    default stays RoBERTa)."""
    from dwml.config import RunConfig

    assert RunConfig().model.family == "roberta"
    assert DEMO_CONFIG["model"]["family"] == "modernbert" and DEMO_SEARCH["family"] == "modernbert"
    for method in ("mlm", "dwml"):
        cfg = demo_run_config(tmp_path / method, tmp_path / "data", 10, train={"method": method})
        assert cfg.model.family == "modernbert" and cfg.model.dropout == 0.0 and cfg.data.mask_prob == 0.3


def test_demo_refuses_an_old_roberta_demo_dir(tiny_corpus, tmp_path, capsys):
    """A demo directory whose peers.json an older (RoBERTa) demo wrote: a clear error, not a half-reused run."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "peers.json").write_text(json.dumps({"family": "roberta", "peers": [{"params": 1}, {"params": 1}]}))
    args = ["demo", "--corpus", str(tiny_corpus), "--out", str(out), "--steps", "2", "--peers", "2",
            "--vocab-size", "600", "--no-eval"]
    assert main(args) == 2
    assert "holds roberta peers from an older `dwml demo`" in capsys.readouterr().err
