"""The closed-form autograd kernels behind `dwml.distill.losses`: forward and backward of the DWML losses in row chunks.

Autograd through log_softmax and the O(M^2) peer pairs of eq. (2) materialises several (M, N, V) temporaries per
step; these `torch.autograd.Function`s write each peer's softmax into its gradient buffer and turn it into the
gradient in place, chunk by chunk (`ROW_CHUNK` rows on the CPU, ~256 MB per temporary on a GPU):
- `FusedPeerLoss`: the inner loss L1 with detached targets (and `mlm_loss` at alpha = 0);
- `DWMLCoefficients` / `DWMLCoefficientsGrad`: the outer step's coefficients h_k = dL1/domega_k, with the
  gradient's exact derivative in the cotangent (double_backward) and a JVP (jvp mode);
- `FusedEnsembleLoss`: L2, the omega-weighted ensemble's cross-entropy (finite d/domega at a zero weight).
Each is tested against autograd through the plain formulas of `losses` in float64 (tests/distill/test_losses.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable


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
    derivative of h's closed-form gradient with respect to its cotangent (see `DWMLCoefficients`).

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


class DWMLCoefficientsGrad(torch.autograd.Function):
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


class DWMLCoefficients(torch.autograd.Function):
    """h (M,) of `dwml_coefficients` with constant KL targets, formed in row chunks with closed-form derivatives:
    a first one whose own derivative in the cotangent is exact (`DWMLCoefficientsGrad`: the outer step's
    double_backward mode) and a forward-mode one (the jvp mode). Same formulas as `FusedPeerLoss`:

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
        return None, None, None, *DWMLCoefficientsGrad.apply(grad_h, labels, ctx.alpha, ctx.temperature, p1, p)

    @staticmethod
    def jvp(ctx, _labels, _alpha, _temperature, *tangents):
        labels, p1, p = ctx.saved_tensors
        return _coefficient_jvp(labels, ctx.alpha, ctx.temperature, p1, p, tangents), None, None


ROW_CHUNK = 32  # masked positions per chunk on the CPU: keeps the (M, chunk, V) temporaries cache-sized


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


class FusedPeerLoss(torch.autograd.Function):
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
        return ROW_CHUNK
    return max(ROW_CHUNK, _GPU_CHUNK_ELEMENTS // (num_peers * z.shape[1]))


class FusedEnsembleLoss(torch.autograd.Function):
    """kind="ensemble" of `ensemble_loss` with its gradients in closed form, in row chunks (the outer step's L2).

    Only the label's probability enters the value: with r_i = omega_i p_i(y) / P(y), P(y) = sum_j omega_j p_j(y),

        L2 = -mean log P(y),   dL2/dz_i = r_i (p_i - onehot(y)) / N,   dL2/domega_k = -sum_rows p_k(y) / P(y) / N

    so one softmax per peer and row (into the gradient's buffer) replaces autograd through the (M, N, V) log-softmax,
    logsumexp and their backward passes. First derivatives only (the hypergradient needs no more of L2).
    """

    @staticmethod
    def forward(ctx, labels, omega, *zs):
        num_peers, n = len(zs), zs[0].shape[0]
        grads = [torch.empty_like(z) for z in zs]  # one buffer per peer: see FusedPeerLoss
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
