"""Cost of checkpoint checksums: save/load with dwml.training.checkpoint (SHA-256 over the content, verified on load) vs a
plain torch.save / torch.load of the same state, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py [--preset mini] [--peers 1] [--repeats 3]

State: `--peers` students of the preset (vocabulary 8192) with their AdamW states after one step, as a training
checkpoint holds them (~16 bytes per parameter). Prints the best of `--repeats` times and the ratios.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dwml.training.checkpoint import load_checkpoint, save_checkpoint, state_checksum
from dwml.models.model import build_model, get_preset


def make_state(preset: str, peers: int) -> dict:
    students, optimizers = [], []
    for i in range(peers):
        model = build_model(get_preset(preset).replace(vocab_size=8192, max_positions=130), seed=i)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(5, 8192, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        students.append(model.state_dict())
        optimizers.append(opt.state_dict())
    return {"step": 1, "students": students, "optimizers": optimizers, "schedulers": [], "config": "",
            "rng": {"torch": torch.get_rng_state()}}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--peers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    state = make_state(args.preset, args.peers)
    with tempfile.TemporaryDirectory() as d:
        plain = Path(d) / "plain.pt"
        t_save_plain = best(lambda: torch.save(state, plain), args.repeats)
        t_save = best(lambda: save_checkpoint(d, 1, state), args.repeats)
        path = save_checkpoint(d, 1, state)
        t_load_plain = best(lambda: torch.load(plain, map_location="cpu", weights_only=False), args.repeats)
        t_load = best(lambda: load_checkpoint(path), args.repeats)
        t_hash = best(lambda: state_checksum(state), args.repeats)
        size = path.stat().st_size
    print(f"state: {args.peers} x {args.preset} + AdamW, {size / 2**20:.1f} MiB; checksum alone {t_hash * 1e3:.0f} ms "
          f"({size / 2**20 / t_hash:.0f} MiB/s)")
    print(f"save: torch.save {t_save_plain * 1e3:.0f} ms, save_checkpoint {t_save * 1e3:.0f} ms: "
          f"{t_save / t_save_plain:.2f}x")
    print(f"load: torch.load {t_load_plain * 1e3:.0f} ms, load_checkpoint {t_load * 1e3:.0f} ms: "
          f"{t_load / t_load_plain:.2f}x")


if __name__ == "__main__":
    main()
