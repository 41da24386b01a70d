"""The closed-form losses against autograd over the same formulas, in one run (value + every derivative a step takes).

Shapes of the DWML overhead benchmark: M = 3 peers, N masked positions (a 32 x 128 batch at 15%), vocabulary 8192,
fp32, one thread, process CPU time, the best of `--repeats` timings of `--iters` calls each:
  cross-entropy, M peers:      F.cross_entropy + backward       vs `mlm_loss` (fused on the CPU)
  DWML inner loss (eq. 2):     `dwml_loss` (autograd) + backward vs `dwml_inner_loss`
  outer-step coefficients h:   `dwml_coefficients` value, create_graph gradient and its derivative in omega (what the
                               double_backward hypergradient takes) vs `dwml_coefficients_outer`, on N / 2 rows
  outer-step L2 (ensemble CE): autograd through `ensemble_logprobs` + backward vs `ensemble_loss`, on N / 2 rows

    python benchmarks/bench_losses.py [--rows 614] [--vocab-size 8192] [--peers 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from dwml.distill.losses import (dwml_coefficients, dwml_coefficients_outer, dwml_inner_loss, dwml_loss, ensemble_logprobs,
                         ensemble_loss, mlm_loss)


def best_ms(fn, iters: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(iters):
            fn()
        best = min(best, (time.process_time() - t0) / iters)
    return best * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=614, help="masked positions N (default: 32 x 128 at 15%%)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m, n, v = args.peers, args.rows, args.vocab_size
    zs = [torch.randn(n, v, requires_grad=True) for _ in range(m)]
    half = [z.detach()[: n // 2].clone().requires_grad_(True) for z in zs]
    labels = torch.randint(0, v, (n,))
    omega = torch.full((m,), 1.0 / m)

    def backward(loss, leaves):
        torch.autograd.grad(loss, leaves)

    def ce_ref():
        backward(sum(F.cross_entropy(z, labels) for z in zs), zs)

    def ce_fast():
        backward(sum(mlm_loss(z, labels) for z in zs), zs)

    def inner_ref():
        backward(dwml_loss(zs, labels, omega, 0.5, detach_targets=True)[0], zs)

    def inner_fast():
        backward(dwml_inner_loss(zs, labels, omega, 0.5)[0], zs)

    def outer_coefficients(h_fn):
        def run():
            w = omega.clone().requires_grad_(True)
            grads = torch.autograd.grad((w * h_fn(half)).sum(), half, create_graph=True)
            torch.autograd.grad(grads, w, grad_outputs=[torch.ones_like(g) for g in grads])
        return run

    def l2_ref():
        w = omega.clone().requires_grad_(True)
        backward(F.nll_loss(ensemble_logprobs(half, w), labels[: n // 2]), [w, *half])

    def l2_fast():
        w = omega.clone().requires_grad_(True)
        backward(ensemble_loss(half, labels[: n // 2], w), [w, *half])

    cases = [
        ("cross-entropy x M (F.cross_entropy vs mlm_loss)", ce_ref, ce_fast),
        ("DWML inner loss (dwml_loss vs dwml_inner_loss)", inner_ref, inner_fast),
        ("outer h + gradient + d/domega (autograd vs closed form)",
         outer_coefficients(lambda z: dwml_coefficients(z, labels[: n // 2], 0.5)[0]),
         outer_coefficients(lambda z: dwml_coefficients_outer(z, labels[: n // 2], 0.5))),
        ("outer L2 ensemble CE (autograd vs closed form)", l2_ref, l2_fast),
    ]
    print(f"M = {m} peers, N = {n} rows, V = {v}, fp32, {torch.get_num_threads()} threads, CPU ms per call "
          f"(best of {args.repeats} x {args.iters})")
    for name, ref, fast in cases:
        a, b = best_ms(ref, args.iters, args.repeats), best_ms(fast, args.iters, args.repeats)
        print(f"{name:<58} {a:8.1f} -> {b:7.1f} ms  ({a / b:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
