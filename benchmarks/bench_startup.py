"""Time `dwml train` spends outside its training steps for a short run (issue 10: <= 5 s), in one run.

Runs the real console command (`python -m dwml.cli train`, a fresh process, as a user would) for a short tiny-preset
MLM run and splits its wall time with the run's own phase timings (final/summary.json `timings_s`):
  imports    `import dwml.cli, dwml.train` and transformers' RoBERTa in a separate fresh process
  set-up     config, data, model build, optimizers (+ resume)
  validation initial + final (periodic ones are off)
  steps      the training steps themselves
  export     the rest: interpreter start, the Hugging Face export, process exit

    python benchmarks/bench_startup.py [--steps 60] [--prepared DIR] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dwml.prepare import default_corpus_path, prepare

SRC = Path(__file__).resolve().parents[1] / "src"


def wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prepared", help="prepared data dir (default: prepare 5k docs of ../shared/data/corpus)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    prepared = Path(args.prepared) if args.prepared else tmp / "data"
    if not args.prepared:
        prepare([default_corpus_path()], prepared, vocab_size=8192, max_docs=5000)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    imports = wall([sys.executable, "-c", "import dwml.cli, dwml.train; from transformers import RobertaForMaskedLM"],
                   env)
    out = tmp / "run"
    total = wall([sys.executable, "-m", "dwml.cli", "train", "--method", "mlm", "--data", str(prepared),
                  "--out", str(out), "--max-steps", str(args.steps), "--set", "train.progress=false",
                  "--set", f"train.device={args.device}", "--set", f"train.eval_every={10**6}",
                  "--set", f"train.save_every={10**6}"], env)
    t = json.loads((out / "final" / "summary.json").read_text())["timings_s"]
    validation = t.get("initial_validation", 0) + t.get("final_validation", 0) + t.get("validation", 0)
    parts = {"imports": imports, "set-up": t["setup"], "validation": validation, "steps": t["steps"],
             "checkpoint": t.get("checkpoint", 0)}
    parts["export + interpreter"] = total - sum(parts.values())
    print(f"`dwml train` tiny preset, {args.steps} steps, device {args.device}: {total:.2f} s wall")
    for name, sec in parts.items():
        print(f"  {name:<22}{sec:7.2f} s")
    outside = total - t["steps"]
    print(f"outside training steps: {outside:.2f} s (target <= 5 s on the GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
