import pytest
import torch

from dwml.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dwml.errors import DwmlError
from dwml.io import atomic_dir, atomic_path


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_replaces_whole_or_nothing(tmp_path):
    target = tmp_path / "final"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as d:
            (d / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def _state(step):
    return {"step": step, "students": [], "optimizers": [], "schedulers": [], "rng": {}, "config": ""}


def test_checkpoints_keep_newest_and_detect_corruption(tmp_path):
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, _state(s), keep=2)
    ckpts = list_checkpoints(tmp_path)
    assert [load_checkpoint(p)["step"] for p in ckpts] == [2, 3]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(DwmlError, match="corrupt or unreadable checkpoint"):
        load_checkpoint(ckpts[-1])
    torch.save({"something": 1}, ckpts[0])
    with pytest.raises(DwmlError, match="not a dwml checkpoint"):
        load_checkpoint(ckpts[0])
