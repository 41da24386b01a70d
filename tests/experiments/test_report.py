"""Report generation from hand-made results dicts: table contents, best-peer marking, R vs numpy, figures."""
import copy
import math

import numpy as np
import pytest

from dwml.experiments.analysis import best_model, model_rows, omega_correlation, pearson, sweep_points
from dwml.experiments.report import cost_table, main_table, outer_table, peer_table, render_report, write_report
from dwml.experiments.formatting import md_table

TASKS = ["blimp_fast", "supplement_fast", "ewok_fast"]


def summary(omega, params, losses, ens=None, learned=True):
    peers = [{"name": f"p{i}", "arch": {"layers": 2, "heads": 2, "hidden": 32 * (i + 1), "intermediate": 64},
              "params": p, "valid_loss": v} for i, (p, v) in enumerate(zip(params, losses))]
    return {"method": "dwml", "omega": omega, "omega_learned": learned, "peers": peers, "valid_ensemble_loss": ens}


def evaluation(scores):
    """scores: {model: [acc per task]}"""
    return {"tasks": TASKS, "models": {m: {"summary": dict(zip(TASKS, acc))} for m, acc in scores.items()}}


def run(name, method, summ, ev, ft=None, sweep=None, flops=None, timing=None, steps=10):
    rows = model_rows(summ, ev, ft)
    return {
        "name": name, "method": method, "alias_of": None, "sweep": sweep, "teacher": None,
        "budget": {"steps": steps, "batch_size": 4, "grad_accum": 1, "seq_len": 32, "tokens_per_student": steps * 128,
                   "sequences_per_student": steps * 4, "real_tokens_per_student": steps * 100},
        "status": "done", "axes": {"peers": len(summ["peers"]), "alpha": 0.5, "learn_omega": True},
        "n_students": len(summ["peers"]), "omega": summ["omega"], "omega_learned": summ["omega_learned"],
        "omega_trajectory": {"outer_step": [0, 1, 2], "omega": [[1 / len(summ["omega"])] * len(summ["omega"]),
                                                                 summ["omega"], summ["omega"]],
                             "mixed_ratio": [None, 0.02, 0.04]}
        if method == "dwml" else {"outer_step": [], "omega": [], "mixed_ratio": []},
        "unroll": "adamw", "mixed_ratio_median": 0.03 if method == "dwml" else None,
        "valid_ensemble_loss": summ["valid_ensemble_loss"], "models": rows, "best": best_model(rows),
        "timing": timing, "flops": flops or {},
    }


@pytest.fixture
def results():
    mlm = run("mlm", "mlm", summary([1.0], [500_000], [5.0], learned=False), evaluation({"peer0": [60, 50, 55]}),
              ft={"models": {"peer0": {"tasks": {"rte": {"score": 0.5}, "sst2": {"score": 0.7}}, "average": 0.6}}},
              timing={"wall_s": 12.3, "gpu_util_mean": None},
              flops={"analytic_per_student": [1e12], "analytic_teacher_forward": 0.0, "analytic_total": 1e12,
                     "measured_micro_step": 1e9, "analytic_micro_step": 1e9, "ratio": 1.0,
                     "measured_outer_step": None, "outer_steps": 0, "measured_total": 1e12})
    dwml = run("dwml", "dwml", summary([0.5, 0.3, 0.2], [500_000, 320_000, 250_000], [5.1, 5.3, 5.2], ens=4.9),
               evaluation({"peer0": [61, 50, 50], "peer1": [65, 60, 55], "peer2": [58, 52, 50],
                           "ensemble": [66, 62, 57]}),
               timing={"wall_s": 40.0, "gpu_util_mean": 87.5},
               flops={"analytic_per_student": [1e12, 6e11, 5e11], "analytic_teacher_forward": 0.0,
                      "analytic_total": 2.1e12, "measured_micro_step": 2e9, "analytic_micro_step": 2e9, "ratio": 1.0,
                      "measured_outer_step": 6e9, "outer_steps": 1, "measured_total": 2.6e12})
    variant = run("dwml-alpha0.3", "dwml", summary([0.6, 0.25, 0.15], [500_000, 320_000, 250_000], [5.0, 5.2, 5.3],
                                                   ens=4.8),
                  evaluation({"peer0": [70, 60, 50], "peer1": [60, 55, 50], "peer2": [50, 50, 50],
                              "ensemble": [71, 61, 51]}),
                  sweep={"base": "dwml", "axis": "alpha", "value": 0.3})
    variant["axes"]["alpha"] = 0.3
    alias = {"name": "dwml-alpha0.5", "method": "dwml", "alias_of": "dwml", "sweep": {"base": "dwml", "axis": "alpha",
             "value": 0.5}, "budget": mlm["budget"], "status": "done"}
    res = {"name": "t", "description": "", "config_file": "x.toml", "out_dir": "x",
           "data": {"prepared": "d", "vocab_size": 1000, "train_tokens": 1, "train_words": 1, "valid_tokens": 1,
                    "train_sequences": 10, "mean_sequence_length": 25.0},
           "search": None, "eval": {"tasks": TASKS, "limit": 5, "method": "pll"},
           "finetune": {"tasks": ["rte", "sst2"], "epochs": 1, "max_train_examples": 8, "max_eval_examples": 8,
                        "models": "best"},
           "runs": [mlm, dwml, variant, alias]}
    res["correlation"] = omega_correlation(res)
    return res


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[2:]]


def test_md_table_shape():
    md = md_table(["a", "b"], [["x", "1"], ["y", "2"]])
    assert md.splitlines() == ["| a | b |", "| :-- | --: |", "| x | 1 |", "| y | 2 |"]


def test_model_rows_and_best_peer(results):
    dwml = results["runs"][1]
    names = [r["name"] for r in dwml["models"]]
    assert names == ["peer0", "peer1", "peer2", "ensemble"]
    rows = {r["name"]: r for r in dwml["models"]}
    assert rows["peer1"]["zero_shot_mean"] == pytest.approx(60.0)
    assert rows["ensemble"]["params"] == 1_070_000 and rows["ensemble"]["valid_loss"] == 4.9
    assert rows["ensemble"]["omega"] is None and rows["peer2"]["omega"] == 0.2
    # The best peer is by mean zero-shot accuracy, never the ensemble (which is higher here).
    assert dwml["best"] == "peer1"
    # Tie on accuracy -> lower validation loss; no evaluation at all -> lowest validation loss.
    tie = model_rows(summary([0.5, 0.5], [1, 1], [3.0, 2.0]), evaluation({"peer0": [50, 50, 50],
                                                                           "peer1": [50, 50, 50]}), None)
    assert best_model(tie) == "peer1"
    assert best_model(model_rows(summary([0.5, 0.5], [1, 1], [2.0, 3.0]), None, None)) == "peer0"


def test_model_rows_name_the_arch_as_arch_name():
    summ = summary([0.5, 0.5], [1, 1], [2.0, 3.0])
    summ["peers"][1]["arch"]["family"] = "modernbert"
    del summ["peers"][0]["arch"]  # an old summary without the table: the peer's name
    assert [r["arch"] for r in model_rows(summ, None, None)[:2]] == ["p0", "MB-L2-A2-H64-I64"]


def test_main_table_marks_best_peer_and_ensemble(results):
    md = main_table(results)
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["Run", "Method", "Model", "Params", "ω"]
    assert "BLiMP (fast)" in header and "GLUE avg" in header and header[-2:] == ["Valid loss", "Plateau exit"]
    rows = table_rows(md)
    assert [r[0] for r in rows] == ["mlm", "dwml", "dwml", "dwml-alpha0.3", "dwml-alpha0.3"]  # no alias row
    dwml_best, dwml_ens = rows[1], rows[2]
    assert dwml_best[2] == "peer1 ★" and dwml_best[3] == "320k" and dwml_best[4] == "0.300"
    assert dwml_best[header.index("BLiMP (fast)")] == "65.0"
    assert dwml_best[header.index("Zero-shot mean")] == "60.0"
    assert dwml_ens[2] == "ensemble" and dwml_ens[header.index("Zero-shot mean")] == "61.7"
    assert rows[0][2] == "peer0"  # a single model gets no star
    assert rows[0][header.index("GLUE avg")] == "0.600" and dwml_best[header.index("GLUE avg")] == "–"
    assert rows[3][2] == "peer0 ★"


def test_tables_show_strict_accuracy_and_ties(results):
    """BabyLM-form accuracy (ties correct) is the headline; the strict mean and the tie count stand beside it."""
    ev = evaluation({"peer0": [60, 50, 55]})
    ev["models"]["peer0"].update(strict_summary=dict(zip(TASKS, [58, 50, 52])), ties=dict(zip(TASKS, [3, 0, 4])))
    results["runs"][0]["models"] = model_rows(summary([1.0], [500_000], [5.0], learned=False), ev, None)
    for md in (main_table(results), peer_table(results)):
        header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
        mlm = table_rows(md)[0]
        assert [mlm[header.index(c)] for c in ("Zero-shot mean", "Strict mean", "Ties")] == ["55.0", "53.3", "7"]
        assert table_rows(md)[1][header.index("Ties")] == "–"  # an evaluation without the strict numbers


def test_peer_table_has_every_model_and_glue_tasks(results):
    md = peer_table(results)
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert "rte" in header and "sst2" in header
    rows = table_rows(md)
    assert len(rows) == 1 + 4 + 4
    assert sum("★" in r[2] for r in rows) == 2
    assert rows[0][header.index("rte")] == "0.500"
    assert rows[2][3] == "L2-A2-H64-I64"


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=7), rng.normal(size=7)
    assert pearson(list(x), list(y)) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson([1, 2], [3, 4]) is None  # n < 3: undefined
    assert pearson([1, 1, 1], [1, 2, 3]) is None  # constant x


def test_omega_correlation_pools_learned_peers(results):
    c = results["correlation"]
    # 3 + 3 peers of the two learned-omega runs; the mlm run and the alias are not points.
    assert c["n"] == 6
    xs = [3 * w for w in [0.5, 0.3, 0.2, 0.6, 0.25, 0.15]]
    ys = [np.mean(a) for a in ([61, 50, 50], [65, 60, 55], [58, 52, 50], [70, 60, 50], [60, 55, 50], [50, 50, 50])]
    assert [p["x"] for p in c["points"]] == pytest.approx(xs)
    assert c["r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-12)
    assert c["per_run"]["dwml"]["n"] == 3
    assert c["per_run"]["dwml"]["r"] == pytest.approx(np.corrcoef(xs[:3], ys[:3])[0, 1], abs=1e-12)
    # Fixed-omega runs are excluded; with fewer than 3 points R is undefined.
    fixed = copy.deepcopy(results)
    fixed["runs"][2]["omega_learned"] = False
    fixed["runs"][1]["models"] = fixed["runs"][1]["models"][:2] + fixed["runs"][1]["models"][3:]
    c2 = omega_correlation(fixed)
    assert c2["n"] == 2 and c2["r"] is None
    assert "R = n/a" in render_report({**fixed, "correlation": c2})


def test_sweep_points_resolve_aliases(results):
    pts = sweep_points(results)["dwml"]["alpha"]
    assert [p["value"] for p in pts] == [0.3, 0.5]
    assert pts[0]["run"] == "dwml-alpha0.3" and pts[0]["best"] == pytest.approx(60.0)  # its peer0
    assert pts[1]["run"] == "dwml" and pts[1]["ensemble"] == pytest.approx(185 / 3)


def test_cost_table(results):
    md = cost_table(results)
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    rows = {r[0]: r for r in table_rows(md)}
    assert rows["mlm"][header.index("GPU util")] == "n/a"
    assert rows["dwml"][header.index("GPU util")] == "88%"
    assert rows["mlm"][header.index("Wall s")] == "12"
    assert rows["dwml"][header.index("Analytic FLOPs/student")] == "1.00e+12 + 6.00e+11 + 5.00e+11"
    assert rows["dwml"][header.index("Outer step (× inner)")] == "3.00 × 1"
    assert rows["dwml-alpha0.3"][header.index("Wall s")] == "n/a"  # no timing recorded


def test_write_report_files(results, tmp_path):
    path = write_report(results, tmp_path)
    text = path.read_text()
    for section in ("Table 1", "Table 2", "Figure 3", "Figure 2", "Table 9", "Pearson R"):
        assert section in text
    assert "![omega trajectories](figures/omega.png)" in text and "![ablations](figures/ablations.png)" in text
    for name in ("omega.png", "ablations.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic writes leave nothing behind
    # Without learned-omega runs there is no omega figure, and the report says so.
    plain = copy.deepcopy(results)
    plain["runs"] = plain["runs"][:1]
    plain["correlation"] = omega_correlation(plain)
    out = tmp_path / "plain"
    text = write_report(plain, out).read_text()
    assert not (out / "figures" / "omega.png").exists() and "No learned-ω run" in text
    assert math.isfinite(results["correlation"]["r"])


def test_outer_table_lists_learned_omega_runs_with_their_median_ratio(results):
    results["runs"][2]["unroll"], results["runs"][2]["mixed_ratio_median"] = "sgd", 0.0012
    rows = table_rows(outer_table(results))
    assert rows == [["dwml", "dwml", "adamw", "2", "0.03"], ["dwml-alpha0.3", "dwml", "sgd", "2", "0.0012"]]
    assert "## Table 3: the outer step" in render_report(results)
    for run in results["runs"]:
        run["omega_learned"] = False
    assert outer_table(results) == "" and "## Table 3" not in render_report(results)


def test_budget_line_sets_a_teacher_apart(results):
    text = render_report(results)
    assert "All runs: 10 steps x 4 sequences x 1 accumulation x 32 tokens." in text and "Teacher `" not in text
    teacher = run("teacher", "mlm", summary([1.0], [900_000], [4.0], learned=False), None, steps=40)
    kd = run("kd", "kd", summary([1.0], [500_000], [4.5], learned=False), None)
    kd["teacher_run"] = "teacher"
    with_teacher = dict(results, runs=[teacher, kd] + results["runs"])
    text = render_report(with_teacher)
    assert "All students: 10 steps x 4 sequences x 1 accumulation x 32 tokens." in text
    assert "Teacher `teacher` (of kd), trained first: 40 steps x 4 sequences x 1 accumulation x 32 tokens." in text
    assert "do NOT share" not in text
    # A student that differs from the others is still called out.
    results["runs"][1]["budget"] = dict(results["runs"][1]["budget"], steps=11)
    assert "Note: the runs do NOT share one budget: mlm: 10 steps" in render_report(results)
