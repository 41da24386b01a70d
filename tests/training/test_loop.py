"""The training loop's performance contract: SDPA attention, torch.compile for every method (DWML's custom autograd
function included), loss parts that stay on the device, and (on a GPU) a step without host synchronisation."""
from __future__ import annotations

import functools

import pytest
import torch

from dwml.config import DistillConfig
from dwml.distill.methods import METHOD_LOSSES
from dwml.models.model import build_model, get_preset, masked_logits
from dwml.training.train import train
from runfixtures import PEERS, make_cfg


def test_students_use_sdpa_attention_and_take_a_4d_boolean_mask():
    """SDPA attention; the (B, 1, 1, T) boolean mask the trainer passes on CUDA (so transformers does not check the
    2-D mask on the host) gives exactly the logits of the 2-D padding mask."""
    model = build_model(get_preset("tiny").replace(layers=1), seed=0).eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 8000, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    positions = torch.tensor([1, 2, 12, 21])
    with torch.no_grad():
        a = masked_logits(model, ids, mask, positions)
        b = masked_logits(model, ids, mask[:, None, None, :].bool(), positions)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", sorted(METHOD_LOSSES))
def test_loss_parts_stay_on_the_device(method):
    """Log parts are detached tensors (read at log steps), never Python numbers that force a sync every step."""
    torch.manual_seed(0)
    n, v, students = 6, 11, 1 if method in ("mlm", "kd", "sd") else 3
    outs = [(torch.randn(n, v, requires_grad=True), [torch.randn(n, v)] if method == "sd" else [])
            for _ in range(students)]
    labels = torch.randint(0, v, (n,))
    loss, parts = METHOD_LOSSES[method](outs, labels, torch.full((students,), 1 / students, dtype=torch.float64),
                                        torch.randn(n, v), DistillConfig())
    assert loss.requires_grad and parts["ce"].shape == (students,)
    assert all(isinstance(p, torch.Tensor) and not p.requires_grad for p in parts.values())


def _compiled_vs_eager(tiny_prepared, tmp_path, monkeypatch, method, backend, **sections):
    runs = []
    for compile_ in (False, True):
        if compile_ and backend != "inductor":
            monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
        train_cfg = {"method": method, "compile": compile_, "max_steps": 4, "eval_every": 4, "save_every": 4}
        runs.append(train(make_cfg(tiny_prepared, tmp_path / f"c{compile_}", train=train_cfg, **sections)))
    return runs


def test_compiled_dwml_trains_exactly_like_eager(tiny_prepared, tmp_path, monkeypatch):
    """train.compile=true with DWML (whose inner loss is a custom autograd function) runs through Dynamo and AOT
    autograd (the aot_eager backend: the same graphs as inductor without its minutes-long C++ build on this CPU)."""
    eager, compiled = _compiled_vs_eager(tiny_prepared, tmp_path, monkeypatch, "dwml", "aot_eager",
                                         model={"peers": PEERS})
    assert compiled["peers"] == eager["peers"] and compiled["omega"] == eager["omega"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mlm", "dwml", "sd"])
def test_inductor_compiled_training_matches_eager(tiny_prepared, tmp_path, monkeypatch, method):
    """The real inductor backend (C++ kernels on CPU; minutes on 2 cores): same losses to fp32 round-off."""
    sections = {"model": {"peers": PEERS}} if method == "dwml" else {"model": {"layers": 2}}
    eager, compiled = _compiled_vs_eager(tiny_prepared, tmp_path, monkeypatch, method, "inductor", **sections)
    for a, b in zip(eager["peers"], compiled["peers"]):
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["mlm", "dwml"])
def test_cuda_step_never_waits_for_the_gpu(tiny_prepared, tmp_path, method):
    """Between log steps the host never synchronises with the GPU (torch's sync debug mode turns a sync into an
    error), so the CPU runs ahead and the GPU stays busy."""
    from dwml.training.runtime import compute_init
    from dwml.training.train import Trainer

    sections = {"model": {"peers": PEERS}} if method == "dwml" else {}
    cfg = make_cfg(tiny_prepared, tmp_path / "run", train={"method": method, "device": "cuda"}, **sections)
    run = Trainer(cfg, compute_init("cuda", 0, "auto"))
    try:
        run.start_clock()
        run.train_step()  # warm-up: allocator, cuBLAS handles, pinned buffers
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                run.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        run.close()
