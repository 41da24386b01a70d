"""dwml.training.runtime: process set-up that the training tests do not cover."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

# Minor page faults of each of 20 DWML training steps (3 tiny peers, 16 x 64 tokens, vocabulary 8192), after 10.
FAULTS = f"""
import resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {str(BENCH)!r})
import torch
torch.set_num_threads(1)
from benchlib import make_trainer, synthetic_prepared, time_steps
peers = [dict(layers=1, heads=1, hidden=h, intermediate=2 * h) for h in (32, 32, 32)]
data = synthetic_prepared(Path(tempfile.mkdtemp()) / "d", 8192, train_tokens=200_000)
run = make_trainer(data, "dwml", peers, batch_size=16, seq_len=64, data=dict(mask_prob=0.5))
time_steps(run, 10, warmup=0, outer=False)  # to the heap's peak: later steps reuse it (when malloc keeps it)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    time_steps(run, 1, warmup=0, outer=False)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
run.close()
"""

# glibc alone: a 48 MiB block (above its largest dynamic mmap threshold, 32 MiB) allocated, written and freed 5 times.
REUSE = """
import ctypes, resource
from dwml.training.runtime import keep_freed_cpu_memory
keep_freed_cpu_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(48 << 20)
    libc.memset(p, 1, 48 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""


def _faults(code: str, keep: str) -> list[int]:
    # The child's environment is the one this measurement was calibrated in: without the variables that `dwml.cli`
    # sets for transformers in this process (an in-process `main()` of an earlier test), with which the child's
    # fault counts were measured to change (kept 3 -> 234-724 per step)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    env.update(DWML_KEEP_FREED_MEMORY=keep, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _skip_without_mallopt():
    from dwml.training.runtime import keep_freed_cpu_memory

    if not keep_freed_cpu_memory():
        pytest.skip("no glibc mallopt here")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_keeping_freed_memory_makes_glibc_reuse_a_large_block_instead_of_mapping_it_again():
    """The mechanism, deterministic: with glibc's defaults a block above 32 MiB is a fresh mmap every time (every
    page faulted in again); with keep_freed_cpu_memory it comes from the heap and is reused after the first time."""
    _skip_without_mallopt()
    default, kept = _faults(REUSE, "0"), _faults(REUSE, "1")
    print(f"\nminor page faults per 48 MiB allocation: glibc default {default}, kept {kept}")
    # Measured: default 12,289 every time (48 MiB / 4 KiB pages), kept 12,284 then 0 (fewer with transparent huge
    # pages on both sides, hence a ratio)
    assert sum(default[1:]) > 0 and 10 * sum(kept[1:]) < sum(default[1:]), (default, kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    """compute_init on the CPU makes glibc keep freed memory: a training step's (N, V) logits and gradients are
    then reused, and a typical step faults no fresh pages in (DWML_KEEP_FREED_MEMORY=0 is glibc's default)."""
    _skip_without_mallopt()
    default, kept = _faults(FAULTS, "0"), _faults(FAULTS, "1")
    print(f"\nminor page faults per step: glibc default {default}, kept {kept}")
    # Measured over 20 steps, 10 runs: kept, a median of 2-3 per step; 0-4 steps of 20 fault 0.2-7.7 thousand pages
    # (a larger block that no freed one fits: the heap grows), so a mean over steps is noisy (CI once: 1,325). The
    # default varies with glibc's dynamic mmap threshold (medians 2 to 9,400 per step), so only the kept side is
    # bounded here; the mechanism is the test above.
    assert statistics.median(kept) < 100, (default, kept)


def test_cpu_bf16_attention_runs_the_math_backend_and_trains_the_same_function(monkeypatch):
    """Runtime.autocast on the CPU in bf16 selects SDPA's math backend (faster than the CPU flash kernel's bf16
    backward; benchmarks/bench_cpu_attention.py); fp32 and `cpu_math_attention = False` leave SDPA's choice alone.
    Both paths give the same attention output and input gradient to bf16 precision."""
    import torch
    import torch.nn.functional as F

    from dwml.training import runtime
    from dwml.training.runtime import compute_init

    monkeypatch.setattr(runtime, "cpu_has_bf16_kernels", lambda: True)  # the mechanism, on any CPU
    rt, fp32 = compute_init("cpu", 0, "bf16"), compute_init("cpu", 0, "fp32")
    with rt.autocast():
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    with fp32.autocast():
        assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    q = torch.randn(2, 4, 128, 64, requires_grad=True)
    grads = []
    for math in (True, False):
        rt.cpu_math_attention = math
        with rt.autocast():
            with_flag = torch.backends.cuda.flash_sdp_enabled()
            out = F.scaled_dot_product_attention(q, q * 0.5, q * 2.0)
        assert with_flag is not math
        grads.append((out.float(), torch.autograd.grad(out.float().square().sum(), q)[0]))
    (o1, g1), (o2, g2) = grads
    assert torch.allclose(o1, o2, atol=3e-2, rtol=3e-2) and torch.allclose(g1, g2, atol=0.1, rtol=5e-2)


def test_bf16_on_a_cpu_without_bf16_kernels_trains_in_fp32_and_says_so(monkeypatch, capsys):
    """An AVX2-only CPU has no bf16 matmul (1 GFLOP/s against fp32's 76 on a 2-core EPYC): `train.dtype = "bf16"`
    falls back to fp32 with one notice; where the kernels exist it stays bf16; `auto` is fp32 on any CPU."""
    import torch

    from dwml.training import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16_kernels", lambda: False)
    assert runtime.compute_init("cpu", 0, "bf16").autocast_dtype is None
    err = capsys.readouterr().err
    assert err.count("dwml: notice: train.dtype = 'bf16'") == 1 and "training in fp32" in err
    assert runtime.compute_init("cpu", 0, "auto").autocast_dtype is None and capsys.readouterr().err == ""
    monkeypatch.setattr(runtime, "cpu_has_bf16_kernels", lambda: True)
    assert runtime.compute_init("cpu", 0, "bf16").autocast_dtype is torch.bfloat16
    assert capsys.readouterr().err == ""


def test_a_bf16_run_on_such_a_cpu_records_that_it_trained_in_fp32(tiny_prepared, tmp_path, monkeypatch):
    import json

    from dwml.training import runtime
    from dwml.training.train import train
    from runfixtures import make_cfg

    monkeypatch.setattr(runtime, "cpu_has_bf16_kernels", lambda: False)
    summary = train(make_cfg(tiny_prepared, tmp_path / "run", train={"dtype": "bf16", "max_steps": 2}))
    assert summary["precision"] == "fp32"
    assert json.loads((tmp_path / "run" / "final" / "summary.json").read_text())["precision"] == "fp32"
    assert 'dtype = "bf16"' in (tmp_path / "run" / "config.toml").read_text()  # what was asked, as resolved
