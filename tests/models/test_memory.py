"""The memory estimate: exact weight / gradient / AdamW terms, an upper bound of a measured step, and refusals with
one line before anything is allocated (absurd peers, a tiny $DWML_MEMORY_LIMIT, an absurd model folder)."""
import json
import time

import pytest
import torch

from dwml.cli import main
from dwml.config import RunConfig, from_dict
from dwml.errors import DwmlError
from dwml.models import memory
from dwml.models.model import Arch, build_model

from runfixtures import make_cfg

ARCH = Arch(layers=2, heads=2, hidden=32, intermediate=64, vocab_size=300, max_positions=66)


def _cfg(**train) -> RunConfig:
    return from_dict(RunConfig, {"data": {"seq_len": 64}, "train": {"batch_size": 4, **train}}, "test").validate()


def test_weight_gradient_and_optimizer_terms_equal_real_tensors():
    model = build_model(ARCH, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(5, 300, (2, 16))).logits.sum().backward()
    opt.step()
    est = memory.training_estimate(_cfg(), [("m", ARCH)])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert (est.terms["parameters"], est.terms["gradients"], est.terms["optimizer"]) == (params, grads, state)


def test_activation_estimate_bounds_a_measured_step():
    """The saved tensors of a real forward (everything autograd keeps for backward) are below the estimate's
    activation phase, which is not absurdly larger (< 10x)."""
    model = build_model(ARCH, seed=0).train()
    from dwml.models.model import masked_logits

    saved = []
    ids = torch.randint(5, 300, (4, 64))
    positions = torch.arange(0, ids.numel(), 7)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        logits = masked_logits(model, ids, torch.ones_like(ids), positions)
        torch.nn.functional.cross_entropy(logits, torch.randint(5, 300, (positions.numel(),))).backward()
    measured = sum(saved)
    est = memory.training_estimate(_cfg(), [("m", ARCH)]).phases["activations"]
    assert measured <= est < 10 * measured, (measured, est)


def test_absurd_peers_are_refused_in_one_line_before_allocating(tiny_prepared, tmp_path, capsys):
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"peers": [{"arch": {"layers": 1000, "heads": 16, "hidden": 65536,
                                                     "intermediate": 262144, "vocab_size": 1000}},
                                           {"arch": {"layers": 1, "heads": 2, "hidden": 32, "intermediate": 64,
                                                     "vocab_size": 1000}}]}))
    start = time.perf_counter()
    argv = ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), "--method", "dwml",
            "--peers-file", str(peers), "--set", "data.seq_len=32", "--set", "train.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "peer0 (1000 layers x 65536 hidden" in err and "needs ~" in err, err
    assert time.perf_counter() - start < 20
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_memory_limit_env_refuses_a_normal_run_and_an_eval_folder(tiny_prepared, tmp_path, monkeypatch, capsys):
    from dwml.training.train import train

    monkeypatch.setenv(memory.LIMIT_ENV, "1M")
    with pytest.raises(DwmlError, match=r"needs ~.* for training at batch 8 x 32"):
        train(make_cfg(tiny_prepared, tmp_path / "run"))
    monkeypatch.setenv(memory.LIMIT_ENV, "off")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta", "num_hidden_layers": 500,
                                                    "num_attention_heads": 64, "hidden_size": 65536,
                                                    "intermediate_size": 262144, "vocab_size": 50000}))
    monkeypatch.setenv(memory.LIMIT_ENV, "64G")
    with pytest.raises(DwmlError, match=r"needs ~.* to load and score"):
        memory.check_folder_memory(folder)
