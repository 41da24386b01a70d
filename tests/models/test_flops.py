"""Analytic training FLOPs vs torch's FLOP counter, run-level sums, GPU-hour arithmetic, the GPU sampler."""
import sys
import time
import types

import pytest
import torch
from transformers import AutoTokenizer

from dwml.config import RunConfig, from_dict, merge
from dwml.models.flops import H100_BF16_PEAK, encoder_matmul_params, gpu_hours, head_matmul_params, run_flops, step_flops, token_flops
from dwml.training.measure import GpuUtilSampler, count_flops, measure_step_flops, timed
from dwml.models.model import Arch, Student, build_model, count_params
from dwml.data.shards import load_meta

ARCH = Arch(layers=2, heads=4, hidden=64, intermediate=256, vocab_size=1000, max_positions=34)


def test_parameter_split_covers_the_model():
    # Everything count_params counts is either a matmul weight (encoder or head), an embedding table, or a
    # bias / LayerNorm vector: check the split adds up (the vocabulary projection is the tied word embedding).
    a = ARCH
    H, I, L, V, P = a.hidden, a.intermediate, a.layers, a.vocab_size, a.max_positions
    vectors = L * (4 * H + 2 * H + I + H + 2 * H) + (H + 2 * H + V) + 2 * H  # biases + LayerNorms (+ decoder bias)
    embeddings_other = P * H + H  # position + token type
    assert encoder_matmul_params(a) + head_matmul_params(a) + embeddings_other + vectors == count_params(a)


@pytest.mark.parametrize("n_masked", [1, 19, 128])
def test_counted_step_equals_analytic(n_masked):
    """FlopCounterMode over forward + backward of a Student == 3 x (2 N_enc + 4 L T H + 2 f N_head) x tokens."""
    torch.manual_seed(0)
    model = Student(build_model(ARCH, seed=0))
    B, T = 4, 32
    ids = torch.randint(5, ARCH.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    positions = torch.randperm(B * T)[:n_masked].sort().values

    def step():
        logits, _ = model(ids, mask, positions)
        torch.nn.functional.cross_entropy(logits, ids.view(-1)[positions]).backward()

    counted, _ = count_flops(step)
    assert counted == pytest.approx(step_flops(ARCH, B, T, n_masked), rel=1e-9)
    # Forward only: a third.
    with torch.no_grad():
        fwd, _ = count_flops(model, ids, mask, positions)
    assert fwd == pytest.approx(step_flops(ARCH, B, T, n_masked, backward=False), rel=1e-9)


def test_masked_only_head_is_the_saving():
    # With every position masked the head would cost N_head per token; at 15% it costs 0.15 N_head.
    full = token_flops(ARCH, 32, 1.0)
    partial = token_flops(ARCH, 32, 0.15)
    assert full.encoder == partial.encoder and full.attention == partial.attention
    assert partial.head == pytest.approx(0.15 * full.head)
    assert full.train == pytest.approx(6 * encoder_matmul_params(ARCH) + 12 * 2 * 32 * 64 + 6 * head_matmul_params(ARCH))


def test_run_flops_and_gpu_hours():
    small = ARCH.replace(hidden=32, intermediate=128)
    out = run_flops([ARCH, small], tokens=1e6, seq_len=32, mask_frac=0.15, teacher=ARCH)
    assert out["per_student"][0] == pytest.approx(token_flops(ARCH, 32, 0.15).train * 1e6)
    assert out["teacher_forward"] == pytest.approx(out["per_student"][0] / 3)
    assert out["total"] == pytest.approx(sum(out["per_student"]) + out["teacher_forward"])
    sd = run_flops([ARCH], tokens=1e6, seq_len=32, mask_frac=0.15, sd_heads=1)
    assert sd["total"] - out["per_student"][0] == pytest.approx(6 * 0.15 * head_matmul_params(ARCH) * 1e6)
    assert gpu_hours(0.4 * H100_BF16_PEAK * 3600) == pytest.approx(1.0)
    assert gpu_hours(H100_BF16_PEAK * 3600, mfu=0.5) == pytest.approx(2.0)


def _cfg(prepared, out, **sections):
    base = {
        "out_dir": str(out),
        "data": {"prepared": str(prepared), "seq_len": 32, "heldout_sequences": 16},
        "model": {"preset": "tiny", "layers": 2, "hidden": 32, "heads": 2, "intermediate": 64},
        "train": {"max_steps": 4, "batch_size": 8, "progress": False},
        "distill": {"outer_every": 2},
    }
    return from_dict(RunConfig, merge(base, sections), "test").validate()


def test_measured_step_of_real_runs(tiny_prepared, tmp_path):
    vocab = int(load_meta(tiny_prepared)["vocab_size"])
    # A teacher model directory with this data's tokenizer.
    teacher = tmp_path / "teacher"
    build_model(Arch(layers=2, heads=2, hidden=48, intermediate=96, vocab_size=vocab, max_positions=34),
                seed=1).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny_prepared / "tokenizer").save_pretrained(teacher)
    peers = [{"layers": 1, "heads": 2, "hidden": 32, "intermediate": 64},
             {"layers": 2, "heads": 2, "hidden": 24, "intermediate": 48}]
    exact = {"mlm": {}, "kd": {"distill": {"teacher": str(teacher)}}, "sd": {}}
    for method, extra in exact.items():
        m = measure_step_flops(_cfg(tiny_prepared, tmp_path / method, **merge(extra, {"train": {"method": method}})))
        assert m["ratio"] == pytest.approx(1.0, abs=1e-6), method
        assert m["micro_batch"] == 8 and m["seq_len"] <= 32 and m["measured_outer_step"] is None
    # Peer losses add O(M n_masked V) products inside the loss; the forward/backward products are still exact.
    dwml = measure_step_flops(_cfg(tiny_prepared, tmp_path / "dwml", train={"method": "dwml", "grad_accum": 2},
                                   model={"peers": peers}))
    assert dwml["ratio"] == pytest.approx(1.0, abs=0.01)
    assert dwml["micro_steps_per_step"] == 2
    # The outer omega step (eq. 3) costs a few inner steps: more than one, fewer than ten.
    assert 1 < dwml["measured_outer_step"] / dwml["measured_micro_step"] < 10
    fixed = measure_step_flops(_cfg(tiny_prepared, tmp_path / "f", train={"method": "dwml"}, model={"peers": peers},
                                    distill={"learn_omega": False}))
    assert fixed["measured_outer_step"] is None


def test_gpu_sampler_without_gpu_is_na():
    with GpuUtilSampler("cpu") as s:
        time.sleep(0.01)
    assert s.result() == {"gpu": None, "gpu_util_mean": None, "gpu_samples": 0, "gpu_mem_max_mib": None}
    out, info = timed(lambda x: x + 1, 1, device="cpu")
    assert out == 2 and info["wall_s"] >= 0 and info["gpu_util_mean"] is None


def test_gpu_sampler_averages_nvml_samples(monkeypatch):
    values = iter([30.0, 50.0, 70.0] + [70.0] * 1000)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=next(values)),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 * 2**20),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sampler = GpuUtilSampler("cuda:0", interval=0.001)
    with sampler:
        deadline = time.time() + 5
        while len(sampler.samples) < 3 and time.time() < deadline:
            time.sleep(0.005)
    r = sampler.result()
    assert r["gpu"] == "Fake GPU" and r["gpu_samples"] >= 3 and r["gpu_mem_max_mib"] == 2.0
    assert r["gpu_util_mean"] == pytest.approx(sum(sampler.samples) / len(sampler.samples))
    assert sampler.samples[:3] == [30.0, 50.0, 70.0]
