"""The unrolled inner step of the hypergradient (paper eq. 3): theta' = theta - lr * u(g, state).

`InnerStep` replays the optimizer's next step (AdamW or SGD, with gradient clipping) on flat per-(peer, hyper-parameter)
buckets and gives theta' and its closed-form vector-Jacobian product in one pass; `dwml.distill.hypergrad` chains it
with the outer loss. The optimizers' own states are read, never written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import require

UNROLLS = ("adamw", "sgd", "direct")


VJP = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coefficient max_norm / (total_norm + 1e-6)


@dataclass
class _AdamWSlot:
    """What one parameter tensor's next AdamW step depends on, besides its gradient."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    step: int  # the step count after the next step (t + 1)
    exp_avg: torch.Tensor | None  # None: no state yet (zeros)
    exp_avg_sq: torch.Tensor | None


def _adamw_slots(optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.Tensor],
                 lr: float | None) -> list[_AdamWSlot]:
    """Each parameter's AdamW hyper-parameters and state, looked up in the optimizers (which are not modified)."""
    where: dict[int, tuple[torch.optim.Optimizer, dict]] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            decoupled = group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
            require(decoupled and not group.get("amsgrad") and not group.get("maximize"),
                    f"unroll adamw: expected torch.optim.AdamW without amsgrad/maximize, got {type(opt).__name__}")
            for q in group["params"]:
                where[id(q)] = (opt, group)
    found = []
    for q in params:
        require(id(q) in where, "unroll adamw: a trainable parameter of a peer is in none of the optimizers")
        opt, group = where[id(q)]
        found.append((group, opt.state.get(q, {})))
    steps = _step_counts([state.get("step", 0) for _, state in found])
    slots = []
    for (group, state), step in zip(found, steps):
        b1, b2 = group["betas"]
        slots.append(_AdamWSlot(
            lr=float(group["lr"] if lr is None else lr), weight_decay=float(group["weight_decay"]),
            beta1=float(b1), beta2=float(b2), eps=float(group["eps"]),
            step=step + 1, exp_avg=state.get("exp_avg"), exp_avg_sq=state.get("exp_avg_sq"),
        ))
    return slots


def _step_counts(steps: Sequence[torch.Tensor | float]) -> list[int]:
    """AdamW's step counts as ints. The fused AdamW keeps them on the parameters' device: they are read with one
    copy per device, not one host sync per parameter tensor."""
    values: list = list(steps)
    on: dict[torch.device, list[int]] = {}
    for i, step in enumerate(steps):
        if isinstance(step, torch.Tensor):
            on.setdefault(step.device, []).append(i)
    for idx in on.values():
        for i, value in zip(idx, torch.stack([steps[i].reshape(()).double() for i in idx]).tolist()):
            values[i] = value
    return [int(float(v)) for v in values]


@dataclass
class _Bucket:
    """Parameter tensors of one peer that share every AdamW hyper-parameter: the step runs on them as one flat
    vector (a dozen elementwise ops per bucket instead of per tensor: on a GPU each op is a kernel launch, and its
    double backward as many again)."""

    peer: int
    index: list[int]  # positions in the flat parameter list
    slot: "_AdamWSlot | None"  # None: the sgd unroll
    param: torch.Tensor  # the tensors' values, concatenated (constants: theta' depends on omega through g only)
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)


class InnerStep:
    """The unrolled inner update theta' = U(theta, g) (see the module docstring) and its vector-Jacobian product.

    `apply` is written in differentiable torch ops (the "double_backward" mode differentiates it by autograd);
    `apply_and_vjp` gives theta' with the closed form (dU/dg)^T v the other modes use, from one computation of the
    step. Gradients are flat lists over all peers' parameters; `sizes` gives each peer's number of tensors (the
    gradient clip is per peer, as in the trainer). Internally the tensors are concatenated into `_Bucket`s.
    """

    def __init__(self, unroll: str, params: Sequence[torch.Tensor], sizes: Sequence[int], *, gamma: float | None,
                 optimizers: Sequence[torch.optim.Optimizer] | None, grad_clip: float):
        require(unroll in UNROLLS, f"unroll: expected one of {list(UNROLLS)}, got {unroll!r}")
        require(float(grad_clip) >= 0.0, f"grad_clip: expected a non-negative number, got {grad_clip!r}")
        self.unroll, self.params, self.sizes, self.grad_clip = unroll, list(params), list(sizes), float(grad_clip)
        self.gamma = None if gamma is None else float(gamma)
        if unroll == "sgd":
            require(self.gamma is not None and self.gamma >= 0.0,
                    f"gamma: the sgd unroll needs a non-negative step size, got {gamma!r}")
            self.slots = None
        else:
            require(optimizers is not None, f"unroll {unroll}: needs the peers' AdamW optimizers")
            require(self.gamma is None or self.gamma >= 0.0, f"gamma: expected a non-negative number, got {gamma!r}")
            self.slots = _adamw_slots(optimizers, self.params, self.gamma)
        self.buckets = self._buckets()

    def _buckets(self) -> list[_Bucket]:
        peer_of = [k for k, size in enumerate(self.sizes) for _ in range(size)]
        groups: dict[tuple, list[int]] = {}
        for i, q in enumerate(self.params):
            s = None if self.slots is None else self.slots[i]
            key = (peer_of[i], q.dtype, q.device) if s is None else (
                peer_of[i], q.dtype, q.device, s.lr, s.weight_decay, s.beta1, s.beta2, s.eps, s.step,
                s.exp_avg is None, s.exp_avg_sq is None)
            groups.setdefault(key, []).append(i)
        buckets = []
        with torch.no_grad():
            for key, index in groups.items():
                slot = None if self.slots is None else self.slots[index[0]]
                states = [] if slot is None else [
                    None if getattr(slot, name) is None else _cat([getattr(self.slots[i], name) for i in index])
                    for name in ("exp_avg", "exp_avg_sq")]
                buckets.append(_Bucket(key[0], index, slot, _cat([self.params[i].detach() for i in index]),
                                       *(states or [None, None])))
        return buckets

    def _flat(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [_cat([tensors[i] for i in b.index]) for b in self.buckets]

    def _unflat(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out: list = [None] * len(self.params)
        for b, flat in zip(self.buckets, flats):
            pieces = flat.split([self.params[i].numel() for i in b.index])
            for i, piece in zip(b.index, pieces):
                out[i] = piece.view(self.params[i].shape)
        return out

    # -- gradient clipping (per peer) --

    def _clip_coefs(self, flat_grads: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per peer (kappa, norm): the clipped gradient is kappa * g (kappa = 1 when the clip is inactive)."""
        out = []
        for k in range(len(self.sizes)):
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for b, g in zip(self.buckets, flat_grads) if b.peer == k]))
            kappa = torch.clamp(self.grad_clip / (norm + CLIP_EPS), max=1.0) if self.grad_clip > 0 \
                else torch.ones_like(norm)
            out.append((kappa, norm))
        return out

    # -- the step --

    def _step(self, grads: Sequence[torch.Tensor], slopes: bool):
        """(theta' per bucket, the elementwise dtheta'/d(clipped g) per bucket if `slopes` (else None),
        `_clip_coefs`, the flat gradients)."""
        flat = self._flat(grads)
        coefs = self._clip_coefs(flat)
        out, slope = [], []
        for b, g in zip(self.buckets, flat):
            g = g * coefs[b.peer][0]
            s = b.slot
            if s is None:
                out.append(b.param - self.gamma * g)
                slope.append(-self.gamma)
                continue
            m = g * (1 - s.beta1) if b.exp_avg is None else b.exp_avg * s.beta1 + g * (1 - s.beta1)
            v = g * g * (1 - s.beta2) if b.exp_avg_sq is None else b.exp_avg_sq * s.beta2 + g * g * (1 - s.beta2)
            positive = v > 0  # sqrt has no derivative at 0: take it only where v' > 0 (elsewhere g = 0 and r = 0)
            r = torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))
            bc1, bc2 = 1 - s.beta1**s.step, 1 - s.beta2**s.step
            denom = r / math.sqrt(bc2) + s.eps
            out.append(b.param * (1 - s.lr * s.weight_decay) - (s.lr / bc1) * m / denom)
            if slopes:
                # d r / d g = (1 - b2) g / r, taken as 0 where r = 0 (there g = m = 0, so the term vanishes anyway)
                dr = torch.where(positive, (1 - s.beta2) * g / torch.where(positive, r, torch.ones_like(r)),
                                 torch.zeros_like(r))
                slope.append(-(s.lr / bc1) * ((1 - s.beta1) / denom - m * dr / (math.sqrt(bc2) * denom * denom)))
        return out, slope if slopes else None, coefs, flat

    def apply(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """theta' (differentiable w.r.t. grads)."""
        return self._unflat(self._step(grads, slopes=False)[0])

    def apply_and_vjp(self, grads: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], VJP]:
        """(theta', v -> u = (dtheta'/dg)^T v in closed form), grads detached: one pass over the parameters computes
        the clip, the moments and theta' for both (the vjp keeps only the elementwise slopes)."""
        theta_prime, slopes, coefs, flat_g = self._step(grads, slopes=True)

        def vjp(v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            w = [slope * x for slope, x in zip(slopes, self._flat(v))]
            if self.grad_clip > 0:
                # Active clip: J = kappa (I - g g^T / (|g| (|g| + eps))) is symmetric, so J^T w = kappa (w - c g),
                # c = <g, w> / (...). Inactive: kappa = 1 and c = 0, so J^T w = w exactly - chosen on the device,
                # with no host sync per peer.
                cs = []
                for k, (kappa, norm) in enumerate(coefs):
                    dot = sum((g * x).sum() for b, g, x in zip(self.buckets, flat_g, w) if b.peer == k)
                    cs.append(torch.where(kappa < 1.0, dot / (norm * (norm + CLIP_EPS)), torch.zeros_like(norm)))
                w = [coefs[b.peer][0] * (x - cs[b.peer] * g) for b, g, x in zip(self.buckets, flat_g, w)]
            return self._unflat(w)

        return self._unflat(theta_prime), vjp
