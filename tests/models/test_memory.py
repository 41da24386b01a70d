"""The memory estimate (`dwml.models.memory`): exact weight / gradient / AdamW terms, an upper bound (within 10x) of
steps measured by the profiler, and refusals in one line before anything is allocated (absurd peers, a tiny
$DWML_MEMORY_LIMIT, an absurd model folder)."""
import json
import shutil
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dwml.cli import main
from dwml.errors import DwmlError
from dwml.models import memory
from dwml.models.model import Arch

from runfixtures import make_cfg

ABSURD = {"layers": 1000, "heads": 16, "hidden": 65536, "intermediate": 262144}


@pytest.fixture(autouse=True)
def _no_limit_override(monkeypatch):
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)


def peak_bytes(fn) -> int:
    """The peak of CPU tensor memory allocated (minus freed) while `fn` runs, from the profiler's memory events in
    time order: deterministic for a deterministic `fn` (no allocator caching on the CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family,method", [("roberta", "mlm"), ("modernbert", "mlm"), ("roberta", "sd")])
def test_weight_gradient_and_optimizer_terms_equal_real_tensors(tmp_path, family, method):
    from dwml.training.setup import build_students, make_optimizer, resolve_archs

    cfg = make_cfg(tmp_path, tmp_path / "run", model={"family": family, "layers": 2, "intermediate": 96},
                   train={"method": method})
    archs = resolve_archs(cfg, 300)
    (student,) = build_students(cfg, archs, torch.device("cpu"))
    opt = make_optimizer(student, cfg.train)
    ids = torch.randint(5, 300, (2, 16))
    logits, aux = student(ids, torch.ones_like(ids), torch.arange(0, 32, 3))
    (logits.sum() + sum(z.sum() for z in aux)).backward()
    opt.step()
    est = memory.training_estimate(cfg, archs)
    params = list(student.parameters())
    state = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert est.terms["parameters"] == tensor_bytes(params)
    assert est.terms["gradients"] == tensor_bytes(p.grad for p in params)
    assert est.terms["optimizer"] == tensor_bytes(state)


CASES = {
    "roberta": dict(model={"layers": 2, "hidden": 64, "heads": 2, "intermediate": 256}, data={"seq_len": 64}),
    "modernbert": dict(model={"family": "modernbert", "layers": 2, "hidden": 64, "heads": 4, "intermediate": 192},
                       data={"seq_len": 64}),
    "dwml": dict(model={"peers": [{"layers": 2, "heads": 2, "hidden": 64, "intermediate": 256},
                                  {"layers": 1, "heads": 2, "hidden": 32, "intermediate": 128}]},
                 train={"method": "dwml", "batch_size": 16}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_bounds_measured_phases_within_10x(tiny_prepared, tmp_path, case):
    """Forward + loss + backward of one micro-batch (gradients allocated in it, as on the first step), validation and,
    for dwml, the outer step, each measured by the profiler on a real `Trainer`: each is below the estimate's phase
    (plus the gradients it allocates), and the estimate is less than 10x the measurement."""
    from dwml.training.runtime import compute_init
    from dwml.training.train import Trainer

    sections = CASES[case]
    cfg = make_cfg(tiny_prepared, tmp_path / "run", **{**sections, "data": {"prefetch": 0, **sections.get("data", {})}})
    run = Trainer(cfg, compute_init("cpu", 0, "fp32"))
    try:
        est = memory.training_estimate(cfg, run.archs)
        batch = next(run.batches.train)

        def step():
            outs = run.forward_all(batch, train_mode=True)
            run.loss_fn(outs, batch.labels, run.omega_device, None, cfg.distill)[0].backward()

        measured = {"activations": peak_bytes(step), "validation": peak_bytes(run.validate)}
        grads = tensor_bytes(p.grad for s in run.students for p in s.parameters())
        assert grads == est.terms["gradients"]
        if run.learn_omega:
            run.start_clock()
            stats = run.train_step()
            measured["outer_step"] = peak_bytes(lambda: run.outer_step(stats, run.lr()))
    finally:
        run.close()
    allowance = {"activations": grads}  # the first backward allocates the gradients: the estimate has them apart
    for phase, value in measured.items():
        assert value <= est.phases[phase] + allowance.get(phase, 0), (phase, value, est.phases[phase])
        assert est.phases[phase] < 10 * value, (phase, value, est.phases[phase])


def test_absurd_peers_are_refused_in_one_line_before_anything_is_allocated(tiny_prepared, tmp_path, monkeypatch,
                                                                            capsys):
    import dwml.training.setup as setup

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(setup, "build_model", no_build)
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"peers": [{"arch": ABSURD}, {"arch": {**ABSURD, "layers": 1}}]}))
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(tiny_prepared), "--out", str(run_dir), "--method", "dml", "--peers-file",
            str(peers), "--set", "train.progress=false"]
    start = time.perf_counter()
    assert main(argv) == 2
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("dwml: error: peer0 (1000 layers x 65536 hidden, 51.5T params) and 1 other model: needs ~")
    assert "for training at batch 32 x 128" in err and " available;" in err
    assert elapsed < 5, elapsed
    assert not run_dir.exists()  # the run lock's directory is removed again: nothing was written
    run_dir.mkdir()  # a directory that exists keeps exactly what it held
    (run_dir / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_a_tiny_memory_limit_refuses_a_normal_run(tiny_prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(memory.LIMIT_ENV, "1M")
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(tiny_prepared), "--out", str(run_dir), "--set", "train.progress=false",
            "--set", "model.layers=1", "--set", "train.batch_size=8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dwml: error: tiny (1 layers x 128 hidden, "), err
    assert "for training at batch 8 x 128, 1.0 MiB allowed by DWML_MEMORY_LIMIT;" in err
    assert not run_dir.exists()
    from dwml.training.setup import resolve_archs

    cfg = make_cfg(tiny_prepared, run_dir)  # the test suite's tiny runs need a few MB
    monkeypatch.setenv(memory.LIMIT_ENV, "512M")
    memory.check_training_memory(cfg, resolve_archs(cfg, 1000), "cpu")


def test_the_eval_loader_refuses_an_absurd_model_folder(tiny_prepared, tmp_path, monkeypatch):
    import transformers

    from dwml.evaluation.evaluate import load_masked_lm

    def no_load(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForMaskedLM, "from_pretrained", no_load)
    folder = tmp_path / "model"
    shutil.copytree(tiny_prepared / "tokenizer", folder)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "roberta", "num_hidden_layers": 1000, "num_attention_heads": 16, "hidden_size": 65536,
        "intermediate_size": 262144, "vocab_size": 1000, "max_position_embeddings": 130}))
    with pytest.raises(DwmlError) as e:
        load_masked_lm(folder)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{folder} (1000 layers x 65536 hidden, 51.5T params): needs ~")
    assert "to load and score batches of 8192 tokens" in message and " available;" in message
    monkeypatch.setenv(memory.LIMIT_ENV, "1K")  # fine-tuning's check, same folder, same way
    with pytest.raises(DwmlError, match=r"for fine-tuning at batch 32 x 128, 1.0 KiB allowed by DWML_MEMORY_LIMIT"):
        memory.check_folder_memory(folder, "cpu", batch=32, seq_len=128)


def test_limit_parsing_and_sources(monkeypatch):
    assert memory.parse_size("8G") == 8 * 2**30 and memory.parse_size("512MiB") == 512 * 2**20
    assert memory.parse_size("1.5k") == 1536 and memory.parse_size("1000") == 1000
    assert memory.parse_size("off") is None
    with pytest.raises(DwmlError, match="DWML_MEMORY_LIMIT: expected"):
        memory.parse_size("lots")
    monkeypatch.setenv(memory.LIMIT_ENV, "2G")
    assert memory.memory_limit("cpu") == (2 * 2**30, "allowed by DWML_MEMORY_LIMIT")
    monkeypatch.delenv(memory.LIMIT_ENV)
    limit, source = memory.memory_limit("cpu")
    assert source == "available" and limit is not None and limit > 0


def test_a_teacher_and_ranks_count(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "run", train={"method": "kd"}, distill={"teacher": str(tmp_path)})
    student = [("tiny", Arch(layers=1, heads=2, hidden=32, intermediate=64, vocab_size=1000, max_positions=34))]
    teacher = Arch(layers=4, heads=4, hidden=128, intermediate=512, vocab_size=1000, max_positions=34)
    alone = memory.training_estimate(cfg, student)
    taught = memory.training_estimate(cfg, student, teacher=teacher)
    assert taught.terms["teacher"] == 4 * memory.count_params(teacher)
    assert taught.phases["activations"] > alone.phases["activations"]
    assert memory.training_estimate(cfg, student, world_size=2).terms["ddp_buckets"] == alone.terms["gradients"]


def test_dry_run_lists_the_memory_of_each_run():
    from dwml.experiments.experiment import format_estimate

    run = {"name": "mlm", "method": "mlm", "alias_of": None, "steps": 10, "tokens_per_student": 1000.0,
           "params": [1e6], "flops": 1e12, "gpu_hours": 0.1, "memory": "1.2 GiB"}
    text = format_estimate({"vocab_size": 1000, "mfu": 0.4, "peak_flops": 1e15, "runs": [run], "total_flops": 1e12,
                            "total_gpu_hours": 0.1, "memory_limit": "cpu: 20.0 GiB available"})
    assert "limit on this machine cpu: 20.0 GiB available" in text
    header = next(line for line in text.splitlines() if line.startswith("run "))
    row = next(line for line in text.splitlines() if line.startswith("mlm "))
    assert header.index("memory") + len("memory") == row.index("1.2 GiB") + len("1.2 GiB")  # right-aligned column
