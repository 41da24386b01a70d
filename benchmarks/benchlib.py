"""Shared pieces of the training benchmarks: synthetic prepared data, a real `Trainer`, timing, the matmul peak.

The benchmarks drive `dwml.training.train.Trainer` phase by phase (the loop's own `train_step` / `outer_step`), so they
measure the code a run executes, minus logging, validation and checkpoints. On the CPU they report the process's CPU
time next to wall time: on a shared, oversubscribed machine the wall time mostly measures the other users. Token ids are random: throughput does not
depend on what the tokens are, and a synthetic prepared directory takes a second to write on any machine (the GPU
box has no corpus).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from dwml.config import RunConfig, from_dict, merge
from dwml.models.flops import step_flops
from dwml.io import write_json
from dwml.training.runtime import compute_init, cpu_has_bf16_kernels
from dwml.data.shards import META_FORMAT, dtype_for_vocab, write_shard
from dwml.data.tokenizer import N_SPECIAL, SPECIAL_TOKENS
from dwml.training.train import Trainer


def synthetic_prepared(out: Path, vocab_size: int, train_tokens: int, seed: int = 0) -> Path:
    """A `dwml prepare`-shaped directory of random documents (10-200 tokens) with `train_tokens` train tokens."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, n_tokens in (("train", train_tokens), ("valid", max(train_tokens // 50, 20_000))):
        lengths = rng.integers(10, 200, size=n_tokens // 100 + 1)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), n_tokens)) + 1]
        tokens = rng.integers(N_SPECIAL, vocab_size, size=int(lengths.sum()))
        write_shard(out, split, tokens, np.concatenate([[0], np.cumsum(lengths)]), vocab_size=vocab_size)
    # A word-level tokenizer with exactly vocab_size entries (specials first): the trainer checks that the prepared
    # data's tokenizer matches its vocabulary; the benchmarks never decode text.
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"t{i}": i for i in range(N_SPECIAL, vocab_size)}
    (out / "tokenizer").mkdir(exist_ok=True)
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(out / "tokenizer" / "tokenizer.json"))
    write_json(out / "meta.json", {"format": META_FORMAT, "vocab_size": vocab_size,
                                   "dtype": dtype_for_vocab(vocab_size).name,
                                   "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)}})
    return out


def make_trainer(prepared: Path, method: str, peers: list[dict], *, batch_size: int, seq_len: int,
                 device: str = "auto", **sections: Any) -> Trainer:
    """A Trainer for `method` over `peers` ({layers, heads, hidden, intermediate} tables); `sections` override."""
    base = {
        "out_dir": tempfile.mkdtemp(prefix="dwml_bench_"),
        "data": {"prepared": str(prepared), "seq_len": seq_len, "heldout_sequences": 4 * batch_size},
        "model": {"peers": peers},
        "train": {"method": method, "batch_size": batch_size, "device": device, "progress": False,
                  "warmup_steps": 10, "max_steps": 10**6},
    }
    cfg = from_dict(RunConfig, merge(base, sections), "benchmark").validate()
    rt = compute_init(cfg.train.device, cfg.train.seed, cfg.train.dtype)
    run = Trainer(cfg, rt)
    run.start_clock()
    return run


def cpu_bf16_arm(what: str) -> bool:
    """Whether a CPU benchmark can time bf16: without bf16 matmul kernels the trainer trains in fp32
    (`dwml.training.runtime`), so a "bf16" arm would time fp32 under another name; says so when it cannot."""
    if cpu_has_bf16_kernels():
        return True
    print(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 matmul kernels (AVX512, AMX or ARM "
          f"bf16): dwml trains it in fp32, so {what} is measured in fp32 only")
    return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds: float  # wall time per step
    cpu_seconds: float  # CPU time of this process (all its threads) per step: the work, even on a busy machine
    tokens: float  # non-pad tokens per step (this rank)
    flops: float  # analytic model FLOPs per step (`dwml.models.flops.step_flops` of every student; no outer step)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def time_steps(run: Trainer, steps: int, warmup: int, outer: bool = True) -> Timing:
    """The loop's step (+ the outer omega step every K steps, as the loop runs it), timed over `steps` steps."""
    k = run.cfg.distill.outer_every
    archs = [a for _, a in run.archs]

    def one() -> float:
        lr = run.lr()
        stats = run.train_step()
        if outer and run.learn_omega and run.step % k == 0:
            run.outer_step(stats, lr)
        b = stats.batch  # grad_accum = 1: the step's only micro-batch (shapes only: no device sync)
        return sum(step_flops(a, b.input_ids.shape[0], b.input_ids.shape[1], b.labels.numel()) for a in archs)

    for _ in range(warmup):
        one()
    sync(run.rt.device)
    tokens0, flops = run.batches.train.tokens_seen, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        flops += one()
    sync(run.rt.device)
    seconds, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    return Timing(seconds, cpu, (run.batches.train.tokens_seen - tokens0) / steps, flops / steps)


def matmul_peak(device: torch.device, size: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Measured FLOP/s of a square matmul of `size` in `dtype` (the best of repeated timings); on the CPU per
    second of this process's CPU time, like `Timing.cpu_seconds`."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = clock()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (clock() - t0) / 10)
    return 2.0 * size**3 / best


def cpu_step_arguments(doc: str, steps: int) -> argparse.ArgumentParser:
    """The arguments of the CPU step benchmarks (profile_cpu_step, bench_cpu_attention): the MLM's preset and batch."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def modernbert_peer(preset: str) -> dict:
    """The peer table ({layers, heads, hidden, intermediate, family}) of a ModernBERT preset."""
    from dwml.models.model import get_preset

    arch = get_preset(preset, "modernbert")
    return {"layers": arch.layers, "heads": arch.heads, "hidden": arch.hidden, "intermediate": arch.intermediate,
            "family": "modernbert"}
