"""Peak memory of a run, estimated in bytes from the architectures and the run config before anything is allocated.

A run holds some memory for its whole life (`MemoryEstimate.terms`: weights, gradients, AdamW state, a teacher, DDP
buckets, batches) and, one at a time, the working memory of its phases (`MemoryEstimate.phases`: a micro-batch's
forward and backward, the optimizer step, DWML's outer step, validation); the peak is the first plus the largest of
the second. `check_training_memory` (called by the trainer right after the students are named, before any is built)
and `check_folder_memory` (before a saved model folder is loaded; its config.json gives the shape) refuse with one
line when the estimate exceeds `memory_limit`: the memory available on the CPU (MemAvailable, capped by a cgroup
limit) or free on the GPU, or $DWML_MEMORY_LIMIT (bytes, or a size such as 8G; "off" skips the check).

The estimate is meant as a conservative but not absurd upper bound: the activation coefficients below are counts of
the tensors autograd saves, measured (`torch.autograd.graph.saved_tensors_hooks`) on RoBERTa and ModernBERT layers
and rounded up; tests/models/test_memory.py checks the estimate against a step measured by the profiler (upper
bound, within 10x) and the weight, gradient and AdamW terms against real tensors (exact).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import DwmlError
from .model import Arch, count_params

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig

F32 = 4  # bytes of an fp32 value: weights, gradients, AdamW moments, logits and losses are fp32 in every dtype
BF16 = 2
# Saved activations of one encoder layer in training mode (dropout on), in bytes per token. Measured on the CPU
# (saved_tensors_hooks): fp32 RoBERTa 40 per H + 8 per I + 12 per head and key, ModernBERT 36 per H + 20 per I + 12;
# bf16 autocast (matmul outputs bf16; residual stream, LayerNorm, softmax and dropout fp32) RoBERTa 35 + 4.5 + 12,
# ModernBERT 29 + 10.75 + 12. Each rounded up:
LAYER_HIDDEN = {False: 48, True: 40}  # (keyed by bf16) Q, K, V, context, LayerNorm inputs and outputs, dropout masks
LAYER_INTERMEDIATE = {("roberta", False): 12, ("roberta", True): 6,  # the FFN's dense output and GELU output;
                      ("modernbert", False): 24, ("modernbert", True): 12}  # GeGLU: its 2I input, GELU, product
LAYER_ATTENTION = 16  # per head and key position where the scores exist (math SDPA: the CPU, DWML's outer step):
#                       softmax, dropout mask, dropped probabilities + the raw scores of the layer in flight. On CUDA
#                       training SDPA's fused kernels keep only a log-sum-exp per head and query (LAYER_LSE).
LAYER_LSE = 8  # fused SDPA, per head and token: the fp32 log-sum-exp (+ its gradient)
NOGRAD_HIDDEN, NOGRAD_ATTENTION = 8, 2  # the same without autograd, for one layer at a time: residual, Q, K, V,
#                                       context, output, LayerNorm (+1); scores and softmax (math SDPA)
EMBEDDING_HIDDEN = 4  # per token: the embeddings' sum, LayerNorm input and output, dropout (measured ~2.5)
HEAD_HIDDEN = 4  # per masked position: gathered hidden state, dense, GELU and LayerNorm outputs of the LM head
LOGIT_COPIES = 3  # per masked position and vocabulary entry: the logits, the loss's gradient buffer (FusedPeerLoss,
#                   or cross-entropy's log-softmax), the gradient scaled by the micro-batch weight in backward
KL_COPIES = 5  # a KD / self-distillation KL term (`losses.kl_div`): two log-softmaxes, exp, difference, product
AUTOGRAD_PEER_COPIES = 5  # (M, N, V) tensors of `losses.dwml_coefficients` (kd_dwml, detach_targets = false):
#                           stacked logits, log-softmax, probabilities, a product and its gradient
# The fused kernels' row chunks (`distill/fused.py`, not imported here: models sit below distill): 32 rows of (M, V)
# on the CPU, up to 2**26 elements per temporary on a GPU; two temporaries (tempered softmax, mixture) at a time.
CPU_CHUNK_ROWS, GPU_CHUNK_ELEMENTS, CHUNK_TEMPORARIES = 32, 2**26, 2
# Parameter-sized fp32 buffers of DWML's outer step per parameter (`distill/unrolled.py: InnerStep` and
# `hypergrad.hypergradient`: the create_graph gradient, flat buckets of theta, m and v, m', v', sqrt(v'), the
# denominator, theta', the slope and the cotangent; double backward keeps most of them). Measured 12.5 (adamw,
# double_backward / jvp), 14.7 (adamw, per_peer), 6.2 (sgd).
OUTER_PARAM_COPIES = {"adamw": 16, "direct": 16, "sgd": 8}
# Activations of the outer step in inner steps (forward and backward) of the held-out batch, per distill.hypergrad:
# double_backward keeps the create_graph backward's graph too (measured 2.3-2.8 times an inner step in all); per_peer
# and jvp hold one forward's graph at a time (1.1-1.2, as the unroll direct: 1.0).
OUTER_ACTIVATION_STEPS = {"double_backward": 3.0, "per_peer": 1.5, "jvp": 1.5}
MASK_SIGMAS = 6  # masked positions: mask_prob of the tokens plus 6 standard deviations of the binomial
EVAL_TOKENS = {"cpu": 8192, "cuda": 65536}  # tokens per scoring batch (`evaluation/scoring.py` DEFAULT_TOKEN_BUDGET)
LIMIT_ENV = "DWML_MEMORY_LIMIT"


@dataclass
class MemoryEstimate:
    """Bytes held for the whole run (`terms`) and the working memory of each phase (`phases`, one at a time)."""

    terms: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The peak: everything held plus the largest phase."""
        return sum(self.terms.values()) + max(self.phases.values(), default=0)


def masked_positions(tokens: int, mask_prob: float) -> int:
    """An upper bound of the masked positions of a batch of `tokens` tokens (each real token is masked with
    probability mask_prob, `data/masking.py`): the binomial's mean plus MASK_SIGMAS standard deviations."""
    mean = mask_prob * tokens
    return min(tokens, math.ceil(mean + MASK_SIGMAS * math.sqrt(tokens * mask_prob * (1 - mask_prob))) + 1)


def aux_head_params(arch: Arch, sd_layers: Sequence[int] = ()) -> int:
    """Parameters of self-distillation's auxiliary heads (`distill/selfdistill.py: AuxLMHead`, decoder tied):
    RoBERTa dense H*H + H, LayerNorm 2H, bias V; ModernBERT input LayerNorm H, dense H*H, LayerNorm H, bias V."""
    H, V = arch.hidden, arch.vocab_size
    heads = len(set(sd_layers)) if sd_layers else max(0, arch.layers - 1)
    return heads * (H * H + (2 * H if arch.family == "modernbert" else 3 * H) + V)


def layer_bytes(arch: Arch, batch: int, seq_len: int, *, bf16: bool = False, fused_attention: bool = False) -> int:
    """What one encoder layer saves for backward at `batch` x `seq_len` tokens (see the coefficients above)."""
    attention = arch.heads * (LAYER_LSE if fused_attention else LAYER_ATTENTION * seq_len)
    ffn = LAYER_INTERMEDIATE.get((arch.family, bf16), LAYER_INTERMEDIATE[("roberta", bf16)])
    per_token = LAYER_HIDDEN[bf16] * arch.hidden + ffn * arch.intermediate + attention
    return batch * seq_len * per_token


def forward_backward_bytes(arch: Arch, batch: int, seq_len: int, n_masked: int, *, heads: int = 1,
                           bf16: bool = False, fused_attention: bool = False) -> int:
    """One student's forward and backward on one micro-batch; `heads` LM heads (self-distillation adds its own);
    `fused_attention`: SDPA's fused CUDA kernels, which form no (T, T) scores."""
    tokens, H, V = batch * seq_len, arch.hidden, arch.vocab_size
    keys = 0 if fused_attention else arch.heads * seq_len
    return (arch.layers * layer_bytes(arch, batch, seq_len, bf16=bf16, fused_attention=fused_attention)  # all layers
            + tokens * EMBEDDING_HIDDEN * H * F32  # the embeddings' outputs
            + batch * seq_len * seq_len * F32  # Hugging Face's 4-D attention mask of this forward
            + heads * n_masked * HEAD_HIDDEN * H * F32  # the LM head(s) at the masked positions only
            + heads * n_masked * V * (LOGIT_COPIES * F32 + (BF16 if bf16 else 0))  # logits (+ bf16 before upcast)
            + 2 * tokens * (H + arch.intermediate + keys) * F32  # gradients in flight through one layer in backward
            + (count_params(arch) * BF16 if bf16 else 0))  # autocast's bf16 weight copies, saved for backward


def nograd_forward_bytes(arch: Arch, batch: int, seq_len: int, n_logits: int) -> int:
    """A forward without autograd (teacher, validation, scoring): nothing is saved, earlier layers are freed, so one
    layer's input and temporaries (NOGRAD_HIDDEN H + the FFN's + scores and softmax per head and key), the attention
    mask, and the logits with a log-softmax (fp32 counts: an upper bound for bf16 too)."""
    per_token = (NOGRAD_HIDDEN * arch.hidden + NOGRAD_ATTENTION * arch.heads * seq_len
                 + LAYER_INTERMEDIATE.get((arch.family, False), 12) // F32 * arch.intermediate) * F32
    return (batch * seq_len * per_token + batch * seq_len * seq_len * F32
            + 2 * n_logits * arch.vocab_size * F32)


def training_estimate(cfg: RunConfig, archs: Sequence[tuple[str, Arch]], *, device_type: str = "cpu",
                      bf16: bool = False, teacher: Arch | None = None, world_size: int = 1) -> MemoryEstimate:
    """Peak memory of training `archs` (as `training/setup.py: resolve_archs` names them) under `cfg` on one rank."""
    t, d, data = cfg.train, cfg.distill, cfg.data
    method, T, B, M = t.method, data.seq_len, t.batch_size, len(archs)
    models = [a for _, a in archs]
    aux = [aux_head_params(a, d.sd_layers) if method == "sd" else 0 for a in models]
    P = [count_params(a) + x for a, x in zip(models, aux)]
    heads = [1 + (len(set(d.sd_layers)) if d.sd_layers else max(0, a.layers - 1)) if method == "sd" else 1
             for a in models]  # LM heads per student: self-distillation adds an auxiliary head per chosen layer
    N = masked_positions(B * T, max(data.mask_prob, data.mask_prob_end))  # a schedule's highest rate
    est = MemoryEstimate()
    est.terms["parameters"] = F32 * sum(P)  # fp32 master weights (autocast never changes the parameters' dtype)
    est.terms["gradients"] = F32 * sum(P)  # fp32 .grad of every parameter, kept from backward to the next step
    est.terms["optimizer"] = 2 * F32 * sum(P)  # AdamW's exp_avg and exp_avg_sq, fp32
    if world_size > 1:
        est.terms["ddp_buckets"] = F32 * sum(P)  # DDP's gradient buckets: one more copy of the gradients
    if teacher is not None:
        est.terms["teacher"] = F32 * count_params(teacher)  # the frozen teacher's fp32 weights
    Be = t.eval_batch_size
    Ne = masked_positions(Be * T, data.eval_mask_prob)
    Bh = d.heldout_batch_size or max(1, B // 2)
    Nh = masked_positions(Bh * T, data.mask_prob)
    batch_bytes = 2 * 8 * B * T + 2 * 8 * N  # int64 input ids, attention mask, positions, labels of a batch
    # The micro-batches of a step, the prefetch queue, the held-out stream and the fixed validation batches.
    est.terms["batches"] = ((t.grad_accum + data.prefetch + 1) * batch_bytes
                            + t.eval_batches * (2 * 8 * Be * T + 2 * 8 * Ne) + 2 * 8 * Bh * T)

    # A training micro-batch: every student's graph is alive at once (`Trainer.forward_all`, then one backward).
    fused = device_type == "cuda"  # SDPA's fused kernels on CUDA; the math kernel on the CPU
    step = sum(forward_backward_bytes(a, B, T, N, heads=h, bf16=bf16, fused_attention=fused)
               for a, h in zip(models, heads))
    if method == "sd":
        step += sum(h - 1 for h in heads) * KL_COPIES * N * models[0].vocab_size * F32  # each aux head's KD term
    if method in ("dml", "dwml", "kd_dwml"):  # the fused peer loss's row-chunk temporaries
        V = models[0].vocab_size
        rows = CPU_CHUNK_ROWS * M * V if device_type == "cpu" else max(GPU_CHUNK_ELEMENTS, CPU_CHUNK_ROWS * M * V)
        step += CHUNK_TEMPORARIES * min(M * N * V, rows) * F32
        if method == "kd_dwml" or not d.detach_targets:  # eq. (2) by autograd over (M, N, V) tensors
            step += AUTOGRAD_PEER_COPIES * M * N * V * F32
    if teacher is not None:  # its forward runs while the students' graphs are alive; its logits stay for the loss
        step += nograd_forward_bytes(teacher, B, T, N) + M * KL_COPIES * N * teacher.vocab_size * F32
    est.phases["activations"] = step
    # The optimizer step: the CPU's foreach AdamW forms sqrt(v) for all of a student's parameters (the fused CUDA
    # kernel forms nothing); the students step one after another.
    est.phases["optimizer_step"] = F32 * max(P) if device_type == "cpu" else 0
    if method in ("dwml", "kd_dwml") and d.learn_omega:  # DWML's outer step (`distill/hypergrad.py`), in fp32
        # No autocast; second-order modes force the math SDPA kernel (scores materialised), per_peer and direct not.
        second_order = d.hypergrad != "per_peer" and d.unroll != "direct"
        outer = sum(forward_backward_bytes(a, Bh, T, Nh, fused_attention=fused and not second_order) for a in models)
        steps = OUTER_ACTIVATION_STEPS[d.hypergrad] if d.unroll != "direct" else OUTER_ACTIVATION_STEPS["per_peer"]
        est.phases["outer_step"] = int(steps * outer) + OUTER_PARAM_COPIES[d.unroll] * F32 * sum(P)
    # Validation (no autograd): every student's logits are kept for the ensemble's loss over (M, N, V) stacks.
    V = models[0].vocab_size
    est.phases["validation"] = (max(nograd_forward_bytes(a, Be, T, 0) for a in models) + M * Ne * V * F32
                                + (3 * M if M > 1 else 2) * Ne * V * F32)
    return est


def inference_estimate(arch: Arch, tokens: int) -> MemoryEstimate:
    """Loading a model and scoring batches of `tokens` tokens (`dwml eval`, `dwml export`): the fp32 weights and a
    forward without autograd whose logits cover every position (the peer ensemble reads full logits)."""
    T = min(arch.max_positions, tokens)
    return MemoryEstimate(terms={"parameters": F32 * count_params(arch)},
                          phases={"forward": nograd_forward_bytes(arch, max(1, tokens // T), T, tokens)})


def finetune_estimate(arch: Arch, batch: int, seq_len: int) -> MemoryEstimate:
    """Fine-tuning a classifier (`dwml finetune`): weights, gradients and AdamW state of the encoder (its LM head is
    replaced by a small classifier) and a forward and backward of one batch."""
    P = count_params(arch)
    one_head = arch.replace(vocab_size=1)  # the classifier's logits are (B, labels): no vocabulary-sized tensors
    return MemoryEstimate(terms={"parameters": F32 * P, "gradients": F32 * P, "optimizer": 2 * F32 * P},
                          phases={"activations": forward_backward_bytes(one_head, batch, seq_len, batch)})


# --------------------------------------------------------------------------------------------------------------
# The limit


def parse_size(text: str) -> int | None:
    """Bytes of "8G", "512MiB", "1.5T", "123" (binary multiples); None for "off"."""
    s = text.strip().lower()
    if s in ("off", "none", "inf"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgtp]?)(?:i?b)?", s)
    if not m:
        raise DwmlError(f"{LIMIT_ENV}: expected a number of bytes or a size like 8G or 512M (or off), got {text!r}")
    number, unit = float(m.group(1)), m.group(2)
    return int(number * 1024 ** ("kmgtp".index(unit) + 1)) if unit else int(number)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """What the process's cgroup (v2 memory.max, v1 memory.limit_in_bytes) still allows, counting its inactive page
    cache as free; None without a limit."""
    for base, limit_name, usage_name, inactive in (
            (Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"),
            (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        limit, usage = _read_int(base / limit_name), _read_int(base / usage_name)
        if limit is None or usage is None or limit >= 1 << 60:  # "max", or v1's "no limit" (a huge number)
            continue
        cache = 0
        try:
            for line in (base / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive and value.strip().isdigit():
                    cache = int(value)
        except OSError:
            pass
        return max(0, limit - usage + cache)
    return None


def cpu_available() -> int | None:
    """Bytes this process can still allocate: /proc/meminfo's MemAvailable (else os.sysconf's free pages), capped by
    the cgroup's limit; None when neither can be read."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    cgroup = _cgroup_available()
    return cgroup if found is None else found if cgroup is None else min(found, cgroup)


def memory_limit(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """(bytes, what they are) for `device`: $DWML_MEMORY_LIMIT, else free GPU memory or available CPU memory; None
    bytes when nothing limits (the check is skipped)."""
    env = os.environ.get(LIMIT_ENV, "").strip()
    if env:
        return parse_size(env), f"allowed by {LIMIT_ENV}"
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    return cpu_available(), "available"


# --------------------------------------------------------------------------------------------------------------
# The checks


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if n >= 100 or unit == "B" else f"{n:.1f} {unit}"


def format_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def describe(name: str, arch: Arch) -> str:
    """'peer0 (1000 layers x 65536 hidden, 51.6T params)'."""
    return f"{name} ({arch.layers} layers x {arch.hidden} hidden, {format_count(count_params(arch))} params)"


def refuse_if_over(est: MemoryEstimate, device: torch.device | str, who: str, what: str) -> None:
    """DwmlError (one line) when `est` exceeds `memory_limit(device)`."""
    limit, source = memory_limit(device)
    if limit is not None and est.total > limit:
        raise DwmlError(f"{who}: needs ~{format_bytes(est.total)} {what}, {format_bytes(limit)} {source}; use a "
                        f"smaller model or batch ({LIMIT_ENV}=off skips this check)")


def check_training_memory(cfg: RunConfig, archs: Sequence[tuple[str, Arch]], device: torch.device | str, *,
                          bf16: bool = False, teacher: Arch | None = None, world_size: int = 1) -> MemoryEstimate:
    """Refuse a training run that would not fit, naming its largest model; CPU ranks of one host share its memory."""
    import torch

    device = torch.device(device)
    est = training_estimate(cfg, archs, device_type=device.type, bf16=bf16, teacher=teacher, world_size=world_size)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if device.type == "cpu" else 1
    if ranks > 1:
        est.terms = {k: v * ranks for k, v in est.terms.items()}
        est.phases = {k: v * ranks for k, v in est.phases.items()}
    named = list(archs) + ([("teacher", teacher)] if teacher is not None else [])
    name, arch = max(named, key=lambda na: count_params(na[1]))
    others = len(named) - 1
    who = describe(name, arch) + (f" and {others} other model{'s' * (others > 1)}" if others else "")
    t = cfg.train
    accum = f" (x{t.grad_accum} accumulated)" if t.grad_accum > 1 else ""
    refuse_if_over(est, device, who, f"for training at batch {t.batch_size} x {cfg.data.seq_len}{accum}")
    return est


def arch_from_folder(path: str | Path) -> Arch | None:
    """The shape in a Hugging Face folder's config.json (read as JSON, no model code); None without one. A model type
    that is no dwml family is taken as RoBERTa-like, which is all the estimate needs."""
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        family = data.get("model_type") if data.get("model_type") in ("roberta", "modernbert") else "roberta"
        return Arch(layers=data["num_hidden_layers"], heads=data["num_attention_heads"], hidden=data["hidden_size"],
                    intermediate=data["intermediate_size"], vocab_size=data["vocab_size"],
                    max_positions=data.get("max_position_embeddings", 514), family=family)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DwmlError):
        return None  # no or an unreadable config: loading it reports that better


def check_folder_memory(path: str | Path, device: torch.device | str = "cpu", *, batch: int = 0,
                        seq_len: int = 128) -> None:
    """Before `from_pretrained(path)`: refuse a model that would not fit. `batch` > 0: fine-tuning at batch x seq_len
    (`finetune_estimate`); else scoring (`inference_estimate`, EVAL_TOKENS of the device per batch)."""
    import torch

    arch = arch_from_folder(path)
    if arch is None:
        return
    device = torch.device(device)
    if batch:
        est, what = finetune_estimate(arch, batch, seq_len), f"for fine-tuning at batch {batch} x {seq_len}"
    else:
        tokens = EVAL_TOKENS.get(device.type, EVAL_TOKENS["cpu"])
        est, what = inference_estimate(arch, tokens), f"to load and score batches of {tokens} tokens"
    refuse_if_over(est, device, describe(str(path), arch), what)
