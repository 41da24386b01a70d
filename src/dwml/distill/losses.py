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
constant factor; see `tests/test_losses.py::test_dml_special_case`.

L1 is linear in omega: L1 = sum_k omega_k h_k(theta) with h_k = dL1/domega_k (`dwml_coefficients`). The hypergradient
(`dwml.distill.hypergrad`, eq. 3) relies on exactly this structure.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import require

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
    sized chunks (`_FusedPeerLoss` with alpha = 0): 1.6-2x faster than F.cross_entropy's log_softmax + NLL + their
    two backward passes over (N, V) (benchmarks/bench_losses.py; benchmarks/bench_dwml_overhead.py trains its
    independent arm with it). Its backward is not differentiable again: no caller differentiates a cross-entropy
    twice (the outer step's second derivatives go through `dwml_coefficients_outer` / `dwml_coefficients`), and one
    that did would get an error, not a silent zero.
    """
    z = _upcast(logits)
    if z.device.type == "cpu" and z.requires_grad and torch.is_grad_enabled():
        return _FusedPeerLoss.apply(labels, z.new_ones(1), 0.0, 1.0, z)[0]
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


def _mixture(w: torch.Tensor, p: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """sum_k w_k p_k over the peers, elementwise: a matmul would run in TF32 on a GPU (the trainer enables it),
    which is too coarse for a term of the gradient."""
    mix = p[0] * w[0]
    for k in range(1, len(p)):
        mix.addcmul_(p[k], w[k])
    return mix


def _chunks(n: int, z: torch.Tensor, num_peers: int):
    chunk = _row_chunk(z, num_peers)
    return [slice(start, start + chunk) for start in range(0, n, chunk)]


def _coefficient_jvp(labels, alpha: float, temperature: float, p1, p, cs) -> torch.Tensor:
    """sum_i <c_i, dh_k/dz_i> for every k (M,): the derivative of h along logit directions c_i, which is also the
    derivative of h's closed-form gradient with respect to its cotangent (see `_DWMLCoefficients`).

        dh_k/dz_i = [(1 - alpha) delta_ik (p1_k - onehot(y)) + alpha T (p_i - p_k)] / N   (per row)
    """
    num_peers, n = p1.shape[0], p1.shape[1]
    out = p1.new_zeros(num_peers)
    for rows in _chunks(n, p1[0], num_peers):
        cc = [c[rows] for c in cs]
        total_c = torch.stack(cc).sum(0)
        pt = p[:, rows]
        own = sum(torch.vdot(cc[i].flatten(), pt[i].flatten()) for i in range(num_peers))  # sum_i <c_i, p_i>
        for k in range(num_peers):
            ce_k = torch.vdot(cc[k].flatten(), p1[k, rows].flatten()) - cc[k].gather(-1, labels[rows].view(-1, 1)).sum()
            kl_k = own - torch.vdot(total_c.flatten(), pt[k].flatten())
            out[k] += (1.0 - alpha) * ce_k + alpha * temperature * kl_k
    return out / n


class _DWMLCoefficientsGrad(torch.autograd.Function):
    """The closed-form gradient of h (below) for a cotangent a (M,):

        dz_i = sum_k a_k dh_k/dz_i = [(1 - alpha) a_i (p1_i - onehot(y)) + alpha T (A p_i - sum_k a_k p_k)] / N

    with A = sum_k a_k; differentiable in a (it is linear in a; the derivative is `_coefficient_jvp`), which is all
    the outer step's second derivative needs: there a = omega and the mixed term is d(dz)/domega. The softmaxes are
    held constant, so a second derivative through the logits is not available here (`dwml_coefficients` has it).
    """

    @staticmethod
    def forward(a, labels, alpha, temperature, p1, p):
        num_peers, n = p1.shape[0], p1.shape[1]
        dz = (p1 * ((1.0 - alpha) * a / n).view(-1, 1, 1)).add_(p * (alpha * temperature * a.sum() / n))
        dz.sub_(_mixture(a, p), alpha=alpha * temperature / n)
        index = labels.view(1, -1, 1).expand(num_peers, -1, 1)
        dz.scatter_add_(-1, index, (-(1.0 - alpha) * a / n).view(-1, 1, 1).expand(-1, n, 1))
        return tuple(dz.unbind(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, labels, alpha, temperature, p1, p = inputs
        ctx.save_for_backward(labels, p1, p)
        ctx.alpha, ctx.temperature = alpha, temperature

    @staticmethod
    def backward(ctx, *cs):
        labels, p1, p = ctx.saved_tensors
        cs = [torch.zeros_like(p1[0]) if c is None else c for c in cs]
        return _coefficient_jvp(labels, ctx.alpha, ctx.temperature, p1, p, cs), None, None, None, None, None


class _DWMLCoefficients(torch.autograd.Function):
    """h (M,) of `dwml_coefficients` with constant KL targets, formed in row chunks with closed-form derivatives:
    a first one whose own derivative in the cotangent is exact (`_DWMLCoefficientsGrad`: the outer step's
    double_backward mode) and a forward-mode one (the jvp mode). Same formulas as `_FusedPeerLoss`:

        CE_k = lse1_k - z_k[y],   sum_v p_k log p_i = <z_i, p_k> / T - lse_i   (per row; p at temperature T)
    """

    @staticmethod
    def forward(labels, alpha: float, temperature: float, *zs):
        num_peers, n, t = len(zs), zs[0].shape[0], temperature
        p1 = zs[0].new_empty((num_peers, *zs[0].shape))
        p = p1 if t == 1.0 else torch.empty_like(p1)
        ce = zs[0].new_zeros(num_peers)
        z_p = zs[0].new_zeros((num_peers, num_peers))  # z_p[k, i] = sum over rows of <z_i, p_k>
        lse = zs[0].new_zeros(num_peers)  # sum over rows of lse(z_i / T)
        for rows in _chunks(n, zs[0], num_peers):
            for i, z in enumerate(zs):
                lse1 = _softmax_lse(z[rows], 1.0, out=p1[i, rows]).sum()
                ce[i] += lse1 - z[rows].gather(-1, labels[rows].view(-1, 1)).sum()
                lse[i] += lse1 if p is p1 else _softmax_lse(z[rows], t, out=p[i, rows]).sum()
            for i, z in enumerate(zs):
                zi = z[rows].flatten()
                for k in range(num_peers):
                    z_p[k, i] += torch.vdot(zi, p[k, rows].flatten())
        cross = z_p / t - lse  # cross[k, i] = sum over rows of sum_v p_k log p_i
        kl = (cross.diagonal()[:, None] - cross) / n  # kl[k, i] = KL(p_k || p_i), zero diagonal
        return (1.0 - alpha) * ce / n + alpha * t**2 * kl.sum(1), p1, p

    @staticmethod
    def setup_context(ctx, inputs, output):
        labels, alpha, temperature = inputs[:3]
        _, p1, p = output
        ctx.mark_non_differentiable(p1, p)
        ctx.save_for_backward(labels, p1, p)
        ctx.save_for_forward(labels, p1, p)
        ctx.alpha, ctx.temperature = alpha, temperature

    @staticmethod
    def backward(ctx, grad_h, _p1, _p):
        labels, p1, p = ctx.saved_tensors
        return None, None, None, *_DWMLCoefficientsGrad.apply(grad_h, labels, ctx.alpha, ctx.temperature, p1, p)

    @staticmethod
    def jvp(ctx, _labels, _alpha, _temperature, *tangents):
        labels, p1, p = ctx.saved_tensors
        return _coefficient_jvp(labels, ctx.alpha, ctx.temperature, p1, p, tangents), None, None


def dwml_coefficients_outer(
    logits_list: Sequence[torch.Tensor],
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """h (M,) of `dwml_coefficients` with constant KL targets, for the outer step (`dwml.distill.hypergrad`): the same value
    and the derivatives it takes (the gradient, the gradient's derivative in omega, a JVP) in closed form, in
    cache-sized chunks instead of autograd over O(M^2) (M, N, V) temporaries. A second derivative through the
    logits is not available (tested: `tests/test_losses.py`).
    """
    _check_alpha_temperature(alpha, temperature)
    require(len(logits_list) >= 1, "dwml: expected at least one peer")
    return _DWMLCoefficients.apply(labels, float(alpha), float(temperature), *[_upcast(x) for x in logits_list])[0]


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


_ROW_CHUNK = 32  # masked positions per chunk on the CPU: keeps the (M, chunk, V) temporaries cache-sized
_GPU_CHUNK_ELEMENTS = 2**26  # (M x rows x V) fp32 elements per chunk on a GPU: 256 MB per temporary


def _softmax_lse(z: torch.Tensor, temperature: float, *, out: torch.Tensor) -> torch.Tensor:
    """softmax(z / T) into `out`, and the rows' log-sum-exp of z / T.

    On the CPU one softmax kernel costs less than log_softmax + exp (measured: 0.50 vs 1.25 ms for 3 x 32 x 8192
    floats), and the log-sum-exp comes from it for free: softmax's largest entry is exp(max - lse), so
    lse = max(z / T) - log(max p), with max p in [1/V, 1] (no underflow, exact to an ulp).
    """
    zt = z if temperature == 1.0 else z / temperature
    torch.softmax(zt, dim=-1, out=out)
    return zt.amax(-1) - out.amax(-1).log()


class _FusedPeerLoss(torch.autograd.Function):
    """Eq. (2) with constant KL targets, and its gradient in closed form, in cache-sized row chunks; with alpha = 0 it
    is the sum of the peers' cross-entropies (`mlm_loss` uses it on the CPU).

    With the targets constant, peer i's KL terms collapse to a cross-entropy against the mixture of the others,
    q_i = P - omega_i p_i with P = sum_j omega_j p_j, and sum_v p_i log p_i cancels against the matching teacher
    entropy:

        sum_{j != i} omega_j KL(p_j || p_i) = sum_j omega_j sum_v p_j log p_j - sum_v P log p_i
        d/dz_i [eq. (2)] = (1 - alpha) omega_i (softmax(z_i) - onehot(y)) + alpha T (W p_i - P),   W = sum_j omega_j

    (averaged over the N positions; p at temperature T). No log-probabilities are formed: with log p_i = z_i / T -
    lse_i and sum_v p = 1 per row, both sums are dot products with the logits, sum_v p_j log p_j = <z_j, p_j> / T -
    lse_j and sum_v P log p_i = <z_i, P> / T - W lse_i. The vocabulary-sized work is memory-bound: autograd over whole
    (M, N, V) tensors spends its time allocating and streaming temporaries, so the value and the gradient are formed
    together over chunks of rows, the gradient in the softmax's own buffer.
    """

    @staticmethod
    def forward(ctx, labels, w, alpha: float, temperature: float, *zs):
        # zs: the M peers' (N, V) logits, kept separate: stacking them would copy M x N x V floats each step.
        num_peers, n, t = len(zs), zs[0].shape[0], temperature
        ce, lse_t, z_p, z_mix = zs[0].new_zeros((4, num_peers)).unbind(0)  # sums over the rows
        # grads[i] is peer i's (N, V) gradient of the mean over the N rows (the 1/N folded into the coefficients);
        # formed here, chunk by chunk, while the softmaxes are in cache: backward only scales it. One buffer per
        # peer, not one (M, N, V): on the CPU a block that large is a fresh mmap every step, whose page faults cost
        # as much as the loss itself (glibc reuses freed blocks only up to 32 MB).
        grads = [torch.empty_like(z) for z in zs]
        ce_w = (1.0 - alpha) * w / n
        chunks = _chunks(n, zs[0], num_peers)
        p_t = zs[0].new_empty((num_peers, chunks[0].stop - chunks[0].start, zs[0].shape[1])) \
            if alpha > 0 and t != 1.0 else None
        for rows in chunks:
            yc = labels[rows].view(-1, 1)
            g = [grad[rows] for grad in grads]
            for i, z in enumerate(zs):
                lse1 = _softmax_lse(z[rows], 1.0, out=g[i]).sum()  # g[i] <- softmax(z_i)
                ce[i] += lse1 - z[rows].gather(-1, yc).sum()
                if alpha > 0:
                    lse_t[i] += lse1 if p_t is None else _softmax_lse(z[rows], t, out=p_t[i, : yc.numel()]).sum()
            if alpha > 0:
                p = g if p_t is None else p_t[:, : yc.numel()]
                mix = _mixture(w, p)  # P
                for i, z in enumerate(zs):
                    z_p[i] += torch.vdot(z[rows].flatten(), p[i].flatten())
                    z_mix[i] += torch.vdot(z[rows].flatten(), mix.flatten())
                # ce_w_i p1_i + alpha T / N (W p_i - P); at T = 1 p1_i = p_i is g itself: one in-place pass
                kl_w = alpha * t * w.sum() / n
                for i in range(num_peers):
                    if p is g:
                        g[i].mul_(ce_w[i] + kl_w)
                    else:
                        g[i].mul_(ce_w[i]).add_(p[i].mul_(kl_w))
                    g[i].add_(mix, alpha=-alpha * t / n)
            else:
                for i in range(num_peers):
                    g[i].mul_(ce_w[i])
            for i in range(num_peers):
                g[i].scatter_add_(-1, yc, -ce_w[i].expand(yc.numel(), 1))
        neg_entropy, cross = z_p / t - lse_t, z_mix / t - w.sum() * lse_t
        ce, kl = ce / n, ((w * neg_entropy).sum() - cross) / n  # kl (M,): sum_{j != i} omega_j KL(p_j || p_i)
        total = (1.0 - alpha) * (w * ce).sum() + alpha * t**2 * kl.sum()
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    @once_differentiable  # the gradient is a constant formed in forward: a second derivative would silently be 0
    def backward(ctx, grad_total, grad_ce, grad_kl):
        return (None, None, None, None, *_scaled(ctx.saved_tensors, grad_total))


def _scaled(grads: Sequence[torch.Tensor], grad_total: torch.Tensor) -> list[torch.Tensor]:
    """The saved closed-form gradients times the incoming scalar gradient. The trainer back-propagates its losses
    with weight 1 (one micro-batch, one rank): skip a pass over M x N x V floats then. Checking costs nothing on the
    CPU; on a GPU it would wait for the GPU, so there it multiplies."""
    if grad_total.device.type == "cpu" and float(grad_total) == 1.0:
        return list(grads)
    return [g * grad_total for g in grads]


def _row_chunk(z: torch.Tensor, num_peers: int) -> int:
    """Rows per chunk: cache-sized (M, rows, V) temporaries on the CPU; on a GPU a few large chunks instead (there
    every chunk costs ~15 kernel launches, and small chunks would leave the GPU waiting for the host)."""
    if z.device.type == "cpu":
        return _ROW_CHUNK
    return max(_ROW_CHUNK, _GPU_CHUNK_ELEMENTS // (num_peers * z.shape[1]))


def dwml_inner_loss(
    logits_list: Sequence[torch.Tensor],
    labels: torch.Tensor,
    omega: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (2) with detached KL targets, for the inner loop's hot path: the same value and gradients as
    `dwml_loss(..., detach_targets=True)` (tested), with the gradient in closed form (`_FusedPeerLoss`) and O(M)
    instead of O(M^2) passes over the (N, V) logits. parts: "ce" (M,) and "kl" (M,) = sum_{j != i} omega_j
    KL(p_j || p_i) per student i.
    """
    _check_alpha_temperature(alpha, temperature)
    zs = [_upcast(x) for x in logits_list]
    require(omega.shape == (len(zs),), f"omega: expected shape ({len(zs)},), got {tuple(omega.shape)}")
    total, ce, kl = _FusedPeerLoss.apply(labels, omega.detach().to(zs[0].dtype), float(alpha), float(temperature),
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


class _FusedEnsembleLoss(torch.autograd.Function):
    """kind="ensemble" of `ensemble_loss` with its gradients in closed form, in row chunks (the outer step's L2).

    Only the label's probability enters the value: with r_i = omega_i p_i(y) / P(y), P(y) = sum_j omega_j p_j(y),

        L2 = -mean log P(y),   dL2/dz_i = r_i (p_i - onehot(y)) / N,   dL2/domega_k = -sum_rows p_k(y) / P(y) / N

    so one softmax per peer and row (into the gradient's buffer) replaces autograd through the (M, N, V) log-softmax,
    logsumexp and their backward passes. First derivatives only (the hypergradient needs no more of L2).
    """

    @staticmethod
    def forward(ctx, labels, omega, *zs):
        num_peers, n = len(zs), zs[0].shape[0]
        grads = [torch.empty_like(z) for z in zs]  # one buffer per peer: see _FusedPeerLoss
        grad_omega = zs[0].new_zeros(num_peers)
        total = zs[0].new_zeros(())
        log_w = omega.log().view(-1, 1)
        for rows in _chunks(n, zs[0], num_peers):
            yc = labels[rows].view(-1, 1)
            log_py = torch.stack([z[rows].gather(-1, yc).squeeze(-1) - _softmax_lse(z[rows], 1.0, out=g[rows])
                                  for z, g in zip(zs, grads)])  # (M, r): log p_i(y); grads[i] <- softmax(z_i)
            log_mix = torch.logsumexp(log_w + log_py, dim=0)  # (r,): log P(y)
            total -= log_mix.sum()
            ratio = (log_py - log_mix).exp()  # p_k(y) / P(y)
            grad_omega -= ratio.sum(1)
            r = (omega.view(-1, 1) * ratio / n).unsqueeze(-1)  # (M, r, 1): r_i / N
            for g, r_i in zip(grads, r):
                g[rows].mul_(r_i).scatter_add_(-1, yc, -r_i)
        ctx.save_for_backward(grad_omega / n, *grads)
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        return None, *_scaled(ctx.saved_tensors, grad_total)


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
            return _FusedEnsembleLoss.apply(labels, omega.to(zs[0].dtype), *zs)
        return F.nll_loss(ensemble_logprobs(zs, omega), labels)
    z = torch.stack([_upcast(x) for x in logits_list])
    w = omega.to(z.dtype)
    if kind == "logit_ensemble":
        return mlm_loss((w.view(-1, 1, 1) * z).sum(0), labels)
    return (w * torch.stack([mlm_loss(x, labels) for x in z])).sum()
