"""One `compute_init()` for device, precision, seeding and (torchrun) distributed set-up, as in nanochat."""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import DwmlError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA by default; None = plain fp32
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    cpu_math_attention: bool = True  # bf16 on the CPU: SDPA's math backend (see `autocast`); benchmarks switch it

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        """What the run's summary records: what the step really ran in (an AVX2 CPU's bf16 request falls back)."""
        return "fp32" if self.autocast_dtype is None else "bf16 autocast"

    def autocast(self):
        """Mixed precision context: bf16 autocast (no loss scaling needed), nothing in plain fp32.

        On the CPU, bf16 attention also runs through SDPA's math backend (explicit matmuls + softmax) instead of the
        CPU flash kernel: at sequence length 128 the flash kernel's bf16 backward took 0.22 of a 0.74 s ModernBERT
        mini step on a 2-core AMX CPU (benchmarks/profile_cpu_step.py); the math path trains the same function
        (first-step loss equal to 4e-6) at 0.93 of the step time (benchmarks/bench_cpu_attention.py, 3 alternating
        rounds; earlier one-off runs on the same machine 0.76-0.87).
        """
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        amp = torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
        if self.device.type != "cpu" or not self.cpu_math_attention:
            return amp
        stack = contextlib.ExitStack()
        stack.enter_context(amp)
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto", field: str = "train.device") -> torch.device:
    """`auto` (or None) = CUDA when present, else CPU; anything else is checked. `field` names it in errors."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DwmlError(f"{field}: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DwmlError(f"{field}: {str(device)!r} requested but no CUDA device is available")
    return dev


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_KEEP = 1 << 30


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the OS (True if it did).

    glibc serves a large block (above a dynamic threshold of at most 32 MB) with a fresh mmap and trims freed heap
    memory beyond 128 KB, so a training step that frees and reallocates its (N, V) logits, gradients and activations
    touches fresh pages every step: 11-18 thousand minor page faults per step for three tiny peers on this CPU (and
    15-60 thousand per DWML outer step), the same order as the loss itself. With the mmap and trim thresholds at
    1 GiB freed memory is reused, and the process keeps its peak footprint (PyTorch's CPU performance guide suggests
    jemalloc or tcmalloc for the same reason). Set DWML_KEEP_FREED_MEMORY=0 to leave malloc alone. No-op without
    glibc (macOS, musl).
    """
    if os.environ.get("DWML_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already linked into this process; no library search
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512 / AVX512-BF16 / AMX on x86, bf16 on ARM)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_init(device: str = "auto", seed: int = 0, dtype: str = "auto") -> Runtime:
    """Pick the device, the autocast dtype, seed all RNGs and join the process group when launched by torchrun.

    Under torchrun (RANK/WORLD_SIZE set) each process takes cuda:LOCAL_RANK with NCCL, or the CPU with gloo. All
    ranks use the same seed so that every rank initialises identical models; data sharding makes batches differ.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world_size > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dtype not in ("auto", "bf16", "fp32"):
        raise DwmlError(f"train.dtype: expected auto|bf16|fp32, got {dtype!r}")
    amp = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda") else None
    if amp is not None and dev.type == "cpu" and not cpu_has_bf16_kernels():
        # Without AVX512 / AMX / ARM bf16, oneDNN has no bf16 matmul and torch falls back to a scalar loop: on a 2-core
        # AVX2 EPYC a 1024^3 bf16 matmul ran at 1 GFLOP/s against fp32's 76 (benchmarks/profile_cpu_step.py), so a
        # "30-minute" bf16 config would take days. fp32 trains the same model at the speed this CPU has.
        amp = None
        if rank == 0:
            print(f"dwml: notice: train.dtype = {dtype!r}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
                  "bf16 matmul kernels (AVX512, AMX or ARM bf16); training in fp32 instead", file=sys.stderr)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_cpu_memory()
    seed_everything(seed)
    return Runtime(device=dev, autocast_dtype=amp, rank=rank, local_rank=local_rank, world_size=world_size)


def compute_cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
