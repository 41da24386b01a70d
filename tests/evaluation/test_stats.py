"""Paired bootstrap (dwml.evaluation.stats) against the naive per-item resampling loop and the closed-form variance."""
import numpy as np
import pytest

from dwml.errors import DwmlError
from dwml.evaluation.outcomes import item_record
from dwml.evaluation.evaldata import MinimalPair
from dwml.evaluation.stats import (compare_tasks, macro_accuracy, paired_bootstrap, paired_bootstrap_mean,
                                   significance_vs_mlm)


def _data(seed=0, sizes=(40, 25, 60)):
    rng = np.random.default_rng(seed)
    group = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])
    a = rng.random(group.size) < np.array([0.7, 0.55, 0.8])[group]
    b = rng.random(group.size) < np.array([0.6, 0.55, 0.7])[group]
    return a, b, group


def _closed_form_sd(a, b, group):
    """Var of the stratified bootstrap macro difference: sum_g Var(mean of n_g draws of d) / G^2."""
    var = 0.0
    groups = np.unique(group)
    for g in groups:
        d = a[group == g].astype(float) - b[group == g].astype(float)
        var += d.var() / d.size
    return 100 * np.sqrt(var) / len(groups)


def test_matches_the_naive_item_loop_and_the_closed_form():
    a, b, group = _data()
    fast = paired_bootstrap(a, b, group, n_boot=50_000, seed=1)
    rng = np.random.default_rng(2)
    naive = []
    for _ in range(3000):  # resample items within each group, the same items for both models
        idx = np.concatenate([rng.choice(np.flatnonzero(group == g), size=(group == g).sum()) for g in range(3)])
        naive.append(macro_accuracy(a[idx], group[idx]) - macro_accuracy(b[idx], group[idx]))
    naive = np.array(naive)
    sd = _closed_form_sd(a, b, group)
    assert fast["diff"] == pytest.approx(macro_accuracy(a, group) - macro_accuracy(b, group))
    assert np.std(naive) == pytest.approx(sd, rel=0.06)
    # the fast replicates' spread: 95% interval of a near-normal distribution with that sd around diff
    assert (fast["high"] - fast["low"]) == pytest.approx(2 * 1.96 * sd, rel=0.05)
    for q, v in ((0.025, fast["low"]), (0.975, fast["high"])):
        assert np.quantile(naive, q) == pytest.approx(v, abs=0.15 * sd)


def test_significance_decisions():
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(10), 200)
    b = rng.random(group.size) < 0.6
    same = paired_bootstrap(b, b, group)
    assert same["diff"] == 0 and same["low"] == 0 == same["high"] and not same["significant"]
    better = b.copy()
    better[rng.choice(np.flatnonzero(~b), 300, replace=False)] = True  # 15 points better
    res = paired_bootstrap(better, b, group)
    assert res["significant"] and res["low"] > 0 and res["diff"] == pytest.approx(15.0)
    swapped = b.copy()  # 10 items lost and 10 others won: the same accuracy, different items
    swapped[rng.choice(np.flatnonzero(b), 10, replace=False)] = False
    swapped[rng.choice(np.flatnonzero(~b), 10, replace=False)] = True
    res0 = paired_bootstrap(swapped, b, group)
    assert res0["low"] < 0 < res0["high"] and not res0["significant"]
    assert paired_bootstrap(better, b, group, seed=3) != res  # the seed is used...
    assert paired_bootstrap(better, b, group) == res  # ...and fixes the result


def test_compare_tasks_reads_eval_items_and_refuses_other_items():
    pairs = [MinimalPair(good="a", bad="b", group=g, field="f") for g in ("x", "x", "y", "y")]
    ta = {"t": {"items": item_record(pairs, [(True, False), (True, False), (False, True), (True, False)], ["x", "y"])}}
    tb = {"t": {"items": item_record(pairs, [(False, False), (True, False), (False, False), (True, False)],
                                     ["x", "y"])}}
    res = compare_tasks(ta, tb, n_boot=200)
    assert res["t"]["diff"] == pytest.approx(25.0)  # x: 100 vs 50, y: 50 vs 50
    short = {"t": {"items": item_record(pairs[:3], [(True, False)] * 3, ["x", "y"])}}
    with pytest.raises(DwmlError, match="different items"):
        compare_tasks(ta, short)
    with pytest.raises(DwmlError, match="same items"):
        paired_bootstrap(np.ones(3, bool), np.ones(4, bool), np.zeros(3))


def test_significance_vs_mlm_and_its_report_table():
    from dwml.experiments.report import significance_table

    pairs = [MinimalPair(good="a", bad="b", group=g, field="f") for g in ["x"] * 300 + ["y"] * 300]
    rng = np.random.default_rng(0)

    def ev(models):
        return {"models": {m: {"tasks": {"blimp_filtered": {"items": item_record(
            pairs, [(bool(c), False) for c in (rng.random(600) < p)], ["x", "y"])}}} for m, p in models.items()}}

    runs = [{"name": "teacher", "method": "mlm", "best": "peer0", "models": [{}]},
            {"name": "mlm", "method": "mlm", "best": "peer0", "models": [{}]},
            {"name": "dwml", "method": "dwml", "best": "peer1", "models": [{}, {}, {}]},
            {"name": "dwml-alias", "method": "dwml", "alias_of": "dwml"}]
    evaluations = {"teacher": ev({"peer0": 0.9}), "mlm": ev({"peer0": 0.5}),
                   "dwml": ev({"peer0": 0.5, "peer1": 0.9, "ensemble": 0.52})}
    sig = significance_vs_mlm(runs, evaluations, n_boot=500)
    assert sig["reference"] == {"run": "mlm", "model": "peer0"}  # the run named mlm, not the first mlm run
    rows = {(r["run"], r["model"]): r for r in sig["rows"]}
    assert set(rows) == {("teacher", "peer0"), ("dwml", "peer1"), ("dwml", "ensemble")}
    assert rows[("dwml", "peer1")]["significant"] and rows[("dwml", "peer1")]["diff"] > 30
    md = significance_table({"significance": sig})
    assert "| dwml | dwml | peer1 | BLiMP |" in md and "yes" in md
    assert significance_vs_mlm(runs[2:], evaluations) is None  # no mlm run: nothing to compare with


def test_paired_bootstrap_mean_matches_the_naive_loop_and_the_normal_interval():
    rng = np.random.default_rng(1)
    a = rng.normal(3.0, 0.2, size=400)
    b = a + rng.normal(0.05, 0.1, size=400)  # b worse by 0.05 on average, paired noise 0.1
    r = paired_bootstrap_mean(a, b, n_boot=4000, seed=3)
    assert r["diff"] == pytest.approx(float(np.mean(a - b)))
    # The same replicates as a plain loop over resampled unit indices with the same generator.
    g = np.random.default_rng(3)
    idx = g.integers(0, 400, size=(4000, 400))
    naive = np.array([np.mean(a[i] - b[i]) for i in idx])
    assert r["low"] == pytest.approx(np.quantile(naive, 0.025)) and r["high"] == pytest.approx(np.quantile(naive, 0.975))
    half = 1.96 * np.std(a - b, ddof=1) / np.sqrt(400)  # the normal approximation of the 95% half-width
    assert (r["high"] - r["low"]) / 2 == pytest.approx(half, rel=0.1)
    assert r["significant"] and r["high"] < 0 and r["n_items"] == 400
    same = paired_bootstrap_mean(a, a + 0.25)
    assert same["low"] == pytest.approx(-0.25) and same["high"] == pytest.approx(-0.25)  # no paired noise at all
    assert not paired_bootstrap_mean(a, a)["significant"]
    with pytest.raises(DwmlError, match="same non-empty list"):
        paired_bootstrap_mean(a, b[:-1])
    with pytest.raises(DwmlError, match="same non-empty list"):
        paired_bootstrap_mean([], [])
