"""Output safety (issue 12, items 1, 2, 5, 6 and part of 10): dwml never deletes what it did not write, one trainer
per run directory, --no-resume never lets a later resume mix two runs, resume refuses a changed config, checkpoints
carry a checksum, file modes follow the umask, and the temp dirs of a killed prepare are cleaned."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dwml.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dwml.cli import main
from dwml.config import merge
from dwml.errors import DwmlError
from dwml.io import MARKER, atomic_dir, write_text
from dwml.data.prepare import prepare
from dwml.training.rundir import LOCK_NAME, RunLock, check_run_placement
from dwml.training.train import Interrupted, train

from runfixtures import synthetic_corpus
from runfixtures import make_cfg

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _child(code: str) -> subprocess.Popen:
    """A python child with this tree's dwml first on the path; prints 'ready' once it holds what it should."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, env=env, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _kill(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


# ---------------------------------------------------------------------------------------------- item 1: outputs


def test_prepare_refuses_what_it_did_not_write(tmp_path, capsys, monkeypatch):
    corpus = synthetic_corpus(tmp_path / "corpus", n_lines=100)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"\xff\xd8")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    cases = [
        (unrelated, "not a previous `dwml prepare` output"),
        (corpus, "would replace the input"),               # prepare C --out C
        (tmp_path, "would replace the input"),             # a folder holding the corpus
        (corpus / "prepared", "inside the input"),          # out inside the corpus
        (a_file, "not a directory"),                        # a regular file never becomes a directory
        (Path("."), "is the current directory"),            # --out . (here an empty directory)
    ]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for out, why in cases:
        assert main(["prepare", str(corpus), "--out", str(out), "--vocab-size", "300"]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("dwml: error:") and why in err and err.count("\n") == 1, err
    assert (unrelated / "holiday.jpg").read_bytes() == b"\xff\xd8" and a_file.read_text() == "keep me"
    assert sorted(p.name for p in corpus.iterdir()) == ["stories.train", "switchboard.train"]
    # Its own previous output is replaced; --overwrite replaces a foreign directory (but never an input).
    out = tmp_path / "data"
    prepare([corpus], out, vocab_size=300)
    assert json.loads((out / MARKER).read_text())["command"] == "prepare"
    prepare([corpus], out, vocab_size=300, seed=1)
    assert main(["prepare", str(corpus), "--out", str(unrelated), "--vocab-size", "300", "--overwrite"]) == 0
    assert (unrelated / "meta.json").is_file() and not (unrelated / "holiday.jpg").exists()
    assert main(["prepare", str(corpus), "--out", str(corpus), "--vocab-size", "300", "--overwrite"]) == 2
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a run directory is never replaced, even with --overwrite
    assert main(["prepare", str(corpus), "--out", str(run), "--vocab-size", "300", "--overwrite"]) == 2
    assert "is a run directory" in capsys.readouterr().err and (run / "checkpoints").is_dir()


@pytest.fixture(scope="module")
def finished_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    train(make_cfg(tiny_prepared, out, train={"max_steps": 2, "save_every": 2, "eval_every": 2}))
    return out


def test_export_refuses_the_run_and_foreign_folders(finished_run, tmp_path, capsys):
    run = finished_run
    before = sorted(p.name for p in run.iterdir())
    cases = [
        (run, "would replace the input"),                  # export RUN --out RUN
        (run.parent, "would replace the input"),           # a folder holding the run
        (run / "final", "inside the run directory"),       # inside the run, outside RUN/export/
        (tmp_path, "not a previous `dwml export` output"),  # an unrelated non-empty folder
    ]
    assert main(["export", str(run), "--out", str(run), "--overwrite"]) == 2
    capsys.readouterr()
    (tmp_path / "mine.txt").write_text("x")
    for out, why in cases:
        assert main(["export", str(run), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    assert sorted(p.name for p in run.iterdir()) == before and (tmp_path / "mine.txt").exists()
    assert main(["export", str(run)]) == 0  # the default RUN/export/peer0, twice (its own output)
    assert main(["export", str(run)]) == 0
    assert (run / "export" / "peer0" / "config.json").is_file()


def test_eval_search_out_and_experiment_dir_are_checked_before_the_work(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-model"), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not json")
    assert main(["search", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is not a previous `dwml search` result" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "not json"
    # An experiment never scatters its files into an unrelated directory.
    exp = tmp_path / "exp.toml"
    exp.write_text(f'name = "t"\nout_dir = "{tmp_path}"\n[prepare]\n[[runs]]\nname = "mlm"\nmethod = "mlm"\n')
    assert main(["experiment", str(exp)]) == 2
    assert "is not a `dwml experiment` directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.toml", "notes.txt"]


def test_train_refuses_a_foreign_directory_and_one_inside_the_data(tiny_prepared, tmp_path, capsys):
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "config.toml").write_text("mine = 1\n")
    for out, why in ((foreign, "is not a dwml run directory"), (tiny_prepared / "run", "inside the prepared data")):
        assert main(["train", "--data", str(tiny_prepared), "--out", str(out), "--max-steps", "2",
                     "--set", "data.seq_len=32"]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    assert sorted(p.name for p in foreign.iterdir()) == ["config.toml"] and not (tiny_prepared / "run").exists()


def test_run_placement_inside_other_outputs(tmp_path):
    """A run directory inside another run or a `dwml prepare` output is refused (one walk, `io.enclosing_output`,
    shared with check_output_dir); inside an experiment directory, which holds runs, it is fine."""
    data = tmp_path / "data"
    data.mkdir()
    for kind, what in (("train", "the run directory"), ("prepare", "the `dwml prepare` output")):
        outer = tmp_path / kind
        outer.mkdir()
        (outer / MARKER).write_text(json.dumps({"command": kind}))
        with pytest.raises(DwmlError, match=re.escape(f"is inside {what} {outer}; choose a run directory")):
            check_run_placement(outer / "a" / "run", data)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / MARKER).write_text(json.dumps({"command": "experiment"}))
    check_run_placement(exp / "run", data)


# ------------------------------------------------------------------------------ item 2: --no-resume, rotation


def test_no_resume_moves_the_old_run_aside(tiny_prepared, tmp_path, capsys):
    run = tmp_path / "run"
    old = train(make_cfg(tiny_prepared, run, train={"max_steps": 8, "save_every": 4, "eval_every": 4}))
    assert old["steps"] == 8
    # A new, shorter run with --no-resume, killed after its first checkpoint (step 2 < the old run's 4 and 8) ...
    new_cfg = make_cfg(tiny_prepared, run, train={"max_steps": 4, "save_every": 2, "eval_every": 2})
    with pytest.raises(Interrupted):
        train(new_cfg, resume=False, stop_after=2)
    assert "moved the previous run's files" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt"]
    # ... then resumed: it continues the new run (the keep-2 rotation deleted this checkpoint before the fix, and
    # the resume loaded the old run's step 8 and exported the old model).
    resumed = train(new_cfg)
    assert resumed["steps"] == 4
    (previous,) = run.glob("previous-*")
    assert [p.name for p in list_checkpoints(previous)] == ["step_00000004.pt", "step_00000008.pt"]
    assert json.loads((previous / "final" / "summary.json").read_text())["steps"] == 8
    run_id = json.loads((run / MARKER).read_text())["run_id"]
    assert load_checkpoint(list_checkpoints(run)[-1])["run_id"] == run_id


def _state(step, **extra):
    return {"step": step, "students": [], "optimizers": [], "schedulers": [], "rng": {}, "config": "", **extra}


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    for s in (10, 20):  # a newer-step checkpoint of something else in the folder
        save_checkpoint(tmp_path, s, _state(s))
    save_checkpoint(tmp_path, 3, _state(3))
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [3, 10, 20]
    save_checkpoint(tmp_path, 30, _state(30))
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [20, 30]


# --------------------------------------------------------------------------------------- item 5: run lock


def test_second_trainer_of_a_run_dir_is_refused_and_a_stale_lock_taken_over(tiny_prepared, tmp_path, capsys):
    run = tmp_path / "run"
    holder = _child(f"""
        import time
        from dwml.training.rundir import RunLock
        with RunLock({str(run)!r}):
            print("ready", flush=True)
            time.sleep(120)
    """)
    try:
        assert main(["train", "--data", str(tiny_prepared), "--out", str(run), "--max-steps", "2"]) == 2
        err = capsys.readouterr().err
        assert f"is being trained by pid {holder.pid}" in err and err.count("\n") == 1, err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written by the refused trainer
    finally:
        _kill(holder)
    assert (run / LOCK_NAME).is_file()  # kill -9 leaves the file, but the kernel dropped the lock
    with RunLock(run):
        assert f"taking over the stale lock of pid {holder.pid}" in capsys.readouterr().err
    assert list(run.iterdir()) == []  # the lock file is removed on exit


# --------------------------------------------------------------------------- item 6: resume with another config


def test_resume_refuses_a_changed_config(tiny_prepared, tmp_path, capsys):
    run = tmp_path / "run"
    base = {"train": {"max_steps": 4, "save_every": 2, "eval_every": 2}, "model": {"layers": 2}}
    with pytest.raises(Interrupted):
        train(make_cfg(tiny_prepared, run, **base), stop_after=2)
    changed = [({"train": {"lr": 1e-2}}, "train.lr: 0.003 -> 0.01"),
               ({"model": {"hidden": 64}}, "model.hidden: 32 -> 64"),
               ({"train": {"method": "sd"}}, "train.method: 'mlm' -> 'sd'")]
    for extra, listed in changed:
        with pytest.raises(DwmlError, match="config changed") as e:
            train(make_cfg(tiny_prepared, run, **merge(base, extra)))
        assert listed in str(e.value)
    assert "lr = 0.003" in (run / "config.toml").read_text()  # config.toml still shows what was used
    # Through the CLI: one line, exit 2.
    assert main(["train", str(run / "config.toml"), "--set", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dwml: error:") and "train.lr: 0.003 -> 0.5" in err and err.count("\n") == 1, err
    # max_steps and the cadence may change; config.toml then shows the new values.
    summary = train(make_cfg(tiny_prepared, run, **merge(base, {"train": {"max_steps": 6, "save_every": 3,
                                                                          "eval_every": 3}})))
    assert summary["steps"] == 6 and "max_steps = 6" in (run / "config.toml").read_text()


def test_resume_refuses_a_peers_file_rewritten_with_another_architecture(tiny_prepared, tmp_path):
    peers = tmp_path / "peers.json"
    arch = {"layers": 1, "heads": 2, "hidden": 32, "intermediate": 64}
    peers.write_text(json.dumps({"peers": [{"arch": arch}, {"arch": arch}]}))
    cfg = make_cfg(tiny_prepared, tmp_path / "run", model={"peers_file": str(peers)},
                   train={"max_steps": 4, "save_every": 2, "eval_every": 2})
    with pytest.raises(Interrupted):
        train(cfg, stop_after=2)
    peers.write_text(json.dumps({"peers": [{"arch": arch}, {"arch": {**arch, "hidden": 16, "intermediate": 32}}]}))
    with pytest.raises(DwmlError, match="student 1 in the checkpoint has another architecture"):
        train(cfg)


# --------------------------------------------------------------------- item 10: checksum, umask, stale temps


def test_a_bit_flip_in_a_checkpoint_is_detected(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32)
    path = save_checkpoint(tmp_path, 1, _state(1, students=[{"w": weights}]))
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weights.numpy().tobytes()) + 2000
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    flipped = torch.load(path, weights_only=False)  # torch itself loads it without complaint ...
    assert not torch.equal(flipped["students"][0]["w"], weights)
    with pytest.raises(DwmlError, match="checksum mismatch") as e:  # ... dwml does not
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    torch.save(_state(1), path)  # no checksum at all (an older dwml's checkpoint)
    with pytest.raises(DwmlError, match="without a checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d", command="test") as d:
            write_text(d / "b.txt", "y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "d" / "b.txt").stat().st_mode & 0o777 == file_mode


def test_temp_dir_of_a_killed_prepare_is_cleaned(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus", n_lines=100)
    out = tmp_path / "data"
    writer = _child(f"""
        import time
        from dwml.io import atomic_dir
        with atomic_dir({str(out)!r}, command="prepare") as tmp:
            (tmp / "train.bin").write_bytes(bytes(1000))
            print("ready", flush=True)
            time.sleep(120)
    """)
    _kill(writer)
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".data.")]
    assert f".{writer.pid}." in left.name and (left / "train.bin").is_file()
    prepare([corpus], out, vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]


def test_half_written_checkpoint_of_a_killed_run_is_cleaned(tmp_path):
    writer = _child(f"""
        import time
        from dwml.io import atomic_path
        with atomic_path({str(tmp_path / "checkpoints" / "step_00000002.pt")!r}) as tmp:
            tmp.write_bytes(bytes(1000))
            print("ready", flush=True)
            time.sleep(120)
    """)
    _kill(writer)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1
    save_checkpoint(tmp_path, 4, _state(4))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004.pt"]


def _fake_outputs(root):
    """A run directory, a prepared directory, a model folder and a user's own JSON, as `--out` targets."""
    run = root / "run"
    (run / "final").mkdir(parents=True)
    (run / ".dwml-output.json").write_text(json.dumps({"command": "train"}))
    (run / "final" / "summary.json").write_text(json.dumps({"method": "mlm", "peers": []}))
    data = root / "data"
    (data / "tokenizer").mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"vocab_size": 10}))
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text(json.dumps({"model": {}}))
    notes = root / "notes.json"
    notes.write_text(json.dumps({"mine": 1}))
    return run / "final" / "summary.json", data / "meta.json", model / "tokenizer.json", notes


@pytest.mark.parametrize("command", ["eval", "finetune", "search"])
def test_out_never_replaces_a_file_that_a_run_data_or_model_needs(tmp_path, capsys, command):
    """--out naming a run's summary, a prepared directory's meta.json or a model's tokenizer.json is refused with
    or without --overwrite; a user's JSON object only without it; each file is left byte-identical."""
    summary, meta, tokenizer, notes = _fake_outputs(tmp_path)
    before = {p: p.read_bytes() for p in (summary, meta, tokenizer, notes)}
    args = {"eval": ["eval", str(tmp_path / "no-model")], "finetune": ["finetune", str(tmp_path / "no-model")],
            "search": ["search", "--reference", "tiny", "--peers", "1"]}[command]
    for target, why in [(summary, "is a file of the run directory"), (meta, "is a file of the prepared data"),
                        (tokenizer, "is a file of the model folder")]:
        for extra in ([], ["--overwrite"]):
            assert main([*args, "--out", str(target), *extra]) == 2
            err = capsys.readouterr().err
            assert why in err and err.count("\n") == 1, err
    assert main([*args, "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"not a previous `dwml {command}` result" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in before} == before


def test_out_refuses_a_symlink_and_accepts_its_own_previous_result(tmp_path):
    from dwml.errors import DwmlError
    from dwml.io import check_output_file, result_document, write_json

    mine = tmp_path / "eval.json"
    write_json(mine, result_document("eval", {"models": {}}))
    check_output_file(mine, "eval")  # a previous `dwml eval` result: replaced
    with pytest.raises(DwmlError, match="not a previous `dwml finetune` result"):
        check_output_file(mine, "finetune")  # another command's result is not replaced without --overwrite
    check_output_file(mine, "finetune", overwrite=True)
    link = tmp_path / "link.json"
    link.symlink_to(mine)
    with pytest.raises(DwmlError, match="symbolic link"):
        check_output_file(link, "eval", overwrite=True)
    inside = tmp_path / "run"
    (inside / "final").mkdir(parents=True)
    (inside / ".dwml-output.json").write_text(json.dumps({"command": "train"}))
    write_json(inside / "final" / "eval.json", result_document("eval", {}))
    check_output_file(inside / "final" / "eval.json", "eval")  # its own earlier result inside a run: replaced
    check_output_file(inside / "new.json", "eval")  # a new file inside a run: written
    assert json.loads(mine.read_text())["dwml_result"] == "eval"


def _model_folder(root: Path) -> Path:
    from evalfixtures import make_model, make_tokenizer

    tok = make_tokenizer()
    folder = root / "model"
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fresh_process", [False, True])
def test_eval_and_export_print_no_transformers_bars_or_load_reports(tmp_path, capfd, fresh_process):
    """transformers' "Loading weights" bars and LOAD REPORTs are silenced inside dwml's commands - in a fresh
    process (the environment) and where transformers is already imported (its logging API); a config.json whose
    vocabulary disagrees with the weights gives exactly one `dwml: error:` line."""
    folder = _model_folder(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 7}))
    good_args = ["eval", str(folder), "--tasks", "blimp_fast", "--limit", "1", "--no-groups"]
    bad_args = ["eval", str(bad), "--tasks", "blimp_fast", "--limit", "1"]
    if fresh_process:
        env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        run = [subprocess.run([sys.executable, "-m", "dwml.cli", *a], capture_output=True, text=True, env=env)
               for a in (good_args, bad_args)]
        (rc_good, err_good), (rc_bad, err_bad) = [(r.returncode, r.stderr) for r in run]
    else:
        rc_good = main(good_args)
        err_good = capfd.readouterr().err
        rc_bad = main(bad_args)
        err_bad = capfd.readouterr().err
    assert rc_good == 0 and "Loading weights" not in err_good and "LOAD REPORT" not in err_good, err_good
    assert rc_bad == 2 and err_bad.count("\n") == 1 and err_bad.startswith("dwml: error:"), err_bad
    assert "weight's shape differs from config.json" in err_bad


def test_every_eval_argument_is_checked_before_a_model_is_loaded(tmp_path, capfd, monkeypatch):
    import dwml.evaluation.evaluate as evaluate

    folder = _model_folder(tmp_path)
    monkeypatch.setattr(evaluate, "load_masked_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    for extra, why in [(["--token-budget", "0"], "--token-budget"), (["--limit", "0"], "--limit"),
                       (["--tasks", "nope"], "nope"), (["--device", "tpu"], "device")]:
        assert main(["eval", str(folder), *extra]) == 2
        err = capfd.readouterr().err
        assert why in err and err.count("\n") == 1 and not err.startswith("peer0"), err
