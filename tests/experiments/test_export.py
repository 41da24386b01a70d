"""`dwml export`: a self-contained Hugging Face folder that reloads to identical logits."""
import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from dwml.cli import main
from dwml.config import RunConfig, from_dict
from dwml.training.train import train


@pytest.fixture(scope="module")
def dwml_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = from_dict(RunConfig, {
        "out_dir": str(out),
        "data": {"prepared": str(tiny_prepared), "seq_len": 32, "heldout_sequences": 16},
        "model": {"peers": [{"layers": 1, "heads": 2, "hidden": 32, "intermediate": 64},
                            {"layers": 1, "heads": 2, "hidden": 16, "intermediate": 32}]},
        "train": {"method": "dwml", "max_steps": 4, "batch_size": 8, "eval_every": 4, "save_every": 4,
                  "eval_batches": 1, "progress": False},
        "distill": {"outer_every": 2},
    }, "test").validate()
    train(cfg)
    return out


def test_export_roundtrip_identical_logits(dwml_run, tmp_path, capsys):
    (dwml_run / "eval_dwml.json").write_text(json.dumps({"models": {"peer1": {"summary": {"blimp_fast": 51.5}}}}))
    out = tmp_path / "hf"
    assert main(["export", str(dwml_run), "--peer", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"README.md", "config.json", "model.safetensors"}
    card = (out / "README.md").read_text()
    assert "dwml" in card and "peer weight omega" in card and "blimp_fast" in card and "51.5" in card
    exported = AutoModelForMaskedLM.from_pretrained(out).eval()
    original = AutoModelForMaskedLM.from_pretrained(dwml_run / "final" / "peer1").eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["the cat sat on the <mask> .", "where is it ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(exported(**enc).logits, original(**enc).logits)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(dwml_run / "final" / "peer1").get_vocab()


def test_export_bad_input(dwml_run, tmp_path, capsys):
    assert main(["export", str(dwml_run), "--peer", "5", "--out", str(tmp_path / "x")]) == 2
    assert "has peers 0..1" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "not a finished dwml run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
