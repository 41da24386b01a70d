"""Distillation losses over the N masked positions of a batch.

Every function here is pure: logits in, scalar (and logging parts) out, no state. Inputs are the (N, V) logits at the
masked positions only (see `dwml.models.model.masked_logits`), so every mean is over the N masked tokens - never over
unmasked or padded positions (the public code of the paper sums its KL over all positions; we do not).

Precision: half/bfloat16 logits are upcast to fp32 before any softmax (`_upcast`); fp32 and fp64 are kept as they are,
so the finite-difference tests can run everything in fp64.

KL direction: `kl_div(target, student)` is KL(p_target || p_student) = sum_v p_target (log p_target - log p_student),
the "forward" KL of Hinton et al. (2015) and of deep mutual learning (Zhang et al. 2018, eq. 1), where the student is
pulled towards covering the target's mass. A KL at temperature T is multiplied by T^2 wherever it is mixed with a
cross-entropy, so its gradient scale does not shrink as 1/T^2 (Hinton et al. 2015, section 2).

Deep weighted mutual learning (Iyer 2024, arXiv 2411.16487, eq. 2) with peers i = 1..M, peer weights omega on the
simplex and mixing weight alpha:

    L1(theta, omega) = (1 - alpha) * sum_i omega_i CE(z_i, Y)
                       + alpha * T^2 * sum_i sum_{j != i} omega_j KL(p_j^T || p_i^T)

Peer i is pulled towards each other peer j in proportion to j's weight, so a peer the outer loop trusts more teaches
more. The paper (../shared/paper/when-babies-teach-babies.md, eq. 2) writes the term as
alpha sum_i sum_j omega_j KL(z_i, z_j) and says omega_j is "the importance of every other student model except the
i-th one"; it leaves the KL's argument order and the temperature implicit. We read KL(z_i, z_j) as the divergence
of student i from teacher j, KL(p_j || p_i) (j = i adds 0), which is also the weighting of the paper's public code
(`wml_loss`: CE of peer i weighted by weights[i], `kl_div(log p_i, log p_j)` = KL(p_j || p_i) weighted by
weights[j]) and of the WML paper it builds on (Zhang et al. 2022); the T^2 factor is Hinton's (T = 1 reproduces the
paper's formula exactly). With omega_i = 1/M (and alpha = 1/M) it reduces to DML (Zhang et al. 2018, eq. 2), up to a
constant factor; see `tests/distill/test_losses.py::test_dml_special_case`.

L1 is linear in omega: L1 = sum_k omega_k h_k(theta) with h_k = dL1/domega_k (`dwml_coefficients`). The hypergradient
(`dwml.distill.hypergrad`, eq. 3) relies on exactly this structure.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import require
from .fused import DWMLCoefficients, FusedEnsembleLoss, FusedPeerLoss

ENSEMBLE_KINDS = ("ensemble", "logit_ensemble", "sum")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """At least fp32: softmax/log-sum-exp over a 16k vocabulary in half precision loses the small KL values."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def _check_alpha_temperature(alpha: float, temperature: float) -> None:
    require(0.0 <= float(alpha) <= 1.0, f"alpha: expected a number in [0, 1], got {alpha!r}")
    require(float(temperature) > 0.0, f"temperature: expected a positive number, got {temperature!r}")


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, V) logits against the (N,) true token ids, averaged over the N masked positions.

    On the CPU, when a gradient is wanted, the value and its closed-form gradient come from one softmax pass in cache-
    sized chunks (`FusedPeerLoss` with alpha = 0): 1.6-2x faster than F.cross_entropy's log_softmax + NLL + their
    two backward passes over (N, V) (benchmarks/bench_losses.py; benchmarks/bench_dwml_overhead.py trains its
    independent arm with it). Its backward is not differentiable again: no caller differentiates a cross-entropy
    twice (the outer step's second derivatives go through `dwml_coefficients_outer` / `dwml_coefficients`), and one
    that did would get an error, not a silent zero.
    """
    z = _upcast(logits)
    if z.device.type == "cpu" and z.requires_grad and torch.is_grad_enabled():
        return FusedPeerLoss.apply(labels, z.new_ones(1), 0.0, 1.0, z)[0]
    return F.cross_entropy(z, labels)


def kl_div(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_target || p_student) of the softmaxes at `temperature`, summed over V and averaged over positions.

    Not multiplied by T^2 and not detached: callers decide (see the module docstring).
    """
    log_t = F.log_softmax(_upcast(target_logits) / temperature, dim=-1)
    log_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Hinton et al. (2015): (1 - alpha) * CE(student, Y) + alpha * T^2 * KL(teacher_T || student_T).

    The teacher is a fixed target: its logits are detached.
    """
    _check_alpha_temperature(alpha, temperature)
    soft = kl_div(teacher_logits.detach(), student_logits, temperature)
    return (1.0 - alpha) * mlm_loss(student_logits, labels) + alpha * temperature**2 * soft


def dwml_coefficients(
    logits_list: Sequence[torch.Tensor],
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    detach_targets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coefficients h (M,) of omega in eq. (2), so that L1 = sum_k omega_k h_k, plus CE (M,) and KL (M, M).

    h_k = (1 - alpha) CE_k + alpha T^2 sum_{i != k} KL(p_k || p_i): everything peer k contributes as a teacher
    (and its own CE). kl[j, i] = KL(p_j^T || p_i^T) (row j = target/teacher, column i = student), diagonal zero.
    With `detach_targets` the target side p_j of every KL is a constant, so the KL term only trains the student i
    (as in DML); otherwise the gradient also pushes the teacher towards the student.
    """
    _check_alpha_temperature(alpha, temperature)
    num_peers = len(logits_list)
    require(num_peers >= 1, "dwml: expected at least one peer")
    z = torch.stack([_upcast(x) for x in logits_list])  # (M, N, V)
    n = z.shape[1]

    log_p1 = F.log_softmax(z, dim=-1)
    ce = -log_p1.gather(-1, labels.view(1, n, 1).expand(num_peers, n, 1)).squeeze(-1).mean(1)

    log_p = log_p1 if temperature == 1.0 else F.log_softmax(z / temperature, dim=-1)
    log_t = log_p.detach() if detach_targets else log_p
    p_t = log_t.exp()
    # kl[j, i] = sum p_j log p_j - sum p_j log p_i, averaged over positions. One (M, N, V) product per student i
    # (not a matmul: TF32 matmuls would swamp KL values of 1e-3 in a sum of O(10) terms); the products are freed
    # right after their sums, so memory stays at the shared log_p / p_t tensors instead of M^2 (N, V) temporaries.
    neg_entropy = (p_t * log_t).sum((1, 2)) / n  # (M,)
    cross = torch.stack([(p_t * log_p[i]).sum((1, 2)) for i in range(num_peers)], dim=1) / n  # (M, M)
    off_diagonal = 1.0 - torch.eye(num_peers, dtype=z.dtype, device=z.device)
    kl = (neg_entropy[:, None] - cross) * off_diagonal

    h = (1.0 - alpha) * ce + alpha * temperature**2 * kl.sum(1)
    return h, ce, kl


def dwml_coefficients_outer(
    logits_list: Sequence[torch.Tensor],
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """h (M,) of `dwml_coefficients` with constant KL targets, for the outer step (`dwml.distill.hypergrad`): the same value
    and the derivatives it takes (the gradient, the gradient's derivative in omega, a JVP) in closed form, in
    cache-sized chunks instead of autograd over O(M^2) (M, N, V) temporaries. A second derivative through the
    logits is not available (tested: `tests/distill/test_losses.py`).
    """
    _check_alpha_temperature(alpha, temperature)
    require(len(logits_list) >= 1, "dwml: expected at least one peer")
    return DWMLCoefficients.apply(labels, float(alpha), float(temperature), *[_upcast(x) for x in logits_list])[0]


def dwml_loss(
    logits_list: Sequence[torch.Tensor],
    labels: torch.Tensor,
    omega: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    detach_targets: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (2): (1 - alpha) sum_i omega_i CE_i + alpha T^2 sum_i sum_{j != i} omega_j KL(p_j^T || p_i^T).

    Returns (total, parts); parts are detached tensors for logging (no host sync): "ce" (M,), "kl" (M, M) with
    kl[j, i] = KL(p_j || p_i), "h" (M,) = dL1/domega, and the two weighted terms "ce_term" and "kl_term".
    """
    h, ce, kl = dwml_coefficients(logits_list, labels, alpha, temperature, detach_targets)
    require(omega.shape == h.shape, f"omega: expected shape {tuple(h.shape)}, got {tuple(omega.shape)}")
    w = omega.to(h.dtype)
    total = (w * h).sum()
    parts = {
        "ce": ce.detach(),
        "kl": kl.detach(),
        "h": h.detach(),
        "ce_term": ((1.0 - alpha) * (w * ce).sum()).detach(),
        "kl_term": (alpha * temperature**2 * (w * kl.sum(1)).sum()).detach(),
    }
    return total, parts


def dwml_inner_loss(
    logits_list: Sequence[torch.Tensor],
    labels: torch.Tensor,
    omega: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (2) with detached KL targets, for the inner loop's hot path: the same value and gradients as
    `dwml_loss(..., detach_targets=True)` (tested), with the gradient in closed form (`FusedPeerLoss`) and O(M)
    instead of O(M^2) passes over the (N, V) logits. parts: "ce" (M,) and "kl" (M,) = sum_{j != i} omega_j
    KL(p_j || p_i) per student i.
    """
    _check_alpha_temperature(alpha, temperature)
    zs = [_upcast(x) for x in logits_list]
    require(omega.shape == (len(zs),), f"omega: expected shape ({len(zs)},), got {tuple(omega.shape)}")
    total, ce, kl = FusedPeerLoss.apply(labels, omega.detach().to(zs[0].dtype), float(alpha), float(temperature),
                                         *zs)
    return total, {"ce": ce, "kl": kl}


def kd_dwml_loss(
    logits_list: Sequence[torch.Tensor],
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    omega: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    detach_targets: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DWML plus a fixed teacher as an extra supervisor of every peer:

        L = L1 (eq. 2) + beta * T^2 * sum_i KL(p_teacher^T || p_i^T)

    The teacher enters like one more peer in eq. (2)'s sum over j, with a fixed weight beta instead of a learned
    omega_j: in eq. (2) a student's KL is weighted by its teacher's importance, so every peer gets the same beta.
    The term does not depend on omega, so dL/domega_k is that of L1 alone and beta = 0 gives exactly `dwml_loss`;
    it does move the inner step, so the outer step's unroll includes it (`dwml.distill.hypergrad.hypergradient`'s
    `teacher_logits`): with the AdamW unroll also its derivative, since that step is not linear in the gradient.
    The teacher's logits are detached. parts adds "teacher_kl" (M,).
    """
    require(float(beta) >= 0.0, f"beta: expected a non-negative number, got {beta!r}")
    total, parts = dwml_loss(logits_list, labels, omega, alpha, temperature, detach_targets)
    term, teacher_kl = teacher_term(logits_list, teacher_logits, beta, temperature)
    parts["teacher_kl"] = teacher_kl.detach()
    return total + term, parts


def teacher_term(logits_list: Sequence[torch.Tensor], teacher_logits: torch.Tensor, beta: float,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """kd_dwml's teacher term beta T^2 sum_i KL(p_teacher^T || p_i^T) and the KLs (M,); the teacher is detached.
    The one formula of the inner loss (`kd_dwml_loss`) and of the outer step's unrolled inner step."""
    teacher = teacher_logits.detach()
    teacher_kl = torch.stack([kl_div(teacher, z, temperature) for z in logits_list])
    return beta * temperature**2 * teacher_kl.sum(), teacher_kl


def ensemble_logprobs(logits_list: Sequence[torch.Tensor], omega: torch.Tensor) -> torch.Tensor:
    """log sum_i omega_i softmax(z_i): the (N, V) log-probabilities of the omega-weighted mixture of the peers.

    Computed as logsumexp_i(log omega_i + log_softmax(z_i)), which never forms the probabilities. omega is expected
    on the simplex (then each row is a distribution); it is not renormalised, so derivatives w.r.t. each omega_k
    are the plain partials the hypergradient needs.
    """
    log_p = F.log_softmax(torch.stack([_upcast(x) for x in logits_list]), dim=-1)  # (M, N, V)
    log_w = torch.log(omega.to(log_p.dtype)).view(-1, 1, 1)
    return torch.logsumexp(log_w + log_p, dim=0)


def ensemble_loss(
    logits_list: Sequence[torch.Tensor],
    labels: torch.Tensor,
    omega: torch.Tensor,
    kind: str = "ensemble",
) -> torch.Tensor:
    """The outer objective L2 of eq. (3) on a held-out batch.

    kind="ensemble" (default): CE of the probability mixture sum_i omega_i p_i. This is the ensemble one would
      actually deploy (averaging distributions is valid for peers of any calibration), its CE is convex in omega
      (-log of a linear function) and its gradient -p_k(y) / p_mix(y) rewards a peer for the tokens it gets right
      that the others miss, i.e. for diversity, which is the point of weighting the peers.
    kind="logit_ensemble": CE of softmax(sum_i omega_i z_i) (logit averaging; also convex in omega, but mixes
      logits of differently scaled peers and implicitly changes the temperature).
    kind="sum": sum_i omega_i CE_i, the public code's "ensemble loss". It is linear in omega, so its direct
      gradient is just the peers' CE and mirror descent drifts all weight to the single best peer.
    """
    require(kind in ENSEMBLE_KINDS, f"l2_kind: expected one of {list(ENSEMBLE_KINDS)}, got {kind!r}")
    if kind == "ensemble":
        zs = [_upcast(x) for x in logits_list]
        if torch.is_grad_enabled() and (omega.requires_grad or any(z.requires_grad for z in zs)):
            return FusedEnsembleLoss.apply(labels, omega.to(zs[0].dtype), *zs)
        return F.nll_loss(ensemble_logprobs(zs, omega), labels)
    z = torch.stack([_upcast(x) for x in logits_list])
    w = omega.to(z.dtype)
    if kind == "logit_ensemble":
        return mlm_loss((w.view(-1, 1, 1) * z).sum(0), labels)
    return (w * torch.stack([mlm_loss(x, labels) for x in z])).sum()
