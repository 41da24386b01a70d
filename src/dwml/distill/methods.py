"""One loss function per training method, all over the masked positions of one shared batch.

Every method sees the same inputs: the students' outputs (masked-position logits and, for self-distillation, the
auxiliary heads' logits), the labels, the current peer weights omega and, for kd / kd_dwml, the frozen teacher's
logits. Each returns the scalar to back-propagate and a dict of detached per-peer tensors for the log: they stay on
the device (no `.item()` per step, which would make the host wait for the GPU); the trainer reads them at log steps.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import DistillConfig
from .losses import dwml_inner_loss, dwml_loss, kd_dwml_loss, kd_loss, mlm_loss
from .selfdistill import sd_loss

Outputs = list[tuple[torch.Tensor, list[torch.Tensor]]]  # per student: (logits (N, V), aux logits)
LossFn = Callable[[Outputs, torch.Tensor, torch.Tensor, "torch.Tensor | None", DistillConfig], tuple]

# Methods that couple several students (and so learn or fix omega); the others train each student on its own.
PEER_METHODS = ("dml", "dwml", "kd_dwml")
TEACHER_METHODS = ("kd", "kd_dwml")


def _ce_each(outputs: Outputs, labels: torch.Tensor) -> list[torch.Tensor]:
    return [mlm_loss(logits, labels) for logits, _ in outputs]


def loss_mlm(outputs, labels, omega, teacher_logits, d):
    """Plain masked LM. Several students are trained independently: their losses add, gradients never mix."""
    ces = _ce_each(outputs, labels)
    ces = torch.stack(ces)
    return ces.sum(), {"ce": ces.detach()}


def loss_kd(outputs, labels, omega, teacher_logits, d):
    """Hinton et al. 2015: (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), per student."""
    losses = [kd_loss(logits, teacher_logits, labels, d.alpha, d.temperature) for logits, _ in outputs]
    return torch.stack(losses).sum(), {"ce": torch.stack(_ce_each(outputs, labels)).detach()}


def loss_sd(outputs, labels, omega, teacher_logits, d):
    """Zhang et al. 2019 ("Be your own teacher"): shallow auxiliary heads learn from labels and the deepest head."""
    (logits, aux), = outputs
    loss, parts = sd_loss(aux, logits, labels, d.alpha, d.temperature)
    return loss, {"ce": parts["final_ce"].detach().view(1), "aux_ce": parts["aux_ce"].detach()}


def _peer_loss(outputs, labels, omega, d):
    logits = [z for z, _ in outputs]
    if d.detach_targets:  # same value and gradients, O(M) instead of O(M^2) passes over the vocabulary
        total, parts = dwml_inner_loss(logits, labels, omega, d.alpha, d.temperature)
    else:
        total, parts = dwml_loss(logits, labels, omega, d.alpha, d.temperature, detach_targets=False)
    return total, {"ce": parts["ce"].detach()}


def loss_dml(outputs, labels, omega, teacher_logits, d):
    """Zhang et al. 2018: eq. (2) with every omega_i = 1/M (the trainer never updates omega for dml)."""
    return _peer_loss(outputs, labels, omega, d)


def loss_dwml(outputs, labels, omega, teacher_logits, d):
    """Eq. (2): (1 - alpha) sum_i omega_i CE_i + alpha sum_i sum_{j != i} omega_j KL(z_j || z_i); omega learned."""
    return _peer_loss(outputs, labels, omega, d)


def loss_kd_dwml(outputs, labels, omega, teacher_logits, d):
    """DWML plus the teacher's soft targets as an extra supervisor of every peer."""
    total, parts = kd_dwml_loss(
        [logits for logits, _ in outputs], teacher_logits, labels, omega,
        alpha=d.alpha, beta=d.teacher_weight, temperature=d.temperature, detach_targets=d.detach_targets,
    )
    return total, {"ce": parts["ce"].detach()}


METHOD_LOSSES: dict[str, LossFn] = {
    "mlm": loss_mlm,
    "kd": loss_kd,
    "sd": loss_sd,
    "dml": loss_dml,
    "dwml": loss_dwml,
    "kd_dwml": loss_kd_dwml,
}
