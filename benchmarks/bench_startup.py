"""Time `dwml train` spends outside its training steps for a short run (issue 10: <= 5 s), in one run.

Runs the real console command (`python -m dwml.cli train`, a fresh process, as a user would) for a short tiny-preset
MLM run, and `import dwml.cli, dwml.training.train` + transformers' RoBERTa alone in another fresh process. Prints each one's
wall and CPU time (on a shared machine the CPU time is the reliable number: wall time there mostly measures the other
users) and the run's own phase timings (final/summary.json `timings_s`, wall): set-up (config, data, model build,
optimizers, resume), validation (initial + final; periodic ones are off), steps, checkpoint. What the run spends
outside its steps is its total minus `steps`.

    python benchmarks/bench_startup.py [--steps 5] [--prepared DIR] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dwml.data.prepare import default_corpus_path, prepare

SRC = Path(__file__).resolve().parents[1] / "src"


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of a child process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return time.perf_counter() - t0, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prepared", help="prepared data dir (default: prepare 5k docs of ../shared/data/corpus)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    prepared = Path(args.prepared) if args.prepared else tmp / "data"
    if not args.prepared:
        prepare([default_corpus_path()], prepared, vocab_size=8192, max_docs=5000)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    imports = timed([sys.executable, "-c",
                     "import dwml.cli, dwml.training.train; from transformers import RobertaForMaskedLM"], env)
    out = tmp / "run"
    total = timed([sys.executable, "-m", "dwml.cli", "train", "--method", "mlm", "--data", str(prepared),
                   "--out", str(out), "--max-steps", str(args.steps), "--set", "train.progress=false",
                   "--set", f"train.device={args.device}", "--set", f"train.eval_every={10**6}",
                   "--set", f"train.save_every={10**6}"], env)
    t = json.loads((out / "final" / "summary.json").read_text())["timings_s"]
    print(f"`dwml train` tiny preset, {args.steps} steps, device {args.device}, {os.cpu_count()} CPUs")
    print(f"  whole run             {total[0]:7.2f} s wall {total[1]:7.2f} s CPU")
    print(f"  imports alone         {imports[0]:7.2f} s wall {imports[1]:7.2f} s CPU")
    for name in ("setup", "initial_validation", "steps", "checkpoint", "final_validation"):
        print(f"  {name:<22}{t.get(name, 0.0):7.2f} s wall (the run's own timing)")
    print(f"outside training steps: {total[0] - t['steps']:.2f} s wall; the whole run took {total[1]:.2f} s CPU "
          f"(target <= 5 s on the GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
