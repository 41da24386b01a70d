"""configs/cpu-comparison-1h.toml end to end, shrunk to seconds with --set: every method trains, the report places
each model against MLM of its own shape and against KD with intervals, and the three figures are written."""
import json
from pathlib import Path

import pytest

from dwml.cli import main
from dwml.experiments.config import load_experiment
from dwml.experiments.plan import plan_runs

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cpu-comparison-1h.toml"


def shrink(out: Path, corpus: Path, ref: Path) -> list[str]:
    """--set overrides that turn the one-hour comparison into a smoke test on a slice of the real corpus."""
    sets = {
        "out_dir": str(out), "prepare.inputs": [str(corpus)], "prepare.vocab_size": 1000,
        "search.reference": str(ref), "search.init_points": 2, "search.n_iter": 2, "search.layers": [1, 2],
        "search.heads": [1, 2], "search.head_dim": [8, 32], "search.head_dim_step": 8, "base.data.seq_len": 64,
        "base.data.heldout_sequences": 16, "base.train.max_steps": 4, "base.train.batch_size": 8,
        "base.train.warmup_steps": 1, "base.train.eval_every": 2, "base.train.eval_batches": 3,
        "base.train.eval_batch_size": 8, "base.train.save_every": 4, "base.train.log_every": 2,
        "base.distill.outer_every": 2, "eval.tasks": ["blimp_fast", "supplement_fast", "ewok_fast"], "eval.limit": 1,
        "runs.teacher.train.max_steps": 6, "runs.teacher.train.eval_every": 3,
    }
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


def test_config_plans_every_baseline_on_the_searched_shapes(tmp_path):
    cfg = load_experiment(CONFIG)
    archs = [{"layers": 2, "heads": 2, "hidden": 32 * (4 - i), "intermediate": 64 * (4 - i), "family": "modernbert"}
             for i in range(2)]
    plans = {p.name: p for p in plan_runs(cfg, tmp_path, tmp_path / "data", archs)}
    assert {p.method for p in plans.values()} == {"mlm", "kd", "dml", "dwml", "kd_dwml"}
    for k, name in enumerate(["mlm", "mlm-peer2"]):  # MLM alone on each peer shape
        assert [a["hidden"] for a in plans[name].config.model.peers] == [archs[k]["hidden"]]
    assert [a["hidden"] for a in plans["kd"].config.model.peers] == [archs[0]["hidden"]]
    assert plans["kd"].teacher_run == plans["kd_dwml"].teacher_run == "teacher"
    assert not plans["teacher"].config.model.peers and plans["teacher"].config.model.preset == "tiny"
    budgets = {(p.config.train.max_steps, p.config.train.batch_size, p.config.data.seq_len)
               for p in plans.values() if p.name != "teacher"}
    assert len(budgets) == 1  # equal tokens per student
    teacher, student = plans["teacher"].config, plans["mlm"].config
    positions = lambda c: c.train.max_steps * c.train.batch_size * c.data.seq_len  # noqa: E731
    assert positions(teacher) > 5 * positions(student)  # the teacher trains longer, on the same sequence length
    assert teacher.data.seq_len == student.data.seq_len and teacher.train.eval_batches == student.train.eval_batches
    assert teacher.train.eval_batch_size == student.train.eval_batch_size  # the same validation set for every run
    assert cfg.eval.tasks == ["blimp_fast", "blimp_supplement", "ewok_fast"] and cfg.eval.limit == 0
    assert cfg.eval.peers == "best_loss" and not cfg.eval.ensemble


def test_peer_and_peers_are_exclusive(tmp_path):
    text = CONFIG.read_text().replace('name = "mlm-peer2"\nmethod = "mlm"\npeer = 2',
                                      'name = "mlm-peer2"\nmethod = "mlm"\npeer = 2\npeers = 1')
    (tmp_path / "bad.toml").write_text(text)
    assert main(["experiment", str(tmp_path / "bad.toml"), "--dry-run"]) == 2
    text = CONFIG.read_text().replace('name = "dml"\nmethod = "dml"', 'name = "dml"\nmethod = "dml"\npeer = 2')
    (tmp_path / "bad2.toml").write_text(text)
    assert main(["experiment", str(tmp_path / "bad2.toml"), "--dry-run"]) == 2


def test_cpu_comparison_end_to_end_shrunk(tiny_corpus, tmp_path, shared_data, capsys):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"layers": 2, "heads": 2, "hidden": 64, "intermediate": 171, "family": "modernbert"}))
    out = tmp_path / "exp"
    args = ["experiment", str(CONFIG)] + [a for s in shrink(out, tiny_corpus, ref) for a in ("--set", s)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert all(r["status"] == "done" for r in runs.values())
    assert runs["mlm-peer2"]["models"][0]["arch"] == runs["dml"]["models"][1]["arch"]
    assert runs["mlm"]["models"][0]["arch"] != runs["mlm-peer2"]["models"][0]["arch"]
    assert "ensemble" not in json.loads((out / "eval_dwml.json").read_text())["models"]  # eval.ensemble = false

    rows = results["comparisons"]["rows"]
    pairs = {(r["run"], r["model"], r["baseline"]) for r in rows}
    by_key = {(r["run"], r["model"], r["baseline"]): r for r in rows}
    tasks = {"blimp_fast", "supplement_fast", "ewok_fast"}
    for run in ("dml", "dwml", "kd_dwml"):
        for i in range(2):
            assert (run, f"peer{i}", "mlm_same_shape") in pairs
            assert (run, f"peer{i}", "kd") in pairs
        assert (run, "ensemble", "kd") in pairs  # on loss: the ensemble has a validation loss, not scores
        # eval.peers = best_loss: only the peer with the lowest validation loss is scored, and it is the best peer
        losses = [m["valid_loss"] for m in runs[run]["models"] if m["name"] != "ensemble"]
        best = f"peer{losses.index(min(losses))}"
        assert sorted(json.loads((out / f"eval_{run}.json").read_text())["models"]) == [best]
        assert runs[run]["best"] == best
        for i in range(2):
            scored = set(by_key[(run, f"peer{i}", "mlm_same_shape")]["measures"])
            assert scored == ({"valid_loss"} | tasks if f"peer{i}" == best else {"valid_loss"}), (run, i)
    assert ("kd", "peer0", "mlm_same_shape") in pairs and ("kd", "peer0", "kd") not in pairs
    assert set(by_key[("kd", "peer0", "mlm_same_shape")]["measures"]) == {"valid_loss"} | tasks
    dwml_vs_mlm = by_key[("dwml", "peer1", "mlm_same_shape")]
    assert dwml_vs_mlm["baseline_run"] == "mlm-peer2"
    loss = dwml_vs_mlm["measures"]["valid_loss"]
    mine = runs["dwml"]["models"][1]["valid_loss"]
    theirs = runs["mlm-peer2"]["models"][0]["valid_loss"]
    assert loss["diff"] == pytest.approx(mine - theirs, abs=1e-9) and loss["low"] <= loss["diff"] <= loss["high"]
    assert loss["n_items"] == 3  # eval_batches
    assert set(by_key[("dwml", "ensemble", "kd")]["measures"]) == {"valid_loss"}

    report = (out / "report.md").read_text()
    assert "Each method against MLM of the same shape and against KD" in report
    assert "only the peer with the lowest validation loss is scored" in report
    assert "| dwml/peer1 | dwml |" in report and "MLM, same shape (`mlm-peer2`)" in report
    for fig in ("omega", "valid_loss", "blimp_fields"):
        assert (out / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG", fig
        assert f"figures/{fig}.png" in report
    curve = runs["dwml"]["valid_curve"]
    assert curve["tokens"] == [0, 2 * 8 * 64, 4 * 8 * 64] and [len(x) for x in curve["loss"]] == [2, 2, 2]
    fields = runs["mlm"]["blimp_fields"]["peer0"]
    assert fields["task"] == "blimp_fast" and fields["fields"]
    capsys.readouterr()
