"""Builders shared by several test files: a tiny training config, a synthetic corpus, a synthetic GLUE-style task."""
from __future__ import annotations

import json
import random
from pathlib import Path

from dwml.config import RunConfig, from_dict, merge
from dwml.evaluation.glue import FinetuneConfig

WORDS = "the a cat bird fish sat ran on in mat park tree big small red blue saw near under over".split()

PEERS = [{"layers": 1, "heads": 2, "hidden": 32, "intermediate": 64},
         {"layers": 2, "heads": 2, "hidden": 24, "intermediate": 48}]


def make_cfg(prepared, out, **sections) -> RunConfig:
    base = {
        "out_dir": str(out),
        "data": {"prepared": str(prepared), "seq_len": 32, "heldout_sequences": 16},
        "model": {"preset": "tiny", "layers": 1, "hidden": 32, "heads": 2, "intermediate": 64},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
                  "eval_batches": 2, "save_every": 6, "log_every": 3, "progress": False, "seed": 3},
        "distill": {"outer_every": 3},
    }
    return from_dict(RunConfig, merge(base, sections), "test").validate()


def synthetic_corpus(root, n_lines: int = 400, seed: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = "The cat dog bird sat ran flew on under a the mat tree house quickly slowly".split()
    for name in ("stories.train", "switchboard.train"):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 10))) + "." for _ in range(n_lines)]
        prefix = "A:\t" if name.startswith("switchboard") else ""
        (root / name).write_text("".join(prefix + line + "\n" for line in lines), encoding="utf-8")
    return root


def sentences(n: int, seed: int, p_dog: float = 0.35) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        label = int(rng.random() < p_dog)
        if label:
            words.insert(rng.randint(0, len(words)), "dog")
        rows.append({"sentence": " ".join(words), "label": label, "idx": len(rows)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def quick_finetune_cfg(data_dir: Path, **kw) -> FinetuneConfig:
    base = dict(tasks=["sst2"], data_dir=str(data_dir), epochs=8, lr=2e-3, batch_size=16, warmup_ratio=0.1,
                seed=0, device="cpu", progress=False)
    base.update(kw)
    return FinetuneConfig(**base)
