"""Training cost as measured: torch's FLOP count of one real training micro-step (`measure_step_flops`, against the
analytic count of `dwml.models.flops`), GPU utilisation sampled through NVML while a stage runs, and wall timing."""
from __future__ import annotations

import threading
import time
from typing import Any

import torch

from ..models.flops import step_flops
from ..models.model import Arch


def count_flops(fn, *args, **kwargs) -> tuple[int, Any]:
    """(FLOPs torch counts while running fn(*args, **kwargs), fn's return value).

    Attention runs in SDPA's math backend while counting: it is plain batched products that the counter sees one by
    one (CPU's fused attention kernel, used without autograd e.g. by a frozen teacher, is not counted by torch at
    all, and CUDA's fused kernels are counted with the backward's recomputation of Q K^T). So the count is of the
    products the model needs, comparable with the analytic formula on any device.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


def measure_step_flops(cfg, prepared=None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Counted FLOPs of one training micro-step of the run `cfg` (a `RunConfig`) on its first real batch, next to
    the analytic count of the same micro-batch; plus one outer omega step for a learned-omega DWML run.

    The students are freshly initialised (FLOPs do not depend on the weights) and run in fp32 on `device`
    (default: the run's device). Returns {"micro_batch", "seq_len", "n_masked", "measured_micro_step",
    "analytic_micro_step", "ratio", "micro_steps_per_step" (grad_accum), "measured_outer_step" (or None)}.
    """
    from pathlib import Path

    from ..data.masking import BatchStream
    from ..data.shards import PackedSequences, load_meta
    from ..distill.hypergrad import hypergradient
    from ..distill.methods import METHOD_LOSSES, TEACHER_METHODS
    from ..distill.selfdistill import SelfDistillHeads
    from ..models.model import Student, build_model
    from .runtime import resolve_device
    from .setup import load_teacher, resolve_archs

    t, d, method = cfg.train, cfg.distill, cfg.train.method
    prepared = Path(prepared or cfg.data.prepared)
    dev = torch.device(device) if device is not None else resolve_device(t.device)
    vocab = int(load_meta(prepared)["vocab_size"])
    archs = [a for _, a in resolve_archs(cfg, vocab)]
    students, n_aux = [], 0
    for i, arch in enumerate(archs):
        mlm = build_model(arch, seed=i)
        aux = SelfDistillHeads(mlm.config, layers=d.sd_layers or None) if method == "sd" else None
        n_aux = len(aux.layers) if aux is not None else 0
        students.append(Student(mlm, aux).to(dev).train())
    teacher = load_teacher(d.teacher, prepared / "tokenizer", dev) if method in TEACHER_METHODS else None
    seqs = PackedSequences(prepared, "train", cfg.data.seq_len)
    stream = BatchStream(seqs, min(t.batch_size, len(seqs)), seed=t.seed, vocab_size=vocab,
                         mask_prob=cfg.data.mask_prob)
    batch = next(stream).to(dev)
    n = len(archs)
    omega = torch.full((n,), 1.0 / n, dtype=torch.float64, device=dev)

    def teacher_logits():
        from ..models.model import masked_logits

        if teacher is None:
            return None
        with torch.no_grad():
            return masked_logits(teacher, batch.input_ids, batch.attention_mask, batch.positions).float()

    def micro_step():
        outs = [s(batch.input_ids, batch.attention_mask, batch.positions) for s in students]
        outs = [(z.float(), [a.float() for a in aux]) for z, aux in outs]
        loss, _ = METHOD_LOSSES[method](outs, batch.labels, omega, teacher_logits(), d)
        loss.backward()

    measured, _ = count_flops(micro_step)
    B, T = batch.input_ids.shape
    n_masked = int(batch.positions.numel())
    analytic = sum(step_flops(a, B, T, n_masked, heads=1 + n_aux) for a in archs)
    if teacher is not None:
        analytic += step_flops(Arch.from_hf_config(teacher.config), B, T, n_masked, backward=False)
    outer = None
    if method in ("dwml", "kd_dwml") and d.learn_omega:
        # the configured unroll (the AdamW one from fresh optimizer states: the FLOPs do not depend on them)
        from .setup import make_optimizer

        gamma = (t.lr if d.unroll == "sgd" else None) if d.gamma < 0 else d.gamma
        optimizers = [make_optimizer(s, t) for s in students]
        inner_teacher = teacher_logits()  # the inner step's: the outer step reuses them (no teacher forward of its own)
        outer, _ = count_flops(lambda: hypergradient(
            students, batch, batch, omega, alpha=d.alpha, temperature=d.temperature, gamma=gamma,
            detach_targets=d.detach_targets, l2_kind=d.l2, mode=d.hypergrad, unroll=d.unroll, optimizers=optimizers,
            grad_clip=t.grad_clip, teacher_logits=inner_teacher, teacher_weight=d.teacher_weight,
            forward=lambda m, ids, am, pos: m(ids, am, pos)[0]))
    return {
        "micro_batch": int(B),
        "seq_len": int(T),
        "n_masked": n_masked,
        "measured_micro_step": measured,
        "analytic_micro_step": analytic,
        "ratio": measured / analytic,
        "micro_steps_per_step": t.grad_accum,
        "measured_outer_step": outer,
    }


class GpuUtilSampler:
    """Samples the GPU's utilisation (percent of time a kernel ran, NVML's `utilization.gpu`) every `interval`
    seconds in a background thread while in the `with` block.

    Needs `pynvml` (the optional extra `dwml[gpu]`, package nvidia-ml-py) and a CUDA device; otherwise it samples
    nothing and `result()` reports None ("n/a" in reports). Never raises for a missing or failing NVML.
    """

    def __init__(self, device: str | torch.device = "cuda", interval: float = 0.5):
        self.interval = interval
        self.samples: list[float] = []
        self.memory_mib: list[float] = []
        self.name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        self._nvml = None
        dev = torch.device(device) if not isinstance(device, torch.device) else device
        if dev.type != "cuda" or not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self._nvml = pynvml
        except Exception:  # ImportError, NVMLError: no sampling, report n/a
            self._handle = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
                self.memory_mib.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20)
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuUtilSampler":
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, name="gpu-util-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)

    def result(self) -> dict[str, Any]:
        """{"gpu": name or None, "gpu_util_mean": percent or None, "gpu_samples": n, "gpu_mem_max_mib": or None}"""
        n = len(self.samples)
        return {
            "gpu": self.name,
            "gpu_util_mean": sum(self.samples) / n if n else None,
            "gpu_samples": n,
            "gpu_mem_max_mib": max(self.memory_mib) if self.memory_mib else None,
        }


def timed(fn, *args, device: str | torch.device = "cpu", **kwargs) -> tuple[Any, dict[str, Any]]:
    """Run fn(*args, **kwargs) with wall-clock timing and GPU sampling: (its result, {"wall_s", GpuUtilSampler
    result fields...})."""
    sampler = GpuUtilSampler(device)
    start = time.perf_counter()
    with sampler:
        out = fn(*args, **kwargs)
    return out, {"wall_s": time.perf_counter() - start, **sampler.result()}
