"""The outer (bi-level) step of deep weighted mutual learning: the peer weights omega.

Paper (Iyer 2024, arXiv 2411.16487, ../shared/paper/when-babies-teach-babies.md; WML, Zhang et al. 2022): the peers'
parameters theta minimise L1(theta, omega) (eq. 2, `dwml.distill.losses.dwml_loss`) on training batches, and omega minimises
the ensemble loss L2 (`ensemble_loss`) of the trained peers on held-out data. The best response theta*(omega) is
approximated by one unrolled inner step theta'(omega) = U(theta, g(omega)) with g = grad_theta L1(theta, omega)
(eq. 3 writes U as the SGD step theta - gamma g):

    g_omega = dL2(theta', omega)/domega                                          (direct term)
              + < grad_theta' L2(theta', omega), dU/dg . d^2 L1/(dtheta domega) >    (mixed term)

and omega takes a mirror-descent (exponentiated-gradient) step on the simplex (eq. 4):

    omega <- omega * exp(-eta * g_omega) / Z

The paper's public code detaches the quantity it differentiates in the mixed term, so that term is identically
zero; here it is exact. L1 is linear in omega (L1 = sum_k omega_k h_k + c, `dwml_coefficients`; c = kd_dwml's
teacher term, which does not depend on omega), hence d^2 L1/(dtheta domega_k) = grad_theta h_k and
mixed_k = < u, grad_theta h_k > with u = (dU/dg)^T v, v = grad_theta' L2.
With `detach_targets` the inner "gradient" is DML's semi-gradient (the teacher side of each KL held constant);
theta' uses that same gradient, so the formula differentiates exactly the update the inner loop takes.

The unrolled step U (`unroll`, config `distill.unroll`):
  "adamw" (the config default): the step the inner optimizer (torch.optim.AdamW) actually takes next, from its
      current state: per parameter, with the peer's current lr, decoupled weight decay wd of the parameter's group
      (none on 1-D parameters, see `dwml.training.setup.make_optimizer`), step count t+1 and bias corrections bc1, bc2:
          m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2
          theta' = theta (1 - lr wd) - (lr / bc1) m' / (sqrt(v') / sqrt(bc2) + eps)
      Both moments are differentiated, the second one too: m' is linear in g, but v' is not, and holding v' constant
      would leave out a term of the same order as the one kept: with r = sqrt(v'), D = r / sqrt(bc2) + eps and
      a = m', the exact elementwise derivative is
          dtheta'/dg = -(lr / bc1) [ (1 - b1) / D - a (1 - b2) g / (sqrt(bc2) r D^2) ]
      (the second part is 0 where v' = 0: then v = m = g = 0 for that coordinate). The second part is what makes
      Adam's step invariant to the gradient's scale: at the first step (m = v = 0) the step is lr * sign(g) up to
      eps and the two parts cancel exactly, so holding v' constant would report a derivative where the real step
      has none; it matters whenever g^2 is not small against v. `tests/distill/test_hypergrad.py` compares every mode
      against central finite differences of the real `optimizer.step()` in float64 (relative error < 1e-10, centred
      < 3e-9; with v' held constant the centred hypergradient is off by 8%).
  "sgd": theta' = theta - gamma g (the paper's eq. 3), gamma = `gamma` (the trainer passes the current lr).
  "direct": theta' as for "adamw", the mixed term left out (an ablation: omega follows dL2/domega alone, in effect
      what the public code does). Needs one first-order gradient of L1 instead of the mixed term's M (counted
      FLOPs of the outer step: 1.33 instead of 3.99 inner steps for 4 peers, `dwml experiment` Table 9).
Gradient clipping: the real step clips each peer's gradient to norm `grad_clip` (torch's clip_grad_norm_,
  g * min(1, c / (|g| + 1e-6))); U clips too and differentiates the clip exactly (its Jacobian
  kappa (I - g g^T / (|g| (|g| + 1e-6))) when it is active, I otherwise), so a clipped step is not mistaken for an
  unclipped one (an active clip removes the component of dg/domega along g). `grad_clip` = 0: no clip.

Three exact ways to get the mixed term (`mode`), tested against each other and against finite differences; every
mode supports every unroll. Measured cost of one outer step with the SGD unroll (CPU, `tiny` preset, held-out
batch = train batch) in units of one inner DWML step:
  "per_peer": the M gradients grad_theta h_k by first-order backprop (their
      omega-combination is the unrolled step's gradient), then M inner products with u. ~2.4 / 2.9 / 3.4-3.9 inner
      steps for M = 2 / 3 / 4, and nothing second-order: works when the attention kernel has no double backward
      (e.g. attn_implementation="flash_attention_2").
  "double_backward" (the config default): autograd through the create_graph gradient of L1 and through U itself
      (reverse-over-reverse; it checks the closed-form dU/dg the other two modes use). ~2.8 inner steps for
      M = 2, 3, 4; with the AdamW unroll and the trainer's half-size outer batches the fastest of the three on the
      CPU (benchmarks/bench_outer_modes.py: 1.27 vs jvp 1.57 vs per_peer 1.78 inner steps, M = 3; GPU unmeasured).
  "jvp": forward mode: <u, grad h_k> = d/de h_k(theta + e u), all k from one JVP; ~3.0-3.3 inner steps.
The AdamW unroll adds a few elementwise passes over the parameters (on flat per-peer buckets, `InnerStep`). The
coefficients h come from `losses.dwml_coefficients_outer` when the KL targets are detached: closed forms for the
value, the gradient, the gradient's derivative in omega and the JVP, tested against autograd in float64.
"double_backward" and "jvp" run under the math SDPA backend (the fused flash/efficient SDPA kernels have neither
double-backward nor forward-mode formulas). The outer step runs in eval mode (no dropout: every forward it makes must
see the same function for the derivative to be exact); the models' modes are restored and their parameters and the
optimizers' states are never modified (the unrolled parameters go through `torch.func.functional_call`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import DwmlError, require
from ..models.model import masked_logits
from .losses import ENSEMBLE_KINDS, dwml_coefficients, dwml_coefficients_outer, ensemble_loss, teacher_term
from .unrolled import InnerStep

MODES = ("per_peer", "double_backward", "jvp")
ETA_SCHEDULES = ("constant", "inv_sqrt", "cosine")

Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MaskedBatchLike(Protocol):
    """What the outer step reads from a batch (duck-typed; `dwml.data.masking.MaskedBatch` has these fields)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor


class _Call(nn.Module):
    """Wraps `forward(model, ...)` as a module so `functional_call` can run it with substituted parameters."""

    def __init__(self, model: nn.Module, forward: Forward):
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, *args)


@contextlib.contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    flags = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, model_flags in zip(models, flags):
            for m, flag in zip(model.modules(), model_flags):
                m.training = flag


def _inputs(batch: MaskedBatchLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.attention_mask, batch.positions


def _split(flat: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[list[torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append(list(flat[start : start + size]))
        start += size
    return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def mixed_ratio(direct: torch.Tensor, mixed: torch.Tensor) -> float:
    """|mixed - mean(mixed)| / |direct - mean(direct)|: the size of the mixed term in what mirror descent sees
    (eq. 4 is invariant to adding a constant to g, so only the centred parts move omega). NaN if the centred
    direct term is 0."""
    d, m = direct - direct.mean(), mixed - mixed.mean()
    den = float(torch.linalg.vector_norm(d))
    return float(torch.linalg.vector_norm(m)) / den if den > 0 else float("nan")


def hypergradient(
    models: Sequence[nn.Module],
    train_batch: MaskedBatchLike,
    heldout_batch: MaskedBatchLike,
    omega: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    gamma: float | None = None,
    unroll: str = "sgd",
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    grad_clip: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    teacher_weight: float = 0.0,
    detach_targets: bool = True,
    l2_kind: str = "ensemble",
    mode: str = "per_peer",
    forward: Forward = masked_logits,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """g_omega of eq. (3) for the peers `models` at the current omega (M,); returns (g, info).

    unroll "sgd" needs `gamma`; "adamw" and "direct" need `optimizers` (one AdamW per model, holding its trainable
    parameters) and use each group's lr unless `gamma` is given. `teacher_logits` (N, V) on the train batch with
    `teacher_weight` beta add kd_dwml's teacher term beta T^2 sum_i KL(teacher || p_i) to the unrolled L1.
    info (all detached): "direct" and "mixed" (M,) with g = direct + mixed, "l1" = L1(theta, omega) on the train
    batch, "l2" = L2(theta', omega) on the held-out batch, "h" (M,) = dL1/domega. Nothing is read back to the host
    (no sync): g and info stay on the device until the caller reads them (`mixed_ratio(direct, mixed)` there).
    """
    num_peers = len(models)
    require(num_peers >= 2, f"dwml: expected at least 2 peers, got {num_peers}")
    require(tuple(omega.shape) == (num_peers,), f"omega: expected shape ({num_peers},), got {tuple(omega.shape)}")
    require(mode in MODES, f"hypergrad.mode: expected one of {list(MODES)}, got {mode!r}")
    require(l2_kind in ENSEMBLE_KINDS, f"l2_kind: expected one of {list(ENSEMBLE_KINDS)}, got {l2_kind!r}")
    require(float(teacher_weight) >= 0.0, f"teacher_weight: expected a non-negative number, got {teacher_weight!r}")
    require(optimizers is None or len(optimizers) == num_peers,
            f"optimizers: expected one per peer ({num_peers}), got {0 if optimizers is None else len(optimizers)}")

    named = [[(n, p) for n, p in m.named_parameters() if p.requires_grad] for m in models]
    names = [[n for n, _ in peer] for peer in named]
    sizes = [len(peer) for peer in named]
    params = [p for peer in named for _, p in peer]
    step = InnerStep(unroll, params, sizes, gamma=gamma, optimizers=optimizers, grad_clip=grad_clip)
    calls = [_Call(m, forward) for m in models]
    train_in, held_in = _inputs(train_batch), _inputs(heldout_batch)
    omega = omega.detach()
    use_teacher = teacher_logits is not None and float(teacher_weight) > 0.0

    def run(flat: Sequence[torch.Tensor], inputs: tuple) -> list[torch.Tensor]:
        """Every peer's logits with its parameters replaced by `flat` (the real models are untouched)."""
        return [
            functional_call(call, {f"model.{n}": t for n, t in zip(peer_names, peer_params)}, inputs)
            for call, peer_names, peer_params in zip(calls, names, _split(flat, sizes))
        ]

    def coefficients(logits_list: list[torch.Tensor]) -> torch.Tensor:
        if detach_targets:  # closed-form derivatives in cache-sized chunks; the same values (tests/distill/test_losses.py)
            return dwml_coefficients_outer(logits_list, train_batch.labels, alpha, temperature)
        return dwml_coefficients(logits_list, train_batch.labels, alpha, temperature, detach_targets)[0]

    def teacher_loss(logits_list: list[torch.Tensor]) -> torch.Tensor:
        """kd_dwml's teacher term (`losses.teacher_term`): part of the inner gradient, independent of omega."""
        return teacher_term(logits_list, teacher_logits, teacher_weight, temperature)[0]

    def outer_loss(theta_prime: Sequence[torch.Tensor], w2: torch.Tensor) -> torch.Tensor:
        return ensemble_loss(run(theta_prime, held_in), heldout_batch.labels, w2, kind=l2_kind)

    # The L2 partial w.r.t. omega uses its own leaf w2 so that it excludes the path through theta'.
    w2 = omega.clone().requires_grad_(True)
    second_order = mode != "per_peer" and unroll != "direct"
    kernel = sdpa_kernel([SDPBackend.MATH]) if second_order else contextlib.nullcontext()
    with _eval_mode(models), kernel, torch.enable_grad():
        if mode == "double_backward" and unroll != "direct":
            w1 = omega.clone().requires_grad_(True)
            logits = [forward(m, *train_in) for m in models]
            h = coefficients(logits)
            l1 = (w1.to(h.dtype) * h).sum() + (teacher_loss(logits) if use_teacher else 0.0)
            grads = torch.autograd.grad(l1, params, create_graph=True, materialize_grads=True)
            theta_prime = step.apply(grads)
            l2 = outer_loss(theta_prime, w2)
            direct, *v = torch.autograd.grad(l2, [w2, *theta_prime], retain_graph=True, materialize_grads=True)
            # d theta'/d omega contracted with v: exactly <v, dU/dg . d^2 L1/(dtheta domega)>.
            (mixed,) = torch.autograd.grad(theta_prime, w1, grad_outputs=v, materialize_grads=True)
        else:
            logits = [forward(m, *train_in) for m in models]
            h = coefficients(logits)
            w = omega.to(h.dtype)
            c = teacher_loss(logits) if use_teacher else None
            l1 = (w * h).sum() + (c if c is not None else 0.0)
            if mode == "per_peer" and unroll != "direct":
                # grad_theta h_k for every k; the inner step's gradient is their omega-combination (L1 is linear),
                # plus the teacher term's gradient.
                grad_h = [
                    torch.autograd.grad(h[k], params, retain_graph=k + 1 < num_peers or c is not None,
                                        materialize_grads=True)
                    for k in range(num_peers)
                ]
                grads = [sum(w[k] * grad_h[k][i] for k in range(num_peers)) for i in range(len(params))]
                if c is not None:
                    grads = [g + gc for g, gc in
                             zip(grads, torch.autograd.grad(c, params, materialize_grads=True))]
            else:
                grads = torch.autograd.grad(l1, params, materialize_grads=True)
            grads = [g.detach() for g in grads]
            with torch.no_grad():
                if unroll == "direct":
                    theta_prime = step.apply(grads)
                else:
                    theta_prime, step_vjp = step.apply_and_vjp(grads)
                theta_prime = [t.requires_grad_(True) for t in theta_prime]
            l2 = outer_loss(theta_prime, w2)
            if unroll == "direct":
                (direct,) = torch.autograd.grad(l2, [w2])
                mixed = torch.zeros_like(direct)
            else:
                direct, *v = torch.autograd.grad(l2, [w2, *theta_prime], materialize_grads=True)
                with torch.no_grad():
                    u = step_vjp([x.detach() for x in v])
                if mode == "per_peer":
                    mixed = torch.stack([_dot(u, grad_h[k]) for k in range(num_peers)])
                else:
                    primals = tuple(p.detach() for p in params)
                    _, mixed = jvp(lambda *flat: coefficients(run(flat, train_in)), primals, tuple(u))
    direct = direct.detach().to(omega.dtype)
    mixed = mixed.detach().to(omega.dtype)
    info = {"direct": direct, "mixed": mixed, "l1": l1.detach(), "l2": l2.detach(), "h": h.detach()}
    return direct + mixed, info


# --- eq. (4): mirror descent on the simplex -------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorDescentConfig:
    """Step size schedule and floor of the exponentiated-gradient update of omega (eq. 4).

    eta_t for the t-th outer step (t = 1, 2, ...): "constant" eta; "inv_sqrt" eta / sqrt(t) (the classic rate for
    online mirror descent); "cosine" from eta down to eta_min over total_steps, then eta_min.
    floor: every omega_i is kept >= floor (KL projection onto the capped simplex), so no peer's weight can collapse
    to exactly 0 and never come back (multiplicative updates cannot revive a zero). Needs floor * M <= 1.
    """

    eta: float = 0.1
    schedule: str = "constant"
    total_steps: int = 0
    eta_min: float = 0.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        require(self.eta > 0.0, f"mirror_descent.eta: expected a positive number, got {self.eta!r}")
        require(
            self.schedule in ETA_SCHEDULES,
            f"mirror_descent.schedule: expected one of {list(ETA_SCHEDULES)}, got {self.schedule!r}",
        )
        require(
            0.0 <= self.eta_min <= self.eta,
            f"mirror_descent.eta_min: expected a number in [0, eta={self.eta}], got {self.eta_min!r}",
        )
        require(
            self.schedule != "cosine" or self.total_steps >= 1,
            f"mirror_descent.total_steps: the cosine schedule needs a positive number, got {self.total_steps!r}",
        )
        require(0.0 <= self.floor < 1.0, f"mirror_descent.floor: expected a number in [0, 1), got {self.floor!r}")


def eta_at(cfg: MirrorDescentConfig, step: int) -> float:
    """Step size of the `step`-th outer step (1-based)."""
    if step < 1:
        raise ValueError(f"step is 1-based, got {step}")
    if cfg.schedule == "constant":
        return cfg.eta
    if cfg.schedule == "inv_sqrt":
        return cfg.eta / math.sqrt(step)
    progress = min(step - 1, cfg.total_steps) / cfg.total_steps
    return cfg.eta_min + 0.5 * (cfg.eta - cfg.eta_min) * (1.0 + math.cos(math.pi * progress))


def project_floor(omega: torch.Tensor, floor: float) -> torch.Tensor:
    """KL (Bregman) projection of a simplex point onto {w >= floor, sum w = 1}: w_i = max(floor, c * omega_i).

    The constant c < 1 is found by fixing at the floor every weight that would fall below it (at most M rounds).
    Weights well above the floor keep their ratios, unlike mixing with the uniform distribution.
    """
    num = omega.numel()
    require(floor * num <= 1.0, f"mirror_descent.floor: floor * peers must be <= 1, got {floor} * {num}")
    if floor <= 0.0:
        return omega
    fixed = torch.zeros(num, dtype=torch.bool, device=omega.device)
    for _ in range(num):
        free_mass = 1.0 - floor * int(fixed.sum())
        scaled = omega * free_mass / omega[~fixed].sum()
        out = torch.where(fixed, torch.full_like(omega, floor), scaled)
        newly_fixed = ~fixed & (out < floor)
        if not newly_fixed.any():
            return out
        fixed |= newly_fixed
    return torch.full_like(omega, 1.0 / num)  # only reached when floor * M == 1: the simplex has one such point


def mirror_descent_step(omega: torch.Tensor, g: torch.Tensor, eta: float, floor: float = 0.0) -> torch.Tensor:
    """Eq. (4): omega * exp(-eta g) / Z, as a softmax of log omega - eta g (no overflow for any g); then the floor.

    Invariant to adding a constant to g (it cancels in Z). Computed in float64, returned in omega's dtype.
    """
    logits = torch.log(omega.double()) - eta * g.detach().double()
    new = torch.softmax(logits, dim=0)
    return project_floor(new, floor).to(omega.dtype)


class OmegaState:
    """The peer weights across outer steps: omega (float64, on CPU), the number of outer steps taken, a history."""

    def __init__(self, omega: torch.Tensor | Sequence[float]):
        omega = torch.as_tensor(omega, dtype=torch.float64).detach().cpu().clone()
        require(omega.dim() == 1 and omega.numel() >= 1, f"omega: expected a 1-D vector, got {tuple(omega.shape)}")
        require(bool((omega >= 0).all()), f"omega: expected non-negative weights, got {omega.tolist()}")
        require(abs(float(omega.sum()) - 1.0) < 1e-6, f"omega: expected weights summing to 1, got {float(omega.sum())}")
        self.omega = omega
        self.step = 0
        self.history: list[dict[str, Any]] = []

    @classmethod
    def uniform(cls, num_peers: int) -> "OmegaState":
        require(num_peers >= 1, f"num_peers: expected a positive integer, got {num_peers!r}")
        return cls(torch.full((num_peers,), 1.0 / num_peers, dtype=torch.float64))

    def update(self, g: torch.Tensor, cfg: MirrorDescentConfig) -> torch.Tensor:
        """One outer step with hypergradient g; returns the new omega."""
        g = g.detach().double().cpu()
        require(g.shape == self.omega.shape, f"hypergradient: expected {tuple(self.omega.shape)}, got {tuple(g.shape)}")
        require(bool(torch.isfinite(g).all()), f"hypergradient: expected finite values, got {g.tolist()}")
        eta = eta_at(cfg, self.step + 1)
        self.omega = mirror_descent_step(self.omega, g, eta, cfg.floor)
        self.step += 1
        self.history.append({"step": self.step, "eta": eta, "g": g.tolist(), "omega": self.omega.tolist()})
        return self.omega

    def state_dict(self) -> dict[str, Any]:
        return {
            "omega": self.omega.tolist(),
            "step": self.step,
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            omega = torch.tensor(state["omega"], dtype=torch.float64)
            step, history = int(state["step"]), list(state["history"])
        except (KeyError, TypeError, ValueError) as e:
            raise DwmlError(f"omega state: expected keys omega, step, history ({e})") from None
        require(
            omega.shape == self.omega.shape,
            f"omega state: checkpoint has {omega.numel()} peer weights, expected {self.omega.numel()}",
        )
        self.omega, self.step, self.history = omega, step, [dict(entry) for entry in history]
