"""The outer (bi-level) step of deep weighted mutual learning: the peer weights omega.

Paper (Iyer 2024, arXiv 2411.16487; WML, Zhang et al. 2022): the peers' parameters theta minimise L1(theta, omega)
(eq. 2, `dwml.losses.dwml_loss`) on training batches, and omega minimises the ensemble loss L2 (`ensemble_loss`) of
the trained peers on held-out data. The best response theta*(omega) is approximated by one unrolled SGD step
(eq. 3):

    theta'(omega) = theta - gamma * grad_theta L1(theta, omega)
    g_omega = dL2(theta', omega)/domega                                   (direct term)
              - gamma * < grad_theta' L2(theta', omega), d^2 L1(theta, omega) / (dtheta domega) >   (mixed term)

and omega takes a mirror-descent (exponentiated-gradient) step on the simplex (eq. 4):

    omega <- omega * exp(-eta * g_omega) / Z

The paper's public code detaches the quantity it differentiates in the mixed term, so that term is identically
zero; here it is exact. L1 is linear in omega (L1 = sum_k omega_k h_k, `dwml_coefficients`), hence
d^2 L1/(dtheta domega_k) = grad_theta h_k and mixed_k = -gamma <v, grad_theta h_k> with v = grad_theta' L2.
With `detach_targets` the inner "gradient" is DML's semi-gradient (the teacher side of each KL held constant);
theta' uses that same update, so the formula differentiates exactly the update the inner loop takes.

Three exact ways to get the mixed term (`mode`), tested against each other and against finite differences.
Measured cost of one outer step (CPU, `tiny` preset, held-out batch = train batch) in units of one inner DWML step:
  "double_backward" (default): autograd through the create_graph gradient of L1 (reverse-over-reverse).
      ~2.8 inner steps for M = 2, 3, 4 (independent of M).
  "per_peer": the M gradients grad_theta h_k by first-order backprop (their omega-combination is the unrolled
      step, so no separate gradient of L1 is needed), then M inner products with v. ~2.4 / 2.9 / 3.4-3.9 inner
      steps for M = 2 / 3 / 4, but nothing second-order: use it when the attention kernel has no double backward
      (e.g. attn_implementation="flash_attention_2").
  "jvp": forward mode: <v, grad h_k> = d/de h_k(theta + e v), all k from one JVP; ~3.0-3.3 inner steps.
"double_backward" and "jvp" run under the math SDPA backend (the fused flash/efficient SDPA kernels have neither
double-backward nor forward-mode formulas). The outer step runs in eval mode (no dropout: every forward it makes must see the same
function for the derivative to be exact); the models' modes are restored and their parameters never modified
(the unrolled parameters go through `torch.func.functional_call`).
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

from .errors import DwmlError, require
from .losses import ENSEMBLE_KINDS, dwml_coefficients, ensemble_loss
from .model import masked_logits

MODES = ("double_backward", "per_peer", "jvp")
ETA_SCHEDULES = ("constant", "inv_sqrt", "cosine")

Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MaskedBatchLike(Protocol):
    """What the outer step reads from a batch (duck-typed; `dwml.masking.MaskedBatch` has these fields)."""

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


def hypergradient(
    models: Sequence[nn.Module],
    train_batch: MaskedBatchLike,
    heldout_batch: MaskedBatchLike,
    omega: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    gamma: float,
    detach_targets: bool = True,
    l2_kind: str = "ensemble",
    mode: str = "double_backward",
    forward: Forward = masked_logits,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """g_omega of eq. (3) for the peers `models` at the current omega (M,); returns (g, info).

    info (all detached): "direct" and "mixed" (M,) with g = direct + mixed, "l1" = L1(theta, omega) on the train
    batch, "l2" = L2(theta', omega) on the held-out batch, "h" (M,) = dL1/domega.
    """
    num_peers = len(models)
    require(num_peers >= 2, f"dwml: expected at least 2 peers, got {num_peers}")
    require(tuple(omega.shape) == (num_peers,), f"omega: expected shape ({num_peers},), got {tuple(omega.shape)}")
    require(mode in MODES, f"hypergrad.mode: expected one of {list(MODES)}, got {mode!r}")
    require(l2_kind in ENSEMBLE_KINDS, f"l2_kind: expected one of {list(ENSEMBLE_KINDS)}, got {l2_kind!r}")
    require(float(gamma) >= 0.0, f"gamma: expected a non-negative number, got {gamma!r}")

    named = [[(n, p) for n, p in m.named_parameters() if p.requires_grad] for m in models]
    names = [[n for n, _ in peer] for peer in named]
    sizes = [len(peer) for peer in named]
    params = [p for peer in named for _, p in peer]
    calls = [_Call(m, forward) for m in models]
    train_in, held_in = _inputs(train_batch), _inputs(heldout_batch)
    omega = omega.detach()

    def run(flat: Sequence[torch.Tensor], inputs: tuple) -> list[torch.Tensor]:
        """Every peer's logits with its parameters replaced by `flat` (the real models are untouched)."""
        return [
            functional_call(call, {f"model.{n}": t for n, t in zip(peer_names, peer_params)}, inputs)
            for call, peer_names, peer_params in zip(calls, names, _split(flat, sizes))
        ]

    def coefficients(logits_list: list[torch.Tensor]) -> torch.Tensor:
        return dwml_coefficients(logits_list, train_batch.labels, alpha, temperature, detach_targets)[0]

    def outer_loss(theta_prime: Sequence[torch.Tensor], w2: torch.Tensor) -> torch.Tensor:
        return ensemble_loss(run(theta_prime, held_in), heldout_batch.labels, w2, kind=l2_kind)

    # The L2 partial w.r.t. omega uses its own leaf w2 so that it excludes the path through theta'.
    w2 = omega.clone().requires_grad_(True)
    kernel = contextlib.nullcontext() if mode == "per_peer" else sdpa_kernel([SDPBackend.MATH])
    with _eval_mode(models), kernel, torch.enable_grad():
        if mode == "double_backward":
            w1 = omega.clone().requires_grad_(True)
            h = coefficients([forward(m, *train_in) for m in models])
            l1 = (w1.to(h.dtype) * h).sum()
            grads = torch.autograd.grad(l1, params, create_graph=True, materialize_grads=True)
            theta_prime = [p - gamma * g for p, g in zip(params, grads)]
            l2 = outer_loss(theta_prime, w2)
            direct, *v = torch.autograd.grad(l2, [w2, *theta_prime], retain_graph=True, materialize_grads=True)
            # d theta'/d omega contracted with v: exactly -gamma <v, d^2 L1/(dtheta domega)>.
            (mixed,) = torch.autograd.grad(theta_prime, w1, grad_outputs=v, materialize_grads=True)
        else:
            h = coefficients([forward(m, *train_in) for m in models])
            w = omega.to(h.dtype)
            l1 = (w * h).sum()
            if mode == "per_peer":
                # grad_theta h_k for every k; the inner step's gradient is their omega-combination (L1 is linear).
                grad_h = [
                    torch.autograd.grad(h[k], params, retain_graph=k + 1 < num_peers, materialize_grads=True)
                    for k in range(num_peers)
                ]
                grads = [sum(w[k] * grad_h[k][i] for k in range(num_peers)) for i in range(len(params))]
            else:
                grads = torch.autograd.grad(l1, params, materialize_grads=True)
            theta_prime = [(p - gamma * g).detach().requires_grad_(True) for p, g in zip(params, grads)]
            l2 = outer_loss(theta_prime, w2)
            direct, *v = torch.autograd.grad(l2, [w2, *theta_prime], materialize_grads=True)
            if mode == "per_peer":
                mixed = -gamma * torch.stack([_dot(v, grad_h[k]) for k in range(num_peers)])
            else:
                primals = tuple(p.detach() for p in params)
                _, dh = jvp(lambda *flat: coefficients(run(flat, train_in)), primals, tuple(v))
                mixed = -gamma * dh
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
