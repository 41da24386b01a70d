"""Experiment configs (strict parsing, sweep expansion, the shipped configs) and a tiny end-to-end experiment."""
import json
import os
from pathlib import Path

import pytest

from dwml.cli import main
from dwml.errors import DwmlError
from dwml.experiments.plan import axis_values, plan_runs
from dwml.experiments.config import load_experiment, parse_experiment
from dwml.experiments.experiment import run_experiment

REPO = Path(__file__).resolve().parents[2]
ARCHS = [{"layers": 2, "heads": 2, "hidden": 32 * (4 - i), "intermediate": 64 * (4 - i), "vocab_size": 1000,
          "max_positions": 34} for i in range(4)]

CONFIG = """
name = "t"
out_dir = "OUT"
[prepare]
vocab_size = 1000
[base.data]
seq_len = 32
[base.train]
max_steps = 5
[search]
reference = "tiny"
peers = 3
[[runs]]
name = "teacher"
method = "mlm"
[[runs]]
name = "mlm"
method = "mlm"
peers = 1
[[runs]]
name = "kd"
method = "kd"
peers = 1
teacher = "run:teacher"
[[runs]]
name = "dwml"
method = "dwml"
[runs.distill]
alpha = 0.5
[sweep]
base = "dwml"
peers = [1, 2]
alpha = [0.3, 0.5]
learn_omega = [false]
"""


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text.replace("OUT", str(tmp_path / "exp")))
    return path


def test_sweep_expansion_and_order(tmp_path):
    cfg = load_experiment(write(tmp_path, CONFIG))
    plans = plan_runs(cfg, tmp_path / "exp", tmp_path / "data", ARCHS[:3])
    names = [p.name for p in plans]
    assert names == ["teacher", "mlm", "kd", "dwml", "dwml-peers1", "dwml-peers2", "dwml-alpha0.3",
                     "dwml-alpha0.5", "dwml-learn_omegafalse"]
    by = {p.name: p for p in plans}
    # peers = 1 of dwml is the single network: the mlm run (an alias, not trained again).
    assert by["dwml-peers1"].method == "mlm" and by["dwml-peers1"].alias_of == "mlm"
    assert by["dwml-alpha0.5"].alias_of == "dwml"  # the base's own value
    assert by["dwml-alpha0.3"].alias_of is None and by["dwml-alpha0.3"].config.distill.alpha == 0.3
    assert by["dwml-learn_omegafalse"].config.distill.learn_omega is False
    assert [len(by[n].config.model.peers) for n in ("mlm", "dwml", "dwml-peers2")] == [1, 3, 2]
    assert by["dwml"].config.model.peers[0] == ARCHS[0] and by["teacher"].config.model.peers == []
    assert by["dwml-peers2"].sweep == {"base": "dwml", "axis": "peers", "value": 2}
    assert by["kd"].config.distill.teacher == str(tmp_path / "exp" / "teacher")
    assert by["dwml"].config.out_dir == str(tmp_path / "exp" / "dwml")
    assert all(p.config.data.prepared == str(tmp_path / "data") and p.config.train.max_steps == 5 for p in plans)
    # A teacher listed after its student is still trained first.
    text = CONFIG.replace('name = "teacher"\nmethod = "mlm"\n[[runs]]\n', "") + \
        '[[runs]]\nname = "teacher"\nmethod = "mlm"\n'
    names = [p.name for p in plan_runs(load_experiment(write(tmp_path, text, "b.toml")), tmp_path, tmp_path,
                                       ARCHS[:3])]
    assert names.index("teacher") < names.index("kd")


@pytest.mark.parametrize("edit, match", [
    (("[prepare]", "colour = 1\n[prepare]"), r"exp.toml: unknown key\(s\) \['colour'\]"),
    (("max_steps = 5", "max_step = 5"), r"exp.toml: base.train: unknown key\(s\) \['max_step'\]"),
    (('teacher = "run:teacher"', 'teacher = "run:teacher"\nbatch = 3'), r"exp.toml: runs\[2\]: unknown key"),
    (("[runs.distill]\nalpha = 0.5", "[runs.distill]\nalfa = 0.5"), r"runs\[3\] \(dwml\).distill: unknown key"),
    (("learn_omega = [false]", "lr = [0.1]"), r"exp.toml: sweep: unknown key 'lr'"),
    (("alpha = [0.3, 0.5]", "alpha = [0.3, 'x']"), r"sweep.alpha: expected float"),
    (('base = "dwml"', 'base = "nope"'), r"sweep.base: expected the name of a run"),
    (('teacher = "run:teacher"', 'teacher = "run:nobody"'), r"no run named 'nobody'"),
    (('method = "kd"', 'method = "kdd"'), r"runs\[2\] \(kd\): method: expected one of"),
    (('name = "mlm"', 'name = "teacher"'), r"duplicate run name 'teacher'"),
    (("[prepare]", "[data]\nprepared = 'x'\n[prepare]"), r"either \[prepare\].*or \[data\] prepared"),
    (("[base.data]", "[eval]\ntasks = ['blimpp']\n[base.data]"), r"eval.tasks: .*unknown task 'blimpp'"),
    (("[base.data]", "[eval]\nprecision = 'fp16'\n[base.data]"), r"eval.precision: expected one of"),
    (("[base.data]", "[eval]\newok_pairing = 'both'\n[base.data]"), r"eval.ewok_pairing: expected one of"),
    (("[base.data]", "[finetune]\nenabled = true\nepochs = 0\n[base.data]"), r"finetune.epochs"),
    (("[base.data]", "[finetune]\nmodels = 'some'\n[base.data]"), r"finetune.models: expected best\|all"),
])
def test_config_errors_name_file_and_key(tmp_path, edit, match):
    old, new = edit
    assert old in CONFIG
    with pytest.raises(DwmlError, match=match):
        load_experiment(write(tmp_path, CONFIG.replace(old, new, 1)))


def test_run_level_errors(tmp_path):
    cfg = load_experiment(write(tmp_path, CONFIG))
    with pytest.raises(DwmlError, match=r"runs \(dwml\): method dwml needs at least 2 peers, got 1"):
        plan_runs(cfg, tmp_path, tmp_path, ARCHS[:1])
    more = load_experiment(write(tmp_path, CONFIG.replace("peers = [1, 2]", "peers = [1, 3]"), "m.toml"))
    with pytest.raises(DwmlError, match=r"runs \(dwml-peers3\): peers = 3, but \[search\] finds only 2"):
        plan_runs(more, tmp_path, tmp_path, ARCHS[:2])
    with pytest.raises(DwmlError, match=r"runs \(mlm\): uses searched peers, but .* no \[search\]"):
        plan_runs(cfg, tmp_path, tmp_path, None)
    bad = load_experiment(write(tmp_path, CONFIG.replace("alpha = 0.5", "alpha = 1.5"), "c.toml"))
    with pytest.raises(DwmlError, match=r"c.toml: runs \(dwml\): distill.alpha: expected a value in \[0, 1\]"):
        plan_runs(bad, tmp_path, tmp_path, ARCHS)
    clash = load_experiment(write(tmp_path, CONFIG + '[[runs]]\nname = "dwml-peers2"\nmethod = "mlm"\n', "d.toml"))
    with pytest.raises(DwmlError, match="collides"):
        plan_runs(clash, tmp_path, tmp_path, ARCHS)
    with pytest.raises(DwmlError, match="out_dir: expected a string"):
        load_experiment(write(tmp_path, CONFIG), sets=["out_dir=3"])


def test_set_reaches_one_run_by_name(tmp_path):
    path = write(tmp_path, CONFIG)
    cfg = load_experiment(path, sets=["runs.teacher.train.max_steps=9", "runs.dwml.distill.alpha=0.7"])
    plans = {p.name: p.config for p in plan_runs(cfg, tmp_path, tmp_path, ARCHS[:3])}
    assert plans["teacher"].train.max_steps == 9 and plans["mlm"].train.max_steps == 5  # only the named run
    assert plans["dwml"].distill.alpha == 0.7 and plans["dwml-alpha0.3"].distill.alpha == 0.3  # the sweep's axis wins
    assert plans["kd"].distill.alpha == 0.5
    for bad in ["runs.nope.train.max_steps=9", "runs.teacher=3"]:
        with pytest.raises(DwmlError, match=r"--set runs\..*expected runs.NAME.key=value with NAME one of "
                                            r"\['teacher', 'mlm', 'kd', 'dwml'\]"):
            load_experiment(path, sets=[bad])
    with pytest.raises(DwmlError, match=r"runs\[0\] \(teacher\).*max_step"):  # unknown keys still fail loudly
        plan_runs(load_experiment(path, sets=["runs.teacher.train.max_step=9"]), tmp_path, tmp_path, ARCHS[:3])
    assert main(["experiment", str(path), "--dry-run", "--set", "runs.nope.train.max_steps=1"]) == 2


@pytest.mark.parametrize("name", ["experiment-tiny.toml", "babylm-10m.toml", "babylm-100m.toml",
                                  "ablation-tiny.toml"])
def test_shipped_configs_load_and_plan(tmp_path, name):
    cfg = load_experiment(REPO / "configs" / name)
    n_peers = cfg.search.peers
    archs = [dict(a, vocab_size=cfg.prepare.vocab_size) for a in (ARCHS * 2)[:n_peers]]
    plans = plan_runs(cfg, tmp_path, tmp_path / "data", archs)
    methods = {p.method for p in plans}
    assert {"mlm", "dwml"} <= methods
    if name != "ablation-tiny.toml":
        assert set(methods) == {"mlm", "kd", "sd", "dml", "dwml", "kd_dwml"}
        steps = {(p.config.train.max_steps, p.config.train.batch_size, p.config.train.grad_accum,
                  p.config.data.seq_len) for p in plans}
        assert len(steps) == 1  # same budget for every run
    else:
        axes = {p.sweep["axis"] for p in plans if p.sweep}
        assert axes == {"peers", "alpha", "learn_omega", "unroll"}


EXPERIMENT = """
name = "e2e"
out_dir = "OUT"
[data]
prepared = "PREPARED"
[base.data]
seq_len = 64  # the model needs positions for the longest evaluation sentence
heldout_sequences = 16
[base.model]
preset = "tiny"
[base.train]
max_steps = 6
batch_size = 8
lr = 3e-3
warmup_steps = 2
eval_every = 6
eval_batches = 2
save_every = 6
log_every = 3
progress = false
[base.distill]
outer_every = 2
[search]
reference = "REF"
peers = 2
init_points = 2
n_iter = 2
layers = [1, 2]
heads = [1, 2]
head_dim = [8, 16]
head_dim_step = 8
[[runs]]
name = "mlm"
method = "mlm"
peers = 1
[[runs]]
name = "dwml"
method = "dwml"
[sweep]
base = "dwml"
alpha = [0.3, 0.5]
[eval]
tasks = ["blimp_fast", "supplement_fast", "ewok_fast"]
limit = 2
"""


def test_tiny_experiment_end_to_end(tiny_prepared, tmp_path, shared_data):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"layers": 2, "heads": 2, "hidden": 32, "intermediate": 64}))
    text = EXPERIMENT.replace("PREPARED", str(tiny_prepared)).replace("REF", str(ref))
    path = write(tmp_path, text)
    results = run_experiment(load_experiment(path), log=lambda s: None)
    out = tmp_path / "exp"
    for f in ("peers.json", "results.json", "report.md", "figures/omega.png", "figures/ablations.png",
              "eval_mlm.json", "eval_dwml.json", "eval_dwml-alpha0.3.json", "flops_dwml.json", "timing_mlm.json"):
        assert (out / f).is_file(), f
    assert not (out / "dwml-alpha0.5").exists()  # an alias of dwml: not trained again
    assert not (out / "finetune_mlm.json").exists()  # fine-tuning is off by default
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(json.dumps(results["runs"]))
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["dwml-alpha0.5"]["alias_of"] == "dwml"
    dwml = runs["dwml"]
    assert dwml["n_students"] == 2 and dwml["omega_learned"]
    assert dwml["omega_trajectory"]["outer_step"] == [0, 1, 2, 3]  # 6 steps / K = 2, plus the initial omega
    assert dwml["omega_trajectory"]["omega"][-1] == pytest.approx(dwml["omega"])
    ratios = dwml["omega_trajectory"]["mixed_ratio"]
    assert ratios[0] is None and all(r > 0 for r in ratios[1:])  # logged per outer step (adamw unroll)
    assert dwml["unroll"] == "adamw" and dwml["mixed_ratio_median"] == pytest.approx(sorted(ratios[1:])[1])
    assert [m["name"] for m in dwml["models"]] == ["peer0", "peer1", "ensemble"]
    assert set(dwml["models"][0]["zero_shot"]) == {"blimp_fast", "supplement_fast", "ewok_fast"}
    assert dwml["flops"]["outer_steps"] == 3 and dwml["flops"]["measured_outer_step"] > 0
    assert runs["mlm"]["flops"]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert dwml["budget"]["tokens_per_student"] == runs["mlm"]["budget"]["tokens_per_student"] == 6 * 8 * 64
    assert results["correlation"]["n"] == 4  # 2 peers x 2 learned-omega runs
    report = (out / "report.md").read_text()
    for section in ("## Table 1", "## Table 2", "## Figure 3", "## Table 3", "## Figure 2", "## Table 9",
                    "Pearson R"):
        assert section in report
    assert "| dwml | dwml | ensemble |" in report and "★" in report and "n/a" in report  # GPU util on CPU
    assert "| Zero-shot mean | Strict mean | Ties |" in report and "EWoK pairing targets" in report
    assert dwml["models"][0]["zero_shot_ties"] is not None
    assert (out / "figures" / "omega.png").read_bytes()[:4] == b"\x89PNG"

    # Re-running skips every finished stage (nothing is trained or evaluated again).
    before = {f: (out / f).stat().st_mtime_ns for f in ("dwml/final/summary.json", "eval_dwml.json",
                                                         "flops_dwml.json", "peers.json")}
    again = run_experiment(load_experiment(path), log=lambda s: None)
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before
    assert [r.get("models") for r in again["runs"]] == [r.get("models") for r in results["runs"]]
    # --report-only rewrites the report and keeps the wall time of the invocation that trained.
    redone = run_experiment(load_experiment(path), report_only=True, log=lambda s: None)
    assert redone["trained_wall_time_s"] == pytest.approx(again["wall_time_s"])
    assert f"from an invocation that took {again['wall_time_s']:.0f} s" in (out / "report.md").read_text()
    # A run trained again (newer final/summary.json) gets evaluated and measured again: no stale numbers.
    summary = out / "mlm" / "final" / "summary.json"
    os.utime(summary, ns=(summary.stat().st_atime_ns, (out / "eval_mlm.json").stat().st_mtime_ns + 10**9))
    run_experiment(load_experiment(path), log=lambda s: None)
    assert (out / "eval_mlm.json").stat().st_mtime_ns >= summary.stat().st_mtime_ns
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before  # dwml untouched
    # Another configuration for an existing run directory is refused, not silently reused or retrained.
    changed = write(tmp_path, text.replace("lr = 3e-3", "lr = 1e-3"), "changed.toml")
    with pytest.raises(DwmlError, match=r"mlm/config.toml: run 'mlm' was started with another configuration"):
        run_experiment(load_experiment(changed), log=lambda s: None)
    # The CLI: report only, and a dry run with the compute estimate.
    assert main(["experiment", str(path), "--report-only"]) == 0
    assert main(["experiment", str(path), "--dry-run"]) == 0
    from dwml.experiments.experiment import estimate

    planned = {r["name"]: r for r in estimate(load_experiment(path))["runs"]}
    trained = json.loads(summary.read_text())["exposure"]
    assert planned["mlm"]["words"] == trained["words_seen"] and round(planned["mlm"]["epochs"], 4) == trained["epochs"]
    assert main(["experiment", str(tmp_path / "missing.toml")]) == 2


def test_parse_experiment_defaults():
    cfg = parse_experiment({"runs": [{"name": "a", "method": "mlm"}]}, "x")
    assert cfg.eval.tasks == ["blimp_filtered", "blimp_supplement", "ewok"] and not cfg.finetune.enabled
    assert (cfg.eval.precision, cfg.eval.ewok_pairing) == ("fp32", "targets")  # BabyLM-comparable by default
    assert cfg.search is None and cfg.sweep is None and cfg.out_dir == "runs/experiment"
    with pytest.raises(DwmlError, match=r"x: runs: expected at least one"):
        parse_experiment({}, "x")


def test_ablation_config_sweeps_the_unroll(tmp_path):
    """The unroll ablation axis: adamw (= dwml itself), sgd and direct (mixed term dropped) are separate runs."""
    cfg = load_experiment(REPO / "configs" / "ablation-tiny.toml")
    archs = [dict(a, vocab_size=cfg.prepare.vocab_size) for a in (ARCHS * 2)[:cfg.search.peers]]
    by = {p.name: p for p in plan_runs(cfg, tmp_path, tmp_path / "data", archs)}
    assert by["dwml"].config.distill.unroll == "adamw" and by["dwml-unrolladamw"].alias_of == "dwml"
    for unroll in ("sgd", "direct"):
        plan = by[f"dwml-unroll{unroll}"]
        assert plan.alias_of is None and plan.config.distill.unroll == unroll
        assert plan.sweep == {"base": "dwml", "axis": "unroll", "value": unroll}
        assert axis_values(plan, 4)["unroll"] == unroll  # a string axis reaches the report's sweep points


def test_data_stats_compute_the_unigram_entropy_once_for_all_sequence_lengths(tiny_prepared, monkeypatch):
    """Data prepared before meta.json held `unigram_entropy` gets it from the train shard: once per prepared
    directory, not once per sequence length of the experiment's runs."""
    import dwml.data.entropy
    import dwml.data.shards
    from dwml.experiments.collect import data_stats

    meta = dwml.data.shards.load_meta(tiny_prepared)
    older = {k: v for k, v in meta.items() if k != "unigram_entropy"}
    monkeypatch.setattr(dwml.data.shards, "load_meta", lambda prepared: dict(older))
    calls = []
    entropy = dwml.data.entropy.unigram_entropy
    monkeypatch.setattr(dwml.data.entropy, "unigram_entropy", lambda *a: calls.append(1) or entropy(*a))
    stats = data_stats(tiny_prepared, [32, 16, 32])
    assert list(stats) == [32, 16] and len(calls) == 1
    assert stats[32]["unigram_entropy"] == stats[16]["unigram_entropy"] == pytest.approx(meta["unigram_entropy"])
    assert stats[16]["train_sequences"] > stats[32]["train_sequences"]


def test_prepare_section_speaker_tags_reach_the_data_and_its_reuse_check(tmp_path):
    from dwml.experiments.stages import ensure_data
    from runfixtures import synthetic_corpus

    corpus = synthetic_corpus(tmp_path / "corpus", n_lines=60)

    def cfg(tags: bool):
        return parse_experiment({"prepare": {"inputs": [str(corpus)], "vocab_size": 300, "speaker_tags": tags},
                                 "runs": [{"name": "a", "method": "mlm"}]}, "x")

    logs: list[str] = []
    prepared = ensure_data(cfg(True), tmp_path / "exp", logs.append)
    assert json.loads((prepared / "meta.json").read_text())["speaker_tags"]
    assert any(x.startswith("A: ") for x in (prepared / "train.txt").read_text().splitlines())
    assert ensure_data(cfg(True), tmp_path / "exp", logs.append) == prepared  # reused as it is
    with pytest.raises(DwmlError, match="speaker_tags True there, False asked"):
        ensure_data(cfg(False), tmp_path / "exp", logs.append)
