"""Training cost: analytic FLOPs of a RoBERTa or ModernBERT masked LM (the count that torch makes of a real step, and
GPU utilisation, are measured in `dwml.training.measure`).

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
measured, not modelled (`dwml.training.measure.measure_step_flops`).

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

from dataclasses import dataclass
from typing import Any

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


# --------------------------------------------------------------------------------------------------------------
# GPU utilisation


