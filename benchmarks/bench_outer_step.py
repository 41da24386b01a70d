"""Cost of one DWML outer step per unroll (`distill.unroll`), in units of one inner step, measured in one run.

Peers below the tiny preset (2 layers, hidden 64/48/32 by default) with their AdamW optimizers after a few real
steps; one masked batch of random tokens (the cost does not depend on the text). Arms, alternated `--repeats` times
with the fastest time of each kept (the machine may be shared):
  inner:  one training step of the peers (eq. 2 forward + backward, clip, AdamW step);
  sgd / adamw / direct: `hypergradient(..., unroll=...)` with the trainer's settings (per_peer mode, clip 1.0), on a
          held-out batch of half the train batch and L1 on as many train sequences, as the trainer does.

    python benchmarks/bench_outer_step.py [--batch-size 32] [--seq-len 128] [--threads 2] [--mode per_peer]
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from dwml.distill.hypergrad import MODES, hypergradient
from dwml.distill.losses import dwml_inner_loss
from dwml.data.masking import MaskedBatch
from dwml.models.model import Arch, build_model, masked_logits
from dwml.training.setup import make_optimizer


def random_batch(gen: torch.Generator, rows: int, seq_len: int, vocab: int, mask_prob: float = 0.15) -> MaskedBatch:
    ids = torch.randint(5, vocab, (rows, seq_len), generator=gen)
    positions = torch.nonzero((torch.rand(rows * seq_len, generator=gen) < mask_prob)).flatten()
    labels = ids.view(-1)[positions].clone()
    ids.view(-1)[positions] = 4
    return MaskedBatch(ids, torch.ones_like(ids), positions, labels)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", default="64,48,32")
    ap.add_argument("--mode", default="per_peer", choices=MODES)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    archs = [Arch(layers=2, heads=max(1, h // 32), hidden=h, intermediate=4 * h, vocab_size=args.vocab,
                  max_positions=args.seq_len + 2) for h in map(int, args.hidden.split(","))]
    peers = [build_model(a, seed=i) for i, a in enumerate(archs)]
    hp = SimpleNamespace(weight_decay=0.01, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-6)
    opts = [make_optimizer(m, hp) for m in peers]
    omega = torch.full((len(peers),), 1.0 / len(peers), dtype=torch.float64)
    train = random_batch(gen, args.batch_size, args.seq_len, args.vocab)
    held = random_batch(gen, max(1, args.batch_size // 2), args.seq_len, args.vocab)
    inner = train.head(held.input_ids.shape[0])

    def inner_step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        logits = [masked_logits(m, train.input_ids, train.attention_mask, train.positions) for m in peers]
        loss, _ = dwml_inner_loss(logits, train.labels, omega.float(), 0.5)
        loss.backward()
        for m, o in zip(peers, opts):
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()

    def outer(unroll: str):
        return lambda: hypergradient(peers, inner, held, omega, alpha=0.5, gamma=1e-3 if unroll == "sgd" else None,
                                     unroll=unroll, optimizers=opts, grad_clip=1.0, mode=args.mode)

    for m in peers:
        m.train()
    for _ in range(3):  # optimizer state, warm caches
        inner_step()
    arms = {"inner": inner_step, "sgd": outer("sgd"), "adamw": outer("adamw"), "direct": outer("direct")}
    best = {name: float("inf") for name in arms}
    for r in range(args.repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"peers hidden {args.hidden}, batch {args.batch_size} x {args.seq_len} (outer: held-out and L1 batches of "
          f"{held.input_ids.shape[0]}), mode {args.mode}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"  inner step        {best['inner'] * 1000:8.1f} ms")
    for name in ("sgd", "adamw", "direct"):
        print(f"  outer step {name:<6} {best[name] * 1000:8.1f} ms = {best[name] / best['inner']:.2f} inner steps")
    print(f"adamw / sgd outer step: {best['adamw'] / best['sgd']:.2f}x; direct / adamw: "
          f"{best['direct'] / best['adamw']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
