"""configs/gpu-compare-9min.toml end to end on the CPU, shrunk to seconds with `dwml experiment --set` overrides:
the same stages (search, mlm + dwml, full-set evaluation files, report with the paired bootstrap vs MLM)."""
import json
from pathlib import Path


from dwml.cli import main
from dwml.experiments.config import load_experiment
from dwml.experiments.plan import plan_runs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpu-compare-9min.toml"


def test_gpu_config_as_written(tmp_path):
    """The config loads and plans as described (the run below shrinks it; this checks the sizes as written)."""
    cfg = load_experiment(CONFIG)
    assert cfg.prepare.vocab_size == 16384 and cfg.search.reference == "base" and cfg.search.peers == 4
    assert [(r.name, r.method, r.peers) for r in cfg.runs] == [("mlm", "mlm", 1), ("dwml", "dwml", 0)]
    assert cfg.eval.tasks == ["blimp_filtered", "blimp_supplement", "ewok"] and cfg.eval.limit == 0
    archs = [{"layers": 5, "heads": 12, "hidden": 768, "intermediate": 3072, "vocab_size": 16384,
              "family": "modernbert"}] * 4
    plans = plan_runs(cfg, tmp_path, tmp_path / "data", archs)
    steps = {(p.config.train.max_steps, p.config.train.batch_size, p.config.data.seq_len) for p in plans}
    assert steps == {(360, 256, 128)}  # equal tokens per student: 11.8M
    assert all(p.config.model.dropout == 0.0 and p.config.train.schedule == "linear" for p in plans)
    assert all(p.config.model.family == "modernbert" for p in plans)


def test_gpu_config_end_to_end_shrunk(tiny_corpus, tmp_path, shared_data):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"layers": 2, "heads": 2, "hidden": 32, "intermediate": 64}))
    out = tmp_path / "gpu"
    sets = [f"out_dir={json.dumps(str(out))}", f"prepare.inputs=[{json.dumps(str(tiny_corpus))}]",
            "prepare.vocab_size=1000",
            f"search.reference={json.dumps(str(ref))}", "search.layers=[1, 2]", "search.heads=[1, 2]",
            "search.head_dim=[8, 16]", "search.head_dim_step=8", "search.init_points=2", "search.n_iter=2",
            "base.data.seq_len=64", "base.data.heldout_sequences=8", "base.train.max_steps=4",
            "base.train.batch_size=4", "base.train.warmup_steps=1", "base.train.eval_every=2",
            "base.train.eval_batches=1", "base.train.progress=false", "base.distill.outer_every=2", "eval.limit=1"]
    assert main(["experiment", str(CONFIG)] + [x for s in sets for x in ("--set", s)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["dwml"]["n_students"] == 4 and runs["mlm"]["n_students"] == 1
    assert set(runs["mlm"]["models"][0]["zero_shot"]) == {"blimp_filtered", "blimp_supplement", "ewok"}
    assert results["data"]["unigram_entropy"] > 0
    sig = results["significance"]
    assert sig["reference"] == {"run": "mlm", "model": "peer0"}
    assert {(r["model"], r["task"]) for r in sig["rows"]} == {
        (m, t) for m in (runs["dwml"]["best"], "ensemble") for t in ("blimp_filtered", "blimp_supplement", "ewok")}
    report = (out / "report.md").read_text()
    assert "Differences vs MLM" in report and "Exceeds noise" in report and "Plateau exit" in report
    assert "Unigram entropy of the train split" in report
