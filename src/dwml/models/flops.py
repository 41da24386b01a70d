"""Training cost: analytic FLOPs of a RoBERTa masked LM, the same counted by torch on a real step, GPU utilisation.

Analytic count (Kaplan et al. 2020, "6ND", made exact for our models). A FLOP is one multiply or one add, so a
matrix product of (m x k) by (k x n) costs 2mkn. Only matrix products are counted (what `FlopCounterMode` counts too):
biases, LayerNorms, GELU, softmax and the losses are O(H) or O(V) per token against O(H^2) or O(VH) for the products
and are left out. Per token of a sequence of length T, for an encoder with L layers, width H, FFN width I,
vocabulary V:

    N_enc  = L (4 H^2 + 2 H I)   weights that multiply every token: Q, K, V, O projections and the two FFN matrices.
                                 Embeddings (word, position, token type) are table look-ups: no FLOPs, not in N_enc.
    attn   = 4 L T H             QK^T (2 T H: each token's query against T keys, all heads together) and A V (2 T H).
    N_head = H^2 + V H           the LM head: its dense layer and the vocabulary projection (tied to the word
                                 embeddings). `dwml.models.model.masked_logits` runs the head only at the masked positions,
                                 a fraction f = n_masked / tokens (about mask_prob = 15% of the non-special tokens),
                                 so the head costs f N_head per token instead of N_head: for a small model, where
                                 V H >> N_enc, this is most of the saving.

    forward  = 2 N_enc + 4 L T H + 2 f N_head                                        per token
    training = 3 x forward = 6 N_enc + 12 L T H + 6 f N_head                          per token
               (backward = 2 x forward: one product for the input gradient and one for the weight gradient of every
               matrix product; the input gradient of the first layer is needed too, because the embeddings train.)

Method extras: kd / kd_dwml add a frozen teacher's forward (its `forward` above, no backward); sd adds one auxiliary
LM head per supervised layer (each another 6 f N_head per token, tied to the word embeddings). DWML's outer omega
step (eq. 3, every K steps) runs extra forwards and backwards whose cost depends on `distill.hypergrad`; it is
measured, not modelled (`measure_step_flops`).

Measured count: `torch.utils.flop_counter.FlopCounterMode` over one training micro-step (forward of every student
(+ teacher), the method's loss, backward) on a real masked batch, attention in SDPA's math backend (`count_flops`).
For mlm, kd and sd it counts exactly the products above, so measured / analytic = 1 up to rounding (the tests check
1e-6): a check that the formula describes what the code runs (e.g. that the vocabulary projection really runs at
masked positions only). The peer losses (dml, dwml) add a few products of size O(M n_masked V) inside the loss
(~0.1% of a step for the tiny experiment's peers), which the formula leaves out with the other loss arithmetic.
Fused attention kernels would be counted differently by torch: CUDA's flash / memory-efficient SDPA backward
recomputes Q K^T (14 L T H instead of 12 L T H per token), and CPU's fused kernel without autograd is not counted.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from .model import Arch

# A peak number to turn FLOPs into time: H100 SXM dense bf16 tensor-core peak (989.4 TFLOP/s, NVIDIA datasheet;
# the 1,979 figure is with 2:4 sparsity). MFU = achieved / peak; 40% is a good small-model BERT-style training run.
H100_BF16_PEAK = 989.4e12


def encoder_matmul_params(arch: Arch) -> int:
    """N_enc = L (4 H^2 + 2 H I): the weights that multiply every token (no embeddings, biases or LayerNorms);
    L (4 H^2 + 3 H I) for ModernBERT, whose GeGLU input projection is H -> 2I."""
    H, I = arch.hidden, arch.intermediate
    ffn = 3 if arch.family == "modernbert" else 2
    return arch.layers * (4 * H * H + ffn * H * I)


def head_matmul_params(arch: Arch) -> int:
    """N_head = H^2 + V H: LM-head dense layer + (tied) vocabulary projection, applied at masked positions only."""
    return arch.hidden * arch.hidden + arch.vocab_size * arch.hidden


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token, split by part (training = 3x each)."""

    encoder: float  # 2 N_enc
    attention: float  # 4 L T H
    head: float  # 2 f N_head

    @property
    def forward(self) -> float:
        return self.encoder + self.attention + self.head

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def token_flops(arch: Arch, seq_len: int, mask_frac: float, heads: int = 1) -> TokenFlops:
    """Forward FLOPs per token for sequences of `seq_len` tokens with a fraction `mask_frac` of them masked.

    `heads` = number of LM heads run at the masked positions (1, or 1 + the auxiliary heads of self-distillation).
    """
    return TokenFlops(
        encoder=2.0 * encoder_matmul_params(arch),
        attention=4.0 * arch.layers * seq_len * arch.hidden,
        head=2.0 * mask_frac * heads * head_matmul_params(arch),
    )


def step_flops(arch: Arch, batch: int, seq_len: int, n_masked: int, *, heads: int = 1,
               backward: bool = True) -> float:
    """FLOPs of one forward (+ backward) of one model on a (batch x seq_len) micro-batch with n_masked targets.

    Exact for a concrete batch: the same products `FlopCounterMode` counts (see the module docstring).
    """
    tokens = batch * seq_len
    per_token = token_flops(arch, seq_len, n_masked / tokens, heads=heads)
    return (3.0 if backward else 1.0) * per_token.forward * tokens


def run_flops(archs: list[Arch], tokens: float, seq_len: int, mask_frac: float, *, teacher: Arch | None = None,
              sd_heads: int = 0) -> dict[str, Any]:
    """Analytic training FLOPs of a run whose every student sees `tokens` tokens.

    Returns {"per_student": [FLOPs], "teacher_forward": FLOPs (0 without a teacher), "total": sum of all}.
    """
    per_student = [token_flops(a, seq_len, mask_frac, heads=1 + sd_heads).train * tokens for a in archs]
    teacher_fwd = token_flops(teacher, seq_len, mask_frac).forward * tokens if teacher is not None else 0.0
    return {"per_student": per_student, "teacher_forward": teacher_fwd, "total": sum(per_student) + teacher_fwd}


def gpu_hours(flops: float, mfu: float = 0.4, peak: float = H100_BF16_PEAK) -> float:
    """Hours for `flops` at `mfu` of `peak` FLOP/s."""
    return flops / (mfu * peak) / 3600.0


# --------------------------------------------------------------------------------------------------------------
# Measured


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

    from ..distill.hypergrad import hypergradient
    from ..data.masking import BatchStream
    from ..distill.methods import METHOD_LOSSES, TEACHER_METHODS
    from .model import Student, build_model
    from ..training.runtime import resolve_device
    from ..distill.selfdistill import SelfDistillHeads
    from ..data.shards import PackedSequences, load_meta
    from ..training.setup import load_teacher, resolve_archs

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
        from .model import masked_logits

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
        from ..training.setup import make_optimizer

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


# --------------------------------------------------------------------------------------------------------------
# GPU utilisation


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
