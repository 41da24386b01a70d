"""dwml.experiments.comparison: which model is compared with which baseline, and the numbers of each comparison."""
import numpy as np
import pytest

from dwml.evaluation.evaldata import MinimalPair
from dwml.evaluation.outcomes import summarize
from dwml.experiments.comparison import compare_models, comparison_table

A, B, C = "MB-L2-A2-H64-I176", "MB-L2-A2-H48-I128", "MB-L1-A2-H32-I96"


def model(name, arch, losses):
    return {"name": name, "arch": arch, "params": 1000, "valid_batch_losses": losses}


def run(name, method, models):
    return {"name": name, "method": method, "alias_of": None, "n_students": sum(m["name"] != "ensemble"
                                                                               for m in models), "models": models}


def task(correct):
    """A one-task evaluation result whose pair k is right iff correct[k] (two groups)."""
    pairs = [MinimalPair(f"good {k}", f"bad {k}", group=f"g{k % 2}", field="syntax") for k in range(len(correct))]
    good = [1.0 if c else 0.0 for c in correct]
    return {"blimp_fast": summarize(pairs, good, [0.5] * len(correct))}


def test_same_shape_and_kd_baselines():
    losses = lambda x: [x + 0.01 * k for k in range(8)]  # noqa: E731
    runs = [
        run("teacher", "mlm", [model("peer0", "MB-L4-A4-H256-I704", losses(3.0))]),
        run("mlm", "mlm", [model("peer0", A, losses(4.0))]),
        run("mlm-peer2", "mlm", [model("peer0", B, losses(4.2))]),
        run("kd", "kd", [model("peer0", A, losses(3.9))]),
        run("dwml", "dwml", [model("peer0", A, losses(3.8)), model("peer1", B, losses(4.3)),
                             model("peer2", C, losses(4.5)), model("ensemble", "omega-mixture", losses(3.7))]),
    ]
    rng = np.random.default_rng(0)
    outcome = {n: rng.random(40) < p for n, p in [("mlm", 0.5), ("kd", 0.6), ("dwml", 0.8)]}
    evaluations = {"mlm": {"models": {"peer0": {"tasks": task(outcome["mlm"])}}},
                   "kd": {"models": {"peer0": {"tasks": task(outcome["kd"])}}},
                   "dwml": {"models": {"peer0": {"tasks": task(outcome["dwml"])}}}}
    comp = compare_models(runs, evaluations, n_boot=500)
    got = {(r["run"], r["model"], r["baseline"]): r for r in comp["rows"]}
    # peer2's shape has no MLM run; the ensemble has no shape; KD is not compared with itself; MLM runs are baselines
    assert set(got) == {("kd", "peer0", "mlm_same_shape"), ("dwml", "peer0", "mlm_same_shape"),
                        ("dwml", "peer1", "mlm_same_shape"), ("dwml", "peer0", "kd"), ("dwml", "peer1", "kd"),
                        ("dwml", "peer2", "kd"), ("dwml", "ensemble", "kd")}
    assert got[("dwml", "peer1", "mlm_same_shape")]["baseline_run"] == "mlm-peer2"
    assert got[("dwml", "peer1", "mlm_same_shape")]["measures"]["valid_loss"]["diff"] == pytest.approx(0.1)
    assert got[("dwml", "ensemble", "kd")]["measures"]["valid_loss"]["diff"] == pytest.approx(-0.2)
    acc = got[("dwml", "peer0", "mlm_same_shape")]["measures"]["blimp_fast"]
    expected = 100 * np.mean([outcome["dwml"][g::2].mean() - outcome["mlm"][g::2].mean() for g in (0, 1)])
    assert acc["diff"] == pytest.approx(expected) and acc["low"] <= acc["diff"] <= acc["high"]
    assert set(got[("dwml", "peer1", "kd")]["measures"]) == {"valid_loss"}  # peer1 was not scored
    table = comparison_table({"comparisons": comp})
    assert "| dwml/peer1 | dwml | MB-L2-A2-H48-I128 | MLM, same shape (`mlm-peer2`) | +0.100 [+0.100, +0.100] * |" in table
    assert comparison_table({"comparisons": None}) == ""


def test_nothing_to_compare():
    runs = [run("mlm", "mlm", [model("peer0", A, [4.0])]), run("dml", "dml", [model("peer0", B, None)])]
    assert compare_models(runs, {}) is None  # dml's shape has no MLM, there is no KD run
