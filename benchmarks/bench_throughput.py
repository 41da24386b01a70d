"""Training and evaluation throughput against a measured matmul peak, in one run (issue 10's GPU benchmark).

Prints, on the device it finds (CUDA if present):
  1. the measured matmul peak: bf16 8192^3 on CUDA (fp32 1024^3 on CPU), the denominator of every MFU below;
  2. tokens/s, achieved model TFLOP/s (analytic `dwml.models.flops.step_flops` of every student's forward + backward: the
     useful work, so DWML's outer step counts as overhead, not as FLOPs) and MFU for
       - MLM on the 48.7M peer (L5 H768 I3072, vocab 16384, seq 128, batch 256),
       - the 4 peers (48.7M L5 H768; 33.8M L6 H576; 24.5M L7 H448; 19.7M L5 H448) trained independently,
       - DWML over the same peers with K = 10,
     and DWML's time per step over the independent peers';
  3. evaluation pairs/s of the 48.7M peer through `dwml.evaluation.evaluate.score_pairs` on BLiMP-filtered pairs.
Every arm is the trainer's own step (`dwml.training.train.Trainer.train_step` / `outer_step`) on random token ids, so the
run needs no corpus. `--tiny` (automatic on CPU) runs small shapes through the same code and prints the same ratios.

    python benchmarks/bench_throughput.py                    # GPU: full shapes, about 2-3 minutes
    python benchmarks/bench_throughput.py --tiny --threads 2 # CPU
    python benchmarks/bench_throughput.py --compile          # with train.compile=true
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_outer_modes import GPU_PEERS, peer_tables
from benchlib import make_trainer, matmul_peak, sync, synthetic_prepared, time_steps
from dwml.models.model import build_model

TINY_PEERS = [(2, 128), (2, 96), (2, 64), (1, 64)]


def eval_pairs_per_s(arch_table: dict, vocab: int, seq_len: int, device: torch.device, limit: int):
    """(pairs/s, pairs) of `score_pairs` on BLiMP-filtered (the first `limit` pairs of every paradigm file), with a
    tokenizer trained on those sentences; None when the BLiMP data is not on this machine."""
    from dwml.errors import DwmlError
    from dwml.evaluation.evaldata import load_task
    from dwml.evaluation.evaluate import score_pairs
    from dwml.models.model import Arch
    from dwml.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    try:
        pairs = load_task("blimp_filtered", limit=limit)
    except DwmlError as e:
        print(f"eval: skipped ({e})")
        return None
    raw = train_tokenizer([p.good for p in pairs] + [p.bad for p in pairs], vocab_size=min(vocab, 8192))
    tok = load_tokenizer(save_tokenizer(raw, Path(tempfile.mkdtemp(prefix="bench_tok_"))))
    model = build_model(Arch(vocab_size=vocab, max_positions=seq_len + 2, **arch_table), seed=0).to(device).eval()
    score_pairs(model, tok, pairs[:64], device=device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    score_pairs(model, tok, pairs, device=device)
    sync(device)
    return len(pairs) / (time.perf_counter() - t0), len(pairs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes (automatic without CUDA)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per arm (default 30 GPU, 10 tiny)")
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--eval-limit", type=int, default=0, help="BLiMP pairs per paradigm (default 300 GPU, 5 tiny)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    if tiny:
        peers, vocab, batch, seq_len = peer_tables(TINY_PEERS, 32), 8192, 32, 128
        steps, limit = args.steps or 10, args.eval_limit or 5
    else:
        peers, vocab, batch, seq_len = peer_tables(GPU_PEERS, 64), 16384, 256, 128
        steps, limit = args.steps or 30, args.eval_limit or 300
    start = time.perf_counter()
    if cuda:
        peak, peak_what = matmul_peak(device, 8192, torch.bfloat16), "bf16 matmul 8192^3"
    else:
        peak, peak_what = matmul_peak(device, 1024, torch.float32), f"fp32 matmul 1024^3, {args.threads} threads"
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; {'tiny' if tiny else 'full'} shapes, batch "
          f"{batch} x {seq_len}, vocab {vocab}, compile={args.compile}")
    print(f"measured peak ({peak_what}): {peak / 1e12:.4f} TFLOP/{'s' if cuda else 'CPU-s'}")
    prepared = synthetic_prepared(Path(tempfile.mkdtemp(prefix="bench_tp_")) / "data", vocab,
                                  train_tokens=(3 * steps + 40) * batch * seq_len)
    arms = [("mlm, peer 0", "mlm", peers[:1]), ("4 peers independent", "mlm", peers), ("dwml K=10", "dwml", peers)]
    timings = {}
    # On the CPU every rate is per second of the process's CPU time (the peak too): on a shared machine wall time
    # mostly measures the other users.
    per = "s" if cuda else "CPU-s"
    print(f"{'arm':<22}{'ms/step':>10}{'tokens/' + per:>16}{'TFLOP/' + per:>14}{'MFU':>8}")
    for name, method, arm_peers in arms:
        run = make_trainer(prepared, method, arm_peers, batch_size=batch, seq_len=seq_len,
                           train={"compile": args.compile}, distill={"outer_every": 10})
        try:
            t = time_steps(run, steps, warmup=10 if args.compile else 3)
        finally:
            run.close()
        seconds = t.seconds if cuda else t.cpu_seconds
        timings[name] = seconds
        print(f"{name:<22}{seconds * 1000:10.1f}{t.tokens / seconds:16,.0f}{t.flops / seconds / 1e12:14.4f}"
              f"{100 * t.flops / seconds / peak:7.1f}%", flush=True)
    ratio = timings["dwml K=10"] / timings["4 peers independent"]
    print(f"dwml / independent peers: {ratio:.3f}x time per step")
    ev = eval_pairs_per_s({k: peers[0][k] for k in ("layers", "heads", "hidden", "intermediate")}, vocab, seq_len,
                          device, limit)
    if ev is not None:
        print(f"eval (peer 0, pll, {ev[1]:,} BLiMP-filtered pairs): {ev[0]:,.0f} pairs/s")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
