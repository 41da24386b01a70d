"""The training loop on real (tiny) data: learning, exact resume, every method, DML/MLM equivalence, bad input."""
import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from dwml.cli import main
from dwml.config import merge
from dwml.errors import DwmlError
from dwml.training.train import Interrupted, train

from runfixtures import PEERS, make_cfg

def _final_weights(run_dir, peer=0):
    model = AutoModelForMaskedLM.from_pretrained(run_dir / "final" / f"peer{peer}")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_mlm_learns_and_exports_hf_model(tiny_prepared, tmp_path):
    cfg = make_cfg(tiny_prepared, tmp_path / "run", train={"max_steps": 30, "eval_every": 30, "save_every": 30})
    summary = train(cfg)
    assert summary["peers"][0]["valid_loss"] < summary["initial_valid_loss"][0] - 0.3
    run = tmp_path / "run"
    assert (run / "config.toml").is_file() and (run / "metrics.jsonl").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in r for r in records) and records[0]["step"] == 0
    assert all(r["data_wait_s"] >= 0 for r in records if "tokens_per_s" in r)
    model = AutoModelForMaskedLM.from_pretrained(run / "final" / "peer0")
    tok = AutoTokenizer.from_pretrained(run / "final" / "peer0")
    enc = tok(["the dog is <mask> ."], return_tensors="pt")
    assert model(**enc).logits.shape[-1] == len(tok)
    assert json.loads((run / "final" / "summary.json").read_text())["method"] == "mlm"


@pytest.mark.parametrize("method", ["mlm", "dwml"])
def test_killed_run_resumes_exactly(tiny_prepared, tmp_path, method):
    extra = {"train": {"method": method}}
    if method == "dwml":
        extra["model"] = {"peers": PEERS}
    whole = train(make_cfg(tiny_prepared, tmp_path / "whole", **extra))
    with pytest.raises(Interrupted):
        train(make_cfg(tiny_prepared, tmp_path / "killed", **extra), stop_after=6)
    assert not (tmp_path / "killed" / "final").exists()
    resumed = train(make_cfg(tiny_prepared, tmp_path / "killed", **extra))
    assert resumed["peers"] == whole["peers"]  # validation losses identical to the last bit
    assert resumed["initial_valid_loss"] == whole["initial_valid_loss"]
    assert resumed["omega"] == whole["omega"]
    for peer in range(len(whole["peers"])):
        a, b = _final_weights(tmp_path / "whole", peer), _final_weights(tmp_path / "killed", peer)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # The metrics log has no duplicated steps after the resume.
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(line)]
    assert steps == sorted(set(steps))


def test_prefetching_changes_nothing(tiny_prepared, tmp_path):
    """Batches built ahead in a thread (data.prefetch) train exactly as batches built on demand."""
    extra = {"model": {"peers": PEERS}, "train": {"method": "dwml", "max_steps": 6, "eval_every": 6}}
    a = train(make_cfg(tiny_prepared, tmp_path / "sync", data={"prefetch": 0}, **extra))
    b = train(make_cfg(tiny_prepared, tmp_path / "ahead", data={"prefetch": 3}, **extra))
    assert a["peers"] == b["peers"] and a["omega"] == b["omega"] and a["train_tokens"] == b["train_tokens"]


def test_dml_with_alpha0_equals_independent_mlm(tiny_prepared, tmp_path):
    # Adam is invariant to the 1/M loss scale when eps is negligible and there is no clipping; with no dropout and
    # the same seeds, DML (alpha = 0, omega = 1/2) must follow exactly the trajectories of independent MLM training.
    common = {"model": {"peers": PEERS, "dropout": 0.0}, "train": {"grad_clip": 0.0, "eps": 1e-30}}
    dml = train(make_cfg(tiny_prepared, tmp_path / "dml", **merge(common, {"train": {"method": "dml"},
                                                                            "distill": {"alpha": 0.0}})))
    mlm = train(make_cfg(tiny_prepared, tmp_path / "mlm", **merge(common, {"train": {"method": "mlm"}})))
    for a, b in zip(dml["peers"], mlm["peers"]):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5, abs=1e-5)
    assert dml["omega"] == [0.5, 0.5]
    # ... and distillation (alpha > 0) really changes the training.
    dml_kd = train(make_cfg(tiny_prepared, tmp_path / "dml5", **merge(common, {"train": {"method": "dml"},
                                                                               "distill": {"alpha": 0.5}})))
    assert abs(dml_kd["peers"][0]["valid_loss"] - mlm["peers"][0]["valid_loss"]) > 1e-4


def test_every_method_trains(tiny_prepared, tmp_path):
    teacher_run = tmp_path / "teacher"
    train(make_cfg(tiny_prepared, teacher_run, train={"max_steps": 6}))
    cases = {
        "kd": {"distill": {"teacher": str(teacher_run)}},
        "sd": {"model": {"layers": 2}},
        "dml": {"model": {"peers": PEERS}},
        "dwml": {"model": {"peers": PEERS}, "distill": {"hypergrad": "double_backward"}},
        "kd_dwml": {"model": {"peers": PEERS}, "distill": {"teacher": str(teacher_run)}},
    }
    for method, extra in cases.items():
        summary = train(make_cfg(tiny_prepared, tmp_path / method, **merge(extra, {"train": {
            "method": method, "max_steps": 6, "save_every": 6, "eval_every": 6}})))
        losses = [p["valid_loss"] for p in summary["peers"]]
        assert all(torch.isfinite(torch.tensor(losses))), method
        assert all(v < i for v, i in zip(losses, summary["initial_valid_loss"])), method
        omega = summary["omega"]
        assert abs(sum(omega) - 1) < 1e-9
        if method in ("dwml", "kd_dwml"):
            assert omega != [0.5, 0.5], method  # learned by the outer steps
        # sd exports only the full model (no auxiliary heads in the HF folder)
        if method == "sd":
            keys = _final_weights(tmp_path / method).keys()
            assert not any("aux" in k or "heads" in k for k in keys)


def test_kd_dwml_outer_step_reuses_the_inner_steps_teacher_logits(tiny_prepared, tmp_path, monkeypatch):
    """The outer step unrolls the inner step on the head of the step's last micro-batch with the teacher logits that
    step computed (sliced to the head's masked positions): one teacher forward per micro-batch, none of its own."""
    import dwml.training.train as train_mod
    from dwml.models.model import masked_logits

    teacher_run = tmp_path / "teacher"
    train(make_cfg(tiny_prepared, teacher_run, train={"max_steps": 2, "eval_every": 2, "save_every": 2}))
    forwards, outer = [], []
    real_teacher, real_hypergradient = train_mod.Trainer.teacher_logits, train_mod.hypergradient

    def teacher_logits(self, batch):
        forwards.append(batch)
        return real_teacher(self, batch)

    def hypergradient(models, inner, held, omega, **kw):
        outer.append((inner, kw["teacher_logits"]))
        return real_hypergradient(models, inner, held, omega, **kw)

    monkeypatch.setattr(train_mod.Trainer, "teacher_logits", teacher_logits)
    monkeypatch.setattr(train_mod, "hypergradient", hypergradient)
    train(make_cfg(tiny_prepared, tmp_path / "kd_dwml", model={"peers": PEERS},
                   train={"method": "kd_dwml", "max_steps": 4, "grad_accum": 2, "eval_every": 4, "save_every": 4},
                   distill={"teacher": str(teacher_run), "outer_every": 2, "teacher_weight": 0.5}))
    assert len(forwards) == 8 and len(outer) == 2  # 4 steps x 2 micro-batches; 2 outer steps
    teacher = AutoModelForMaskedLM.from_pretrained(teacher_run / "final" / "peer0").eval()
    for inner, logits in outer:
        assert inner.input_ids.shape[0] < forwards[0].input_ids.shape[0]  # the head of the micro-batch
        with torch.no_grad():
            fresh = masked_logits(teacher, inner.input_ids, inner.attention_mask, inner.positions)
        torch.testing.assert_close(logits, fresh, rtol=1e-4, atol=1e-5)


def test_bad_training_input(tiny_prepared, tmp_path):
    with pytest.raises(DwmlError, match="needs at least 2 peers"):
        train(make_cfg(tiny_prepared, tmp_path / "a", train={"method": "dwml"}))
    with pytest.raises(DwmlError, match="not a model directory"):
        train(make_cfg(tiny_prepared, tmp_path / "b", train={"method": "kd"}, distill={"teacher": str(tmp_path)}))
    with pytest.raises(DwmlError, match="meta.json|prepared|not found|No such"):
        train(make_cfg(tmp_path / "nowhere", tmp_path / "c"))


def test_teacher_with_other_vocabulary_is_refused(tiny_prepared, tiny_corpus, tmp_path):
    from dwml.data.prepare import prepare

    other = tmp_path / "other_data"
    prepare([tiny_corpus], other, vocab_size=600, valid_fraction=0.02, seed=0)
    train(make_cfg(other, tmp_path / "teacher", train={"max_steps": 2, "save_every": 2, "eval_every": 2}))
    with pytest.raises(DwmlError, match="different tokenizer"):
        train(make_cfg(tiny_prepared, tmp_path / "kd", train={"method": "kd"},
                       distill={"teacher": str(tmp_path / "teacher")}))


def test_cli_errors_exit_2(tiny_prepared, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_prepared), "--set", "train.max_stepz=3"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_prepared), "--set", "distill.alpha=2"]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmethod = 'dwml'\n[distill]\nouter_every = 0\n")
    assert main(["train", str(bad)]) == 2
    assert "outer_every" in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported(tiny_prepared, tmp_path, capsys):
    cfg = make_cfg(tiny_prepared, tmp_path / "run")
    with pytest.raises(Interrupted):
        train(cfg, stop_after=6)
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(DwmlError, match="corrupt or unreadable checkpoint"):
        train(cfg)


def test_grad_accumulation_equals_one_big_batch(tiny_prepared, tmp_path):
    # Micro-batches are weighted by their share of masked tokens, so 2 x 8 accumulated == 16 at once.
    nodrop = {"model": {"dropout": 0.0}, "train": {"max_steps": 6, "save_every": 6, "eval_every": 6}}
    train(make_cfg(tiny_prepared, tmp_path / "big", **merge(nodrop, {"train": {"batch_size": 16}})))
    train(make_cfg(tiny_prepared, tmp_path / "acc", **merge(nodrop, {"train": {"batch_size": 8, "grad_accum": 2}})))
    a, b = _final_weights(tmp_path / "big"), _final_weights(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_every_method_reports_on_the_same_valid_sequences(tiny_prepared, tmp_path):
    """The held-out slice for DWML's L2 is left out of the reporting set of every run, not only of learned-omega
    runs: an mlm and a dwml run of one experiment report validation loss on identical sequences and masks, and none
    of them is an L2 sequence."""
    from dwml.training.runtime import Runtime
    from dwml.data.shards import PackedSequences, load_meta
    from dwml.training.setup import make_batches

    rt = Runtime(torch.device("cpu"), None)
    vocab = int(load_meta(tiny_prepared)["vocab_size"])
    mlm = make_cfg(tiny_prepared, tmp_path / "mlm", train={"eval_batches": 100})
    dwml = make_cfg(tiny_prepared, tmp_path / "dwml", train={"method": "dwml", "eval_batches": 100},
                    model={"peers": PEERS})
    a = make_batches(mlm, tiny_prepared, vocab, rt, need_heldout=False)
    b = make_batches(dwml, tiny_prepared, vocab, rt, need_heldout=True)
    assert a.heldout is None and b.heldout is not None
    assert len(a.valid) == len(b.valid) > 0
    for x, y in zip(a.valid, b.valid):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.positions, y.positions)
        assert torch.equal(x.labels, y.labels)
    # eval_batches is large enough for the whole reporting set: every valid sequence except the held-out ones
    n_valid = len(PackedSequences(tiny_prepared, "valid", mlm.data.seq_len))
    n_held = len(b.heldout.sequences)
    assert 0 < n_held < n_valid
    assert sum(vb.input_ids.shape[0] for vb in a.valid) == n_valid - n_held


@pytest.mark.parametrize("change", ["tokenizer", "teacher"])
def test_resume_refuses_other_inputs_than_the_run_started_with(tiny_corpus, tiny_prepared, tmp_path, capsys, change):
    """A checkpoint records the tokenizer, prepared-data and teacher fingerprints: re-preparing the data in place
    with another tokenizer of the same size (or replacing a KD teacher's weights) stops the resume with one line,
    instead of resuming with exit 0 and exporting weights trained on other ids."""
    import shutil

    from conftest import TINY_VOCAB
    from dwml.data.prepare import prepare

    prepared = tmp_path / "data"
    shutil.copytree(tiny_prepared, prepared)
    extra = {}
    if change == "teacher":
        train(make_cfg(prepared, tmp_path / "teacher", train={"max_steps": 6}))
        extra = {"train": {"method": "kd"}, "distill": {"teacher": str(tmp_path / "teacher")}}
    cfg = make_cfg(prepared, tmp_path / "run", **extra)
    with pytest.raises(Interrupted):
        train(cfg, stop_after=6)
    if change == "tokenizer":
        prepare([tiny_corpus], prepared, vocab_size=TINY_VOCAB, valid_fraction=0.02, seed=0, lowercase=True,
                overwrite=True)
        assert json.loads((prepared / "meta.json").read_text())["vocab_size"] == TINY_VOCAB
    else:
        weights = tmp_path / "teacher" / "final" / "peer0" / "model.safetensors"
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        save_file({k: v + 0.01 for k, v in state.items()}, weights, metadata={"format": "pt"})
    assert main(["train", str(tmp_path / "run" / "config.toml")]) == 2
    err = capsys.readouterr().err
    what = "tokenizer" if change == "tokenizer" else "teacher model"
    assert f"this run started with another {what}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("separator", ["eos", "newline"])
def test_exported_tokenizer_reads_a_line_break_as_the_run_learnt_it(tiny_prepared, tmp_path, separator):
    """data.separator = "eos": every corpus line ended with </s>, so the exported tokenizer reads "\n" as </s>; a
    "newline" model learnt the newline token and keeps it. The summary records the exported fingerprint, which
    `dwml eval` and `dwml export` check the model folders against."""
    from dwml.checks import tokenizer_fingerprint
    from dwml.data.tokenizer import newline_id, reads_line_ends
    from dwml.evaluation.evaluate import find_models

    run = tmp_path / "run"
    train(make_cfg(tiny_prepared, run, data={"separator": separator},
                   train={"max_steps": 4, "eval_every": 4, "save_every": 4}))
    final, eos = run / "final", separator == "eos"
    summary = json.loads((final / "summary.json").read_text())
    assert summary["tokenizer_line_ends"] is eos and reads_line_ends(final / "peer0") is eos
    assert summary["export_tokenizer_sha256"] == tokenizer_fingerprint(final / "peer0")
    assert (summary["export_tokenizer_sha256"] != summary["tokenizer_sha256"]) is eos
    ids = AutoTokenizer.from_pretrained(final / "peer0")("the cat sat.\nthe dog ran.")["input_ids"]
    assert ids.count(2) == (2 if eos else 1) and (newline_id(tiny_prepared / "tokenizer") in ids) is not eos
    plain, exported = (AutoTokenizer.from_pretrained(d) for d in (tiny_prepared / "tokenizer", final / "peer0"))
    assert exported("the cat sat.")["input_ids"] == plain("the cat sat.")["input_ids"]
    assert len(find_models(run)[0]) == 1  # the folders pass the tokenizer check of dwml eval
