"""Hypergradient of eq. (3) against central finite differences (float64), and mirror descent of eq. (4)."""
from __future__ import annotations

import copy
import math
import json
from dataclasses import dataclass

import pytest
import torch

from dwml.errors import DwmlError
from dwml.distill.hypergrad import (
    MirrorDescentConfig,
    OmegaState,
    eta_at,
    hypergradient,
    mirror_descent_step,
    mixed_ratio,
    project_floor,
)
from dwml.distill.losses import dwml_loss, ensemble_loss
from dwml.models.model import Arch, build_model, masked_logits

# torch's forward-mode AD loads its decompositions with torch.jit.script, which warns in this torch version
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

D = torch.float64
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@dataclass
class Batch:  # duck-typed stand-in for dwml.data.masking.MaskedBatch
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor


def make_batch(seed: int, vocab: int = 50) -> Batch:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    input_ids[2, 7:] = 1
    positions = torch.tensor([1, 4, 6, 12, 15, 22, 25])
    input_ids.view(-1)[positions] = 4  # <mask>
    return Batch(input_ids, attention_mask, positions, torch.randint(5, vocab, (7,), generator=g))


def make_peers(attn: str = "eager") -> list[torch.nn.Module]:
    """Three different tiny RoBERTa peers, float64, dropout off, eval mode (deterministic)."""
    archs = [
        Arch(layers=1, heads=2, hidden=16, intermediate=32, vocab_size=50, max_positions=20),
        Arch(layers=2, heads=2, hidden=8, intermediate=16, vocab_size=50, max_positions=20),
        Arch(layers=1, heads=4, hidden=16, intermediate=24, vocab_size=50, max_positions=20),
    ]
    return [
        build_model(a, seed=i, attn_implementation=attn, **NO_DROPOUT).to(D).eval() for i, a in enumerate(archs)
    ]


PEERS = make_peers()
TRAIN, HELDOUT = make_batch(1), make_batch(2)
OMEGA = torch.tensor([0.5, 0.3, 0.2], dtype=D)
MODES = ["double_backward", "per_peer", "jvp"]


def unrolled_objective(omega, *, alpha, temperature, gamma, detach_targets, l2_kind):
    """F(omega) = L2(theta - gamma * grad_theta L1(theta, omega), omega), written independently of hypergrad.py:
    copies of the peers take an in-place SGD step on L1, then L2 is evaluated on the held-out batch."""
    peers = [copy.deepcopy(m) for m in PEERS]
    logits = [masked_logits(m, TRAIN.input_ids, TRAIN.attention_mask, TRAIN.positions) for m in peers]
    l1, _ = dwml_loss(logits, TRAIN.labels, omega, alpha, temperature, detach_targets)
    params = [p for m in peers for p in m.parameters()]
    grads = torch.autograd.grad(l1, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= gamma * g
        held = [masked_logits(m, HELDOUT.input_ids, HELDOUT.attention_mask, HELDOUT.positions) for m in peers]
        return ensemble_loss(held, HELDOUT.labels, omega, l2_kind).item()


def finite_differences(eps=1e-5, **cfg):
    """Central differences, each omega_k perturbed on its own (off the simplex, which eq. 3 allows)."""
    out = []
    for k in range(len(OMEGA)):
        e = torch.zeros_like(OMEGA)
        e[k] = eps
        out.append((unrolled_objective(OMEGA + e, **cfg) - unrolled_objective(OMEGA - e, **cfg)) / (2 * eps))
    return torch.tensor(out, dtype=D)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def centred(x):
    """The component mirror descent sees: eq. (4) is invariant to adding a constant to g."""
    return x - x.mean()


BASE = dict(alpha=0.5, temperature=2.0, gamma=2.0, detach_targets=True, l2_kind="ensemble")
CONFIGS = [
    BASE,
    dict(BASE, detach_targets=False, l2_kind="logit_ensemble", temperature=1.0),
    dict(BASE, l2_kind="sum", alpha=0.8, gamma=1.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "no-detach-logit-ens", "sum"])
@pytest.mark.parametrize("mode", MODES)
def test_hypergradient_matches_finite_differences(mode, cfg):
    fd = finite_differences(**cfg)
    g, info = hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, mode=mode, **cfg)
    torch.testing.assert_close(g, info["direct"] + info["mixed"])
    err, err_centred = rel_err(g, fd), rel_err(centred(g), centred(fd))
    print(f"\n{mode} {cfg}: rel err {err:.2e}, centred rel err {err_centred:.2e}")
    assert err < 1e-3 and err_centred < 1e-3
    assert info["l2"].item() == pytest.approx(unrolled_objective(OMEGA, **cfg), rel=1e-10)


def test_second_term_is_nonzero_and_matters():
    cfg = dict(BASE, gamma=5.0)
    fd = finite_differences(**cfg)
    g, info = hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, **cfg)
    assert info["mixed"].abs().max() > 5e-2
    # Dropping the mixed term (what the paper's public code effectively does) is far from the true derivative,
    # also in the direction that drives mirror descent, while the full g matches it.
    err_direct = rel_err(centred(info["direct"]), centred(fd))
    print(f"\ncentred rel err: direct term only {err_direct:.2f}, full {rel_err(centred(g), centred(fd)):.2e}")
    assert err_direct > 0.5
    assert rel_err(centred(g), centred(fd)) < 1e-3


def test_modes_agree():
    cfg = dict(BASE, gamma=0.7)
    results = [hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, mode=mode, **cfg)[0] for mode in MODES]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-10, atol=1e-12)


def test_gamma_zero_leaves_only_the_direct_term():
    g, info = hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, **dict(BASE, gamma=0.0))
    assert torch.count_nonzero(info["mixed"]) == 0
    w = OMEGA.clone().requires_grad_()
    held = [masked_logits(m, HELDOUT.input_ids, HELDOUT.attention_mask, HELDOUT.positions) for m in PEERS]
    (expected,) = torch.autograd.grad(ensemble_loss(held, HELDOUT.labels, w), w)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_models_are_not_modified(mode):
    peers = make_peers()
    for m in peers:
        m.train()  # dropout is 0 here; the point is that the training flags come back
    before = [copy.deepcopy(m.state_dict()) for m in peers]
    hypergradient(peers, TRAIN, HELDOUT, OMEGA, mode=mode, **BASE)
    for m, state in zip(peers, before):
        assert all(module.training for module in m.modules())
        assert all(p.grad is None for p in m.parameters())
        for name, value in m.state_dict().items():
            assert torch.equal(value, state[name]), name


def test_default_sdpa_attention_works_in_every_mode():
    """The fused SDPA kernels have no double-backward/forward-mode formulas; the outer step switches to math."""
    peers = make_peers(attn="sdpa")
    results = [hypergradient(peers, TRAIN, HELDOUT, OMEGA, mode=mode, **BASE)[0] for mode in MODES]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-10, atol=1e-12)
    eager = hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, **BASE)[0]
    torch.testing.assert_close(results[0], eager, rtol=1e-8, atol=1e-10)


def test_hypergradient_rejects_bad_arguments():
    with pytest.raises(DwmlError, match="omega"):
        hypergradient(PEERS, TRAIN, HELDOUT, OMEGA[:2], **BASE)
    with pytest.raises(DwmlError, match="mode"):
        hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, mode="exact", **BASE)
    with pytest.raises(DwmlError, match="peers"):
        hypergradient(PEERS[:1], TRAIN, HELDOUT, OMEGA[:1], **BASE)


# --- mirror descent (eq. 4) ------------------------------------------------------------------------------------------


def test_mirror_descent_closed_form():
    omega, g = torch.tensor([0.5, 0.3, 0.2], dtype=D), torch.tensor([0.4, -1.0, 2.0], dtype=D)
    unnormalised = omega * torch.exp(-0.3 * g)
    torch.testing.assert_close(mirror_descent_step(omega, g, 0.3), unnormalised / unnormalised.sum())


def test_mirror_descent_stays_on_the_simplex():
    gen = torch.Generator().manual_seed(0)
    omega = torch.full((4,), 0.25, dtype=D)
    for _ in range(2000):
        omega = mirror_descent_step(omega, torch.randn(4, generator=gen, dtype=D), 0.1)
        assert abs(omega.sum().item() - 1.0) < 1e-12 and bool((omega > 0).all())
    # huge gradients cannot overflow, and the floor holds
    for _ in range(200):
        omega = mirror_descent_step(omega, 1e4 * torch.randn(4, generator=gen, dtype=D), 1.0, floor=0.01)
        assert torch.isfinite(omega).all() and abs(omega.sum().item() - 1.0) < 1e-12
        assert omega.min().item() >= 0.01 - 1e-15


def test_mirror_descent_moves_weight_to_lower_gradient_peers():
    omega = torch.tensor([0.25, 0.25, 0.5], dtype=D)
    new = mirror_descent_step(omega, torch.tensor([1.0, 0.0, 0.0], dtype=D), 0.5)
    assert new[0] < omega[0] and new[1] > omega[1] and new[2] > omega[2]
    assert (new[2] / new[1]).item() == pytest.approx(2.0, rel=1e-12)  # equal gradients keep their ratio


def test_mirror_descent_is_invariant_to_a_constant_shift():
    omega, g = torch.tensor([0.1, 0.6, 0.3], dtype=D), torch.tensor([0.3, -0.2, 0.9], dtype=D)
    for c in (-7.0, 0.5, 1e3):
        torch.testing.assert_close(mirror_descent_step(omega, g + c, 0.4), mirror_descent_step(omega, g, 0.4))


def test_project_floor_is_a_scaled_clamp():
    omega = torch.tensor([0.001, 0.02, 0.379, 0.6], dtype=D)
    out = project_floor(omega, 0.05)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert out[0].item() == pytest.approx(0.05) and out[1].item() == pytest.approx(0.05)
    assert (out[3] / out[2]).item() == pytest.approx(0.6 / 0.379, rel=1e-12)  # free weights keep their ratios
    torch.testing.assert_close(project_floor(omega, 0.0005), omega)  # nothing below the floor: unchanged
    with pytest.raises(DwmlError, match="floor"):
        project_floor(omega, 0.3)


def test_eta_schedules():
    assert eta_at(MirrorDescentConfig(eta=0.2), 50) == 0.2
    assert eta_at(MirrorDescentConfig(eta=0.2, schedule="inv_sqrt"), 4) == pytest.approx(0.1)
    cosine = MirrorDescentConfig(eta=0.2, schedule="cosine", total_steps=10, eta_min=0.02)
    assert eta_at(cosine, 1) == pytest.approx(0.2)
    assert eta_at(cosine, 6) == pytest.approx(0.11)
    assert eta_at(cosine, 11) == pytest.approx(0.02) and eta_at(cosine, 500) == pytest.approx(0.02)
    with pytest.raises(DwmlError, match="schedule"):
        MirrorDescentConfig(schedule="linear")
    with pytest.raises(DwmlError, match="total_steps"):
        MirrorDescentConfig(schedule="cosine")


def test_omega_state_updates_and_round_trips():
    cfg = MirrorDescentConfig(eta=0.5, schedule="inv_sqrt", floor=0.01)
    state = OmegaState.uniform(3)
    for g in ([1.0, 0.0, -1.0], [0.5, 0.5, 0.0]):
        state.update(torch.tensor(g), cfg)
    assert state.step == 2 and len(state.history) == 2
    assert state.history[1]["eta"] == pytest.approx(0.5 / 2**0.5)
    saved = json.loads(json.dumps(state.state_dict()))  # plain JSON-able data
    restored = OmegaState.uniform(3)
    restored.load_state_dict(saved)
    assert torch.equal(restored.omega, state.omega) and restored.step == 2 and restored.history == state.history
    with pytest.raises(DwmlError, match="peer weights"):
        OmegaState.uniform(4).load_state_dict(saved)
    with pytest.raises(DwmlError, match="finite"):
        state.update(torch.tensor([float("nan"), 0.0, 0.0]), cfg)


# --- the AdamW unroll against the real optimizer ---------------------------------------------------------------------


def make_adamw(peers, lrs=(3e-3, 1e-3, 2e-3)):
    """Each peer's AdamW as the trainer builds it (no decay on 1-D parameters), with its own lr, after three real
    steps on other batches, so its moments, step count and bias corrections are not trivial."""
    from types import SimpleNamespace

    from dwml.training.setup import make_optimizer

    hp = SimpleNamespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-6)
    opts = [make_optimizer(m, hp) for m in peers]
    for opt, lr in zip(opts, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
    for seed in (10, 11, 12):
        b = make_batch(seed)
        logits = [masked_logits(m, b.input_ids, b.attention_mask, b.positions) for m in peers]
        loss, _ = dwml_loss(logits, b.labels, OMEGA, 0.5, 2.0)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    return opts


ADAM_PEERS = make_peers()
ADAM_OPTS = make_adamw(ADAM_PEERS)
TEACHER = make_peers()[0]
TEACHER_LOGITS = masked_logits(TEACHER, TRAIN.input_ids, TRAIN.attention_mask, TRAIN.positions).detach()


def real_step_objective(omega, *, alpha, temperature, detach_targets, l2_kind, grad_clip=0.0, beta=0.0):
    """F(omega) = L2 after the real `optimizer.step()` with the gradient of L1(theta, omega), written independently
    of hypergrad.py: copies of the peers and their AdamW states, the trainer's per-peer clip, then L2."""
    from dwml.distill.losses import kd_dwml_loss

    peers, opts = copy.deepcopy((ADAM_PEERS, ADAM_OPTS))  # one deepcopy: the states keep pointing at the copies
    logits = [masked_logits(m, TRAIN.input_ids, TRAIN.attention_mask, TRAIN.positions) for m in peers]
    if beta:
        l1, _ = kd_dwml_loss(logits, TEACHER_LOGITS, TRAIN.labels, omega, alpha, beta, temperature, detach_targets)
    else:
        l1, _ = dwml_loss(logits, TRAIN.labels, omega, alpha, temperature, detach_targets)
    l1.backward()
    for m, opt in zip(peers, opts):
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), grad_clip)
        opt.step()
    with torch.no_grad():
        held = [masked_logits(m, HELDOUT.input_ids, HELDOUT.attention_mask, HELDOUT.positions) for m in peers]
        return ensemble_loss(held, HELDOUT.labels, omega, l2_kind).item()


def real_step_differences(eps=1e-5, **cfg):
    out = []
    for k in range(len(OMEGA)):
        e = torch.zeros_like(OMEGA)
        e[k] = eps
        out.append((real_step_objective(OMEGA + e, **cfg) - real_step_objective(OMEGA - e, **cfg)) / (2 * eps))
    return torch.tensor(out, dtype=D)


def peer_grad_norms():
    logits = [masked_logits(m, TRAIN.input_ids, TRAIN.attention_mask, TRAIN.positions) for m in ADAM_PEERS]
    l1, _ = dwml_loss(logits, TRAIN.labels, OMEGA, 0.5, 2.0)
    grads = torch.autograd.grad(l1, [p for m in ADAM_PEERS for p in m.parameters()])
    sizes = [len(list(m.parameters())) for m in ADAM_PEERS]
    norms, start = [], 0
    for n in sizes:
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[start:start + n]])).item())
        start += n
    return norms


# between the two smallest peer-gradient norms: the clip is active for some peers and not for others (and no peer
# sits on the clip's kink, where the real step is not differentiable)
CLIP = math.sqrt(sorted(peer_grad_norms())[0] * sorted(peer_grad_norms())[1])
ADAM_CONFIGS = [
    dict(alpha=0.5, temperature=2.0, detach_targets=True, l2_kind="ensemble"),
    dict(alpha=0.5, temperature=2.0, detach_targets=True, l2_kind="ensemble", grad_clip=CLIP),
    dict(alpha=0.8, temperature=1.0, detach_targets=False, l2_kind="sum", grad_clip=CLIP, beta=0.5),
]


def adam_hypergradient(mode, unroll="adamw", beta=0.0, **cfg):
    teacher = dict(teacher_logits=TEACHER_LOGITS, teacher_weight=beta) if beta else {}
    return hypergradient(ADAM_PEERS, TRAIN, HELDOUT, OMEGA, mode=mode, unroll=unroll, optimizers=ADAM_OPTS,
                         **teacher, **cfg)


@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=["no-clip", "clip", "kd_dwml-clip-no-detach-sum"])
@pytest.mark.parametrize("mode", MODES)
def test_adamw_unroll_matches_the_real_optimizer_step(mode, cfg):
    before = [copy.deepcopy(o.state_dict()) for o in ADAM_OPTS]
    fd = real_step_differences(**cfg)
    g, info = adam_hypergradient(mode, **cfg)
    err, err_centred = rel_err(g, fd), rel_err(centred(g), centred(fd))
    ratio = mixed_ratio(info["direct"], info["mixed"])
    print(f"\n{mode} {cfg}: rel err {err:.2e}, centred {err_centred:.2e}, mixed ratio {ratio:.3f}")
    assert err < 1e-6 and err_centred < 1e-6
    assert rel_err(centred(info["direct"]), centred(fd)) > 1e3 * err_centred  # a missing mixed term would fail
    assert info["l2"].item() == pytest.approx(real_step_objective(OMEGA, **cfg), rel=1e-10)
    for opt, state in zip(ADAM_OPTS, before):  # the optimizers' states are read, never changed
        for key, slot in opt.state_dict()["state"].items():
            for name, value in slot.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(state["state"][key][name]))


def test_adamw_second_moment_term_matters():
    """Holding v' constant (dropping the v-part of dtheta'/dg) is measurably wrong against the real step."""
    from dwml.distill import hypergrad

    cfg = ADAM_CONFIGS[0]
    fd = real_step_differences(**cfg)
    exact, _ = adam_hypergradient("per_peer", **cfg)

    class ConstantV(hypergrad.InnerStep):
        def apply_and_vjp(self, grads):  # dtheta'/dg = -(lr / bc1) (1 - b1) / D only
            def vjp(v):
                out = []
                for g, x, s in zip(grads, v, self.slots):
                    sq = s.exp_avg_sq * s.beta2 + g * g * (1 - s.beta2)
                    denom = sq.sqrt() / math.sqrt(1 - s.beta2**s.step) + s.eps
                    out.append(-(s.lr / (1 - s.beta1**s.step)) * (1 - s.beta1) / denom * x)
                return out

            return self.apply(grads), vjp

    real = hypergrad.InnerStep
    hypergrad.InnerStep = ConstantV
    try:
        approx, _ = adam_hypergradient("per_peer", **cfg)
    finally:
        hypergrad.InnerStep = real
    gap, exact_err = rel_err(centred(approx), centred(fd)), rel_err(centred(exact), centred(fd))
    print(f"\ncentred rel err vs the real AdamW step: v held constant {gap:.2e}, v differentiated {exact_err:.2e}")
    assert exact_err < 1e-6 and gap > 100 * exact_err


@pytest.mark.parametrize("mode", MODES)
def test_hypergradient_reads_nothing_back_but_the_step_counts(mode, monkeypatch):
    """No host sync per peer (the clip's kappa) or per parameter (AdamW's step counts, on the device for the fused
    AdamW): hypergrad.py and unrolled.py read one batch of step counts per device and leave g and info on the
    device."""
    import sys

    from dwml.distill import hypergrad, unrolled

    ours = {hypergrad.__file__, unrolled.__file__}
    reads = []
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        def counted(self, *a, _real=getattr(torch.Tensor, name), _name=name, **k):
            if sys._getframe(1).f_code.co_filename in ours:
                reads.append((_name, sys._getframe(1).f_lineno))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    adam_hypergradient(mode, **ADAM_CONFIGS[1])  # the clip active for some peers, not for others
    assert [name for name, _ in reads] == ["tolist"], reads


@pytest.mark.parametrize("unroll", ["adamw", "sgd"])
def test_modes_agree_for_every_unroll(unroll):
    cfg = dict(alpha=0.5, temperature=2.0, grad_clip=CLIP, beta=0.5, gamma=0.7 if unroll == "sgd" else None)
    results = [adam_hypergradient(mode, unroll=unroll, **cfg)[0] for mode in MODES]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-9, atol=1e-12)


def test_sgd_unroll_with_teacher_matches_finite_differences():
    """kd_dwml: the teacher term moves theta' (so L2 and v), though not d^2 L1 / dtheta domega."""
    from dwml.distill.losses import kd_dwml_loss

    cfg = dict(alpha=0.5, temperature=2.0, detach_targets=True)

    def objective(omega):
        peers = [copy.deepcopy(m) for m in PEERS]
        logits = [masked_logits(m, TRAIN.input_ids, TRAIN.attention_mask, TRAIN.positions) for m in peers]
        l1, _ = kd_dwml_loss(logits, TEACHER_LOGITS, TRAIN.labels, omega, beta=0.5, **cfg)
        params = [p for m in peers for p in m.parameters()]
        grads = torch.autograd.grad(l1, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 2.0 * g
            held = [masked_logits(m, HELDOUT.input_ids, HELDOUT.attention_mask, HELDOUT.positions) for m in peers]
            return ensemble_loss(held, HELDOUT.labels, omega).item()

    fd = []
    for k in range(3):
        e = torch.zeros_like(OMEGA)
        e[k] = 1e-5
        fd.append((objective(OMEGA + e) - objective(OMEGA - e)) / 2e-5)
    fd = torch.tensor(fd, dtype=D)
    for mode in MODES:
        g, _ = hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, mode=mode, gamma=2.0, teacher_logits=TEACHER_LOGITS,
                             teacher_weight=0.5, **cfg)
        assert rel_err(g, fd) < 1e-6
    without, _ = hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, gamma=2.0, **cfg)
    assert rel_err(without, fd) > 1e-3  # leaving the teacher out of the unroll is measurably different


@pytest.mark.parametrize("mode", MODES)
def test_direct_unroll_drops_only_the_mixed_term(mode):
    cfg = dict(alpha=0.5, temperature=2.0, grad_clip=CLIP)
    g, info = adam_hypergradient(mode, unroll="direct", **cfg)
    _, full = adam_hypergradient(mode, unroll="adamw", **cfg)
    assert torch.count_nonzero(info["mixed"]) == 0 and mixed_ratio(info["direct"], info["mixed"]) == 0.0
    torch.testing.assert_close(g, full["direct"], rtol=1e-10, atol=1e-12)  # same theta', same L2
    assert info["l2"].item() == pytest.approx(full["l2"].item(), rel=1e-12)


def test_mixed_ratio_is_centred():
    direct = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    assert mixed_ratio(direct, torch.full((3,), 5.0, dtype=D)) == 0.0  # a constant shift moves nothing
    assert mixed_ratio(direct, torch.tensor([0.0, 1.0, 0.0], dtype=D) + 7) == pytest.approx(
        torch.tensor([-1 / 3, 2 / 3, -1 / 3]).norm().item() / 2**0.5)
    assert math.isnan(mixed_ratio(torch.ones(3, dtype=D), direct))


def test_unroll_arguments_are_checked():
    with pytest.raises(DwmlError, match="unroll"):
        hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, unroll="adam", **BASE)
    with pytest.raises(DwmlError, match="optimizers"):
        hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, unroll="adamw", alpha=0.5)
    with pytest.raises(DwmlError, match="gamma"):
        hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, unroll="sgd", alpha=0.5)
    sgd = [torch.optim.SGD(m.parameters(), lr=0.1) for m in PEERS]
    with pytest.raises(DwmlError, match="AdamW"):
        hypergradient(PEERS, TRAIN, HELDOUT, OMEGA, unroll="adamw", optimizers=sgd, alpha=0.5)
