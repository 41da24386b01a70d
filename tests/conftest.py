"""Shared fixtures. `tiny_prepared` is reused by other test files: keep its name and its speed (< 10 s)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# The test machine is shared: keep tokenizers' Rust thread pool (read at first use) on one core too.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# (file under shared/data/corpus, lines to keep): one of each format and cleaning rule.
TINY_SLICE = (
    ("babylm_2024_train_10M_partial/switchboard.train", 3000),  # "A:\t" speaker lines
    ("babylm_2023_test_partial/aochildes.test", 3000),  # tokenised CHILDES utterances
    ("babylm_2023_test_partial/cbt.test", 1500),  # tokenised book text with ` ... ' quotes
    ("babylm_2023_test_partial/children_stories.test", 500),  # long natural-text paragraphs
    ("childes_wiki_padovani_valid/wikipedia_en_validation.csv", 1500),  # CSV `text` column
)
TINY_VOCAB = 1000


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data (the repo's ../shared/data); skips the test when it is not there."""
    if not (SHARED_DATA / "corpus").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_corpus(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the first lines (CSV: rows) of a few real corpus files."""
    out = tmp_path_factory.mktemp("tiny_corpus")
    for rel, n in TINY_SLICE:
        src = shared_data / "corpus" / rel
        dst = out / src.name
        with open(src, encoding="utf-8", newline="") as f:
            if src.suffix == ".csv":
                rows = [row for _, row in zip(range(n + 1), csv.reader(f))]
                with open(dst, "w", encoding="utf-8", newline="") as g:
                    csv.writer(g).writerows(rows)
            else:
                dst.write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dwml.data.prepare.prepare` on the tiny real-data slice (vocab 1000, seed 0): the prepared directory."""
    from dwml.data.prepare import prepare

    out = tmp_path_factory.mktemp("tiny_prepared") / "prepared"
    prepare([tiny_corpus], out, vocab_size=TINY_VOCAB, valid_fraction=0.02, seed=0)
    return out
