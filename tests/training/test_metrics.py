"""metrics.jsonl and its TensorBoard mirror (`train.tensorboard = true`): the event files, read back with
TensorBoard's own EventAccumulator, hold exactly metrics.jsonl's numbers, also across a kill + resume."""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict

import pytest

from dwml.training.checkpoint import list_checkpoints
from dwml.cli import main
from dwml.training.metrics import scalars
from dwml.training.train import Interrupted, train
from runfixtures import PEERS, make_cfg


def test_scalars_of_a_record():
    record = {"step": 20, "lr": 1e-3, "tokens_per_s": 5000.0, "train_ce": [6.5, 6.7], "grad_norm": None,
              "omega": [0.4, 0.6], "outer_step": 1, "valid_ensemble_loss": 6.1, "note": "text", "flag": True}
    assert scalars(record) == {
        "lr": 1e-3, "tokens_per_s": 5000.0, "train_ce/peer0": 6.5, "train_ce/peer1": 6.7,
        "omega/peer0": 0.4, "omega/peer1": 0.6, "outer_step": 1.0, "valid_ensemble_loss": 6.1,
    }


def _expected(metrics_path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from metrics.jsonl: the first value of a tag at each step, in step order."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            out[tag].setdefault(record["step"], value)
    return {tag: sorted(points.items()) for tag, points in out.items()}


def _read_back(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same(got, expected):
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got[tag], points):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30), (tag, a, b)  # TensorBoard stores float32


def test_tensorboard_scalars_match_metrics_jsonl_across_resume(tiny_prepared, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    cfg = make_cfg(tiny_prepared, run, train={"method": "dwml", "tensorboard": True, "save_every": 3},
                   model={"peers": PEERS})
    with pytest.raises(Interrupted):
        train(cfg, stop_after=9)
    # A kill after step 9 was logged but before its checkpoint landed: the run resumes from step 6, and the points
    # of steps 7-9 logged by the killed segment must disappear from TensorBoard as they do from metrics.jsonl.
    list_checkpoints(run)[-1].unlink()
    train(cfg)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the resumed run appended a file
    expected = _expected(run / "metrics.jsonl")
    for tag in ("train_ce/peer0", "train_ce/peer1", "valid_loss/peer0", "valid_loss/peer1", "valid_ensemble_loss",
                "omega/peer0", "omega/peer1", "lr", "tokens_per_s", "hypergrad/peer0"):
        assert tag in expected, tag
    assert [s for s, _ in expected["lr"]] == [3, 6, 9, 12]
    assert [s for s, _ in expected["valid_loss/peer0"]] == [0, 6, 12]
    _same(_read_back(run / "tensorboard"), expected)


def test_no_tensorboard_folder_by_default(tiny_prepared, tmp_path):
    train(make_cfg(tiny_prepared, tmp_path / "run", train={"max_steps": 3, "save_every": 3, "eval_every": 3}))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_missing_tensorboard_is_a_one_line_error(tiny_prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the package were not installed
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_prepared), "--out", str(run), "--set", "train.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dwml: error: train.tensorboard:") and "pip install" in err and "\n" not in err
    assert not run.exists()
