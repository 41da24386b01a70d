"""Losses against closed-form values (math.exp/log on V=3 logits) and against naive per-pair loops."""
from __future__ import annotations

import math

import pytest
import torch

from dwml.errors import DwmlError
from dwml.distill.losses import (
    dwml_coefficients,
    dwml_loss,
    ensemble_logprobs,
    ensemble_loss,
    kd_dwml_loss,
    kd_loss,
    kl_div,
    mlm_loss,
)

D = torch.float64


def softmax(z, t=1.0):
    e = [math.exp(x / t) for x in z]
    return [x / sum(e) for x in e]


def ce_ref(z, y):
    return -math.log(softmax(z)[y])


def kl_ref(target, student, t=1.0):
    p, q = softmax(target, t), softmax(student, t)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def tensor(rows):
    return torch.tensor(rows, dtype=D)


def random_logits(m, n=4, v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, v, generator=g, dtype=D) * 2 for _ in range(m)]


def test_mlm_loss_hand():
    loss = mlm_loss(tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), torch.tensor([2, 1]))
    assert loss.item() == pytest.approx((ce_ref([1, 2, 3], 2) + math.log(3)) / 2, rel=1e-12)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_kl_div_hand_and_direction(t):
    a, b = [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]
    assert kl_div(tensor([a]), tensor([b]), t).item() == pytest.approx(kl_ref(a, b, t), rel=1e-12)
    assert kl_div(tensor([b]), tensor([a]), t).item() == pytest.approx(kl_ref(b, a, t), rel=1e-12)
    # the direction matters: with these logits the two KLs differ
    assert abs(kl_ref(a, b, t) - kl_ref(b, a, t)) > 1e-3


def test_kl_is_averaged_over_positions():
    a, b = [[0.0, 1.0, 2.0], [1.0, 1.0, -1.0]], [[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]
    expected = (kl_ref(a[0], b[0]) + kl_ref(a[1], b[1])) / 2
    assert kl_div(tensor(a), tensor(b)).item() == pytest.approx(expected, rel=1e-12)


def test_kl_of_a_distribution_with_itself_is_zero():
    (z,) = random_logits(1)
    assert abs(kl_div(z, z).item()) < 1e-14
    assert abs(kl_div(z, z + 3.0, temperature=2.0).item()) < 1e-14  # softmax is shift-invariant


def test_kl_symmetric_case():
    # two-token distributions that are mirror images have equal KL in both directions
    a, b = tensor([[0.3, -1.2]]), tensor([[-1.2, 0.3]])
    assert kl_div(a, b).item() == pytest.approx(kl_div(b, a).item(), rel=1e-12)
    assert kl_div(a, b).item() == pytest.approx(kl_ref([0.3, -1.2], [-1.2, 0.3]), rel=1e-12)


def test_kd_loss_hand_and_teacher_is_detached():
    s, t, y, alpha, temp = [1.0, 0.0, -1.0], [0.0, 2.0, 1.0], 2, 0.3, 2.0
    student, teacher = tensor([s]).requires_grad_(), tensor([t]).requires_grad_()
    loss = kd_loss(student, teacher, torch.tensor([y]), alpha, temp)
    expected = (1 - alpha) * ce_ref(s, y) + alpha * temp**2 * kl_ref(t, s, temp)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_dwml_two_peers_hand():
    z0, z1, y = [1.0, 0.0, -1.0], [0.0, 2.0, 1.0], 0
    w0, w1, alpha, t = 0.7, 0.3, 0.4, 2.0
    total, parts = dwml_loss([tensor([z0]), tensor([z1])], torch.tensor([y]), tensor([w0, w1]), alpha, t)
    kl01, kl10 = kl_ref(z0, z1, t), kl_ref(z1, z0, t)  # KL(p0 || p1): peer 1 learns from peer 0 (weight w0)
    expected = (1 - alpha) * (w0 * ce_ref(z0, y) + w1 * ce_ref(z1, y)) + alpha * t**2 * (w0 * kl01 + w1 * kl10)
    assert total.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(parts["ce"], tensor([ce_ref(z0, y), ce_ref(z1, y)]), rtol=1e-12, atol=0)
    torch.testing.assert_close(parts["kl"], tensor([[0.0, kl01], [kl10, 0.0]]), rtol=1e-12, atol=1e-15)
    h = tensor([(1 - alpha) * ce_ref(z0, y) + alpha * t**2 * kl01, (1 - alpha) * ce_ref(z1, y) + alpha * t**2 * kl10])
    torch.testing.assert_close(parts["h"], h, rtol=1e-12, atol=0)
    assert (parts["ce_term"] + parts["kl_term"]).item() == pytest.approx(expected, rel=1e-12)


def naive_dwml(logits, labels, omega, alpha, t, detach):
    total = 0.0
    for i, zi in enumerate(logits):
        total = total + (1 - alpha) * omega[i] * mlm_loss(zi, labels)
        for j, zj in enumerate(logits):
            if j != i:
                total = total + alpha * t**2 * omega[j] * kl_div(zj.detach() if detach else zj, zi, t)
    return total


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("t", [1.0, 1.7])
def test_dwml_matches_naive_pair_loop_values_and_gradients(detach, t):
    labels = torch.tensor([0, 5, 2, 3])
    omega = tensor([0.5, 0.2, 0.3])
    fast = [z.clone().requires_grad_() for z in random_logits(3)]
    slow = [z.clone().requires_grad_() for z in random_logits(3)]
    total, _ = dwml_loss(fast, labels, omega, 0.6, t, detach_targets=detach)
    reference = naive_dwml(slow, labels, omega, 0.6, t, detach)
    assert total.item() == pytest.approx(reference.item(), rel=1e-12)
    total.backward()
    reference.backward()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_dwml_is_linear_in_omega_with_coefficients_h():
    labels = torch.tensor([0, 5, 2, 3])
    logits = random_logits(3, seed=1)
    h, _, _ = dwml_coefficients(logits, labels, 0.5, 2.0)
    for omega in (tensor([1.0, 0.0, 0.0]), tensor([0.2, 0.5, 0.3]), tensor([-1.0, 2.0, 0.5])):
        total, _ = dwml_loss(logits, labels, omega, 0.5, 2.0)
        assert total.item() == pytest.approx((omega * h).sum().item(), rel=1e-12)


def test_dwml_alpha_zero_is_weighted_cross_entropy():
    labels = torch.tensor([1, 0, 4, 3])
    logits, omega = random_logits(3, seed=2), tensor([0.1, 0.6, 0.3])
    total, _ = dwml_loss(logits, labels, omega, 0.0, 3.0)
    expected = sum(omega[i] * mlm_loss(z, labels) for i, z in enumerate(logits))
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_dml_special_case(m):
    """omega = alpha = 1/M: L1 = (M-1)/M^2 * sum_i [CE_i + 1/(M-1) sum_{j != i} KL(p_j || p_i)], which is
    Zhang et al. (2018) eq. (2) summed over the networks (each network's loss, with the others' targets fixed)."""
    labels = torch.tensor([1, 0, 4, 3])
    ours = [z.requires_grad_() for z in random_logits(m, seed=3)]
    dml = [z.requires_grad_() for z in random_logits(m, seed=3)]
    total, _ = dwml_loss(ours, labels, torch.full((m,), 1.0 / m, dtype=D), 1.0 / m)
    per_network = [
        mlm_loss(dml[i], labels) + sum(kl_div(dml[j].detach(), dml[i]) for j in range(m) if j != i) / (m - 1)
        for i in range(m)
    ]
    scale = (m - 1) / m**2
    assert total.item() == pytest.approx(scale * sum(per_network).item(), rel=1e-12)
    total.backward()
    (scale * sum(per_network)).backward()
    for a, b in zip(ours, dml):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def test_temperature_scales_kl_by_t_squared():
    z0, z1 = [1.0, 0.0, -1.0], [0.0, 2.0, 1.0]
    logits, labels, omega = [tensor([z0]), tensor([z1])], torch.tensor([0]), tensor([0.5, 0.5])
    for t in (1.0, 2.0, 4.0):
        total, _ = dwml_loss(logits, labels, omega, 1.0, t)
        assert total.item() == pytest.approx(t**2 * 0.5 * (kl_ref(z0, z1, t) + kl_ref(z1, z0, t)), rel=1e-12)
    # identical peers: no KL at any temperature, only the cross-entropy is left
    same, _ = dwml_loss([tensor([z0]), tensor([z0])], labels, omega, 0.25, 3.0)
    assert same.item() == pytest.approx(0.75 * ce_ref(z0, 0), rel=1e-12)


def test_detach_targets_blocks_the_teacher_side():
    labels = torch.tensor([0, 1, 2, 3])
    omega = tensor([1.0, 0.0])  # only KL(p0 || p1) remains at alpha = 1: peer 0 teaches peer 1
    for detach in (True, False):
        z0, z1 = [z.requires_grad_() for z in random_logits(2, seed=4)]
        total, _ = dwml_loss([z0, z1], labels, omega, 1.0, 2.0, detach_targets=detach)
        total.backward()
        assert z1.grad.abs().max() > 1e-3
        if detach:
            assert torch.count_nonzero(z0.grad) == 0
        else:
            assert z0.grad.abs().max() > 1e-3


def test_low_precision_logits_are_upcast():
    logits = [z.to(torch.bfloat16) for z in random_logits(2, seed=5)]
    labels = torch.tensor([0, 1, 2, 3])
    total, _ = dwml_loss(logits, labels, torch.tensor([0.5, 0.5]), 0.5, 2.0)
    reference, _ = dwml_loss([z.float() for z in logits], labels, torch.tensor([0.5, 0.5]), 0.5, 2.0)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)


def test_ensemble_logprobs_hand():
    z0, z1, w = [1.0, 0.0, -1.0], [0.0, 2.0, 1.0], [0.25, 0.75]
    out = ensemble_logprobs([tensor([z0]), tensor([z1])], tensor(w))
    p0, p1 = softmax(z0), softmax(z1)
    expected = [math.log(w[0] * a + w[1] * b) for a, b in zip(p0, p1)]
    torch.testing.assert_close(out, tensor([expected]), rtol=1e-12, atol=0)


def test_ensemble_loss_kinds():
    labels = torch.tensor([1, 0, 4, 3])
    logits, omega = random_logits(3, seed=6), tensor([0.2, 0.3, 0.5])
    ces = torch.stack([mlm_loss(z, labels) for z in logits])
    mixture = sum(w * torch.softmax(z, -1) for w, z in zip(omega, logits))
    expected_ensemble = -torch.log(mixture[torch.arange(4), labels]).mean()
    assert ensemble_loss(logits, labels, omega, "ensemble").item() == pytest.approx(expected_ensemble.item(), rel=1e-12)
    assert ensemble_loss(logits, labels, omega, "sum").item() == pytest.approx((omega * ces).sum().item(), rel=1e-12)
    averaged = sum(w * z for w, z in zip(omega, logits))
    assert ensemble_loss(logits, labels, omega, "logit_ensemble").item() == pytest.approx(
        mlm_loss(averaged, labels).item(), rel=1e-12
    )
    # Jensen: the mixture's CE never exceeds the weighted mean of the peers' CE
    assert expected_ensemble < (omega * ces).sum()
    with pytest.raises(DwmlError, match="l2_kind"):
        ensemble_loss(logits, labels, omega, "mean")


def test_kd_dwml_adds_a_fixed_weight_teacher_term():
    z0, z1, zt, y = [1.0, 0.0, -1.0], [0.0, 2.0, 1.0], [2.0, -1.0, 0.5], 1
    logits = [tensor([z0]).requires_grad_(), tensor([z1]).requires_grad_()]
    teacher = tensor([zt]).requires_grad_()
    labels, omega, alpha, t = torch.tensor([y]), tensor([0.6, 0.4]), 0.5, 2.0
    base, _ = dwml_loss(logits, labels, omega, alpha, t)
    same, _ = kd_dwml_loss(logits, teacher, labels, omega, alpha, 0.0, t)
    assert same.item() == pytest.approx(base.item(), rel=1e-12)
    total, parts = kd_dwml_loss(logits, teacher, labels, omega, alpha, 0.8, t)
    expected = base.item() + 0.8 * t**2 * (kl_ref(zt, z0, t) + kl_ref(zt, z1, t))
    assert total.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(parts["teacher_kl"], tensor([kl_ref(zt, z0, t), kl_ref(zt, z1, t)]), rtol=1e-12, atol=0)
    total.backward()
    assert teacher.grad is None and logits[0].grad.abs().sum() > 0


def test_bad_values_raise_dwml_error():
    logits, labels = random_logits(2), torch.tensor([0, 1, 2, 3])
    with pytest.raises(DwmlError, match="alpha"):
        dwml_loss(logits, labels, tensor([0.5, 0.5]), 1.5)
    with pytest.raises(DwmlError, match="temperature"):
        kd_loss(logits[0], logits[1], labels, 0.5, 0.0)
    with pytest.raises(DwmlError, match="omega"):
        dwml_loss(logits, labels, tensor([0.2, 0.3, 0.5]), 0.5)


@pytest.mark.parametrize("temperature, n", [(1.0, 7), (2.0, 7), (1.0, 100), (0.5, 100)])
def test_dwml_inner_loss_equals_pairwise_dwml_loss(temperature, n):
    from dwml.distill.losses import dwml_inner_loss

    torch.manual_seed(0)
    zs = [torch.randn(n, 11, dtype=torch.float64, requires_grad=True) for _ in range(3)]  # n = 100: several chunks
    labels = torch.randint(0, 11, (n,))
    omega = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref, ref_parts = dwml_loss(zs, labels, omega, 0.4, temperature, detach_targets=True)
    ref_grads = torch.autograd.grad(ref, zs)
    fast, parts = dwml_inner_loss(zs, labels, omega, 0.4, temperature)
    grads = torch.autograd.grad(fast, zs)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["ce"], ref_parts["ce"])
    # per-student weighted KL: sum_j omega_j KL(p_j || p_i) = column sums of the omega-weighted pairwise matrix
    torch.testing.assert_close(parts["kl"], (omega[:, None] * ref_parts["kl"]).sum(0))
    # A weighted loss (gradient accumulation, DDP) scales the closed-form gradient too.
    weighted = torch.autograd.grad(0.3 * dwml_inner_loss(zs, labels, omega, 0.4, temperature)[0], zs)
    for g, r in zip(weighted, ref_grads):
        torch.testing.assert_close(g, 0.3 * r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlm_loss_fused_cpu_path_matches_cross_entropy(dtype):
    """On the CPU with a gradient wanted, mlm_loss takes the fused closed-form path: same value and gradient as
    F.cross_entropy (several chunks, labels anywhere in the vocabulary), scaled by an outer weight; a second
    derivative raises instead of silently being 0."""
    from dwml.distill import fused as fused_mod, losses

    torch.manual_seed(1)
    z = (3 * torch.randn(fused_mod.ROW_CHUNK * 3 + 5, 50, dtype=dtype)).requires_grad_(True)
    labels = torch.randint(0, 50, (z.shape[0],))
    fused = losses.mlm_loss(z, labels)
    assert fused.grad_fn is not None and "FusedPeerLoss" in type(fused.grad_fn).__name__
    (g,) = torch.autograd.grad(0.7 * fused, z)
    ref = torch.nn.functional.cross_entropy(z, labels)
    (g_ref,) = torch.autograd.grad(0.7 * ref, z)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, ref, **tol)
    torch.testing.assert_close(g, g_ref, **tol)
    with torch.no_grad():  # no gradient wanted: the plain path
        torch.testing.assert_close(losses.mlm_loss(z, labels), ref.detach(), **tol)
    (g1,) = torch.autograd.grad(losses.mlm_loss(z, labels), z, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g1.sum(), z)


@pytest.mark.parametrize("temperature, n", [(1.0, 7), (2.0, 100), (0.5, 100)])
def test_dwml_coefficients_outer_matches_autograd_reference(temperature, n):
    """The outer step's closed-form coefficients (several chunks at n = 100) against `dwml_coefficients` under plain
    autograd, float64: the value h, the gradient for a cotangent a, the derivative of that gradient in a (what the
    double_backward hypergradient takes), and the forward-mode derivative (the jvp hypergradient)."""
    from torch.func import jvp

    from dwml.distill.losses import dwml_coefficients_outer

    torch.manual_seed(3)
    zs = [(2 * torch.randn(n, 13, dtype=torch.float64)).requires_grad_(True) for _ in range(3)]
    labels = torch.randint(0, 13, (n,))
    alpha = 0.35

    def ref(*z):
        return dwml_coefficients(list(z), labels, alpha, temperature, detach_targets=True)[0]

    def fast(*z):
        return dwml_coefficients_outer(list(z), labels, alpha, temperature)

    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast(*zs), ref(*zs), **tol)
    cot = torch.tensor([0.5, -0.2, 0.9], dtype=torch.float64)
    a1, a2 = cot.clone().requires_grad_(True), cot.clone().requires_grad_(True)
    g_fast = torch.autograd.grad(fast(*zs), zs, grad_outputs=a1, create_graph=True)
    g_ref = torch.autograd.grad(ref(*zs), zs, grad_outputs=a2, create_graph=True)
    for g, r in zip(g_fast, g_ref):
        torch.testing.assert_close(g, r, **tol)
    vs = [torch.randn_like(z) for z in zs]
    (d_fast,) = torch.autograd.grad(g_fast, a1, grad_outputs=vs, retain_graph=True)
    (d_ref,) = torch.autograd.grad(g_ref, a2, grad_outputs=vs)
    torch.testing.assert_close(d_fast, d_ref, **tol)
    with pytest.raises(RuntimeError):  # no second derivative through the logits: an error, never a silent 0
        torch.autograd.grad(g_fast, zs, grad_outputs=vs)
    tangents = tuple(torch.randn_like(z) for z in zs)
    primals = tuple(z.detach() for z in zs)
    _, t_fast = jvp(fast, primals, tangents)
    _, t_ref = jvp(ref, primals, tangents)
    torch.testing.assert_close(t_fast, t_ref, **tol)


@pytest.mark.parametrize("omega", [[0.5, 0.3, 0.2], [0.7, 0.3, 0.0]])
def test_ensemble_loss_closed_form_matches_autograd(omega):
    """L2 with gradients wanted takes the closed-form path: the value and the gradients w.r.t. every peer's logits
    and omega equal autograd through `ensemble_logprobs` (float64, several chunks, a zero weight included)."""
    from dwml.distill import fused, losses

    torch.manual_seed(5)
    n = fused.ROW_CHUNK * 2 + 3
    zs = [(2 * torch.randn(n, 17, dtype=torch.float64)).requires_grad_(True) for _ in range(3)]
    labels = torch.randint(0, 17, (n,))
    w = torch.tensor(omega, dtype=torch.float64, requires_grad=True)
    fast = losses.ensemble_loss(zs, labels, w)
    assert "FusedEnsembleLoss" in type(fast.grad_fn).__name__
    ref = torch.nn.functional.nll_loss(losses.ensemble_logprobs(zs, w), labels)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast, ref, **tol)
    (g_w, *g_z), (r_w, *r_z) = torch.autograd.grad(0.6 * fast, [w, *zs]), torch.autograd.grad(0.6 * ref, [w, *zs])
    for g, r in zip(g_z, r_z):
        torch.testing.assert_close(g, r, **tol)
    live = w.detach() > 0
    torch.testing.assert_close(g_w[live], r_w[live], **tol)
    # A zero weight: autograd through log(omega) gives NaN; the closed form gives -0.6 mean p_k(y) / P(y).
    p_y = torch.stack([z.detach().softmax(-1).gather(-1, labels.view(-1, 1)).squeeze(-1) for z in zs])
    expected = -0.6 * (p_y / (w.detach().view(-1, 1) * p_y).sum(0)).mean(1)
    torch.testing.assert_close(g_w, expected, **tol)
