"""Issue 12 probes (validation, non-finite training, tokenizer identity): every bad input ends in one line
`dwml: error: ...`, exit status 2, and nothing half-written. One small probe per case, CLI-level where possible."""
from __future__ import annotations

import errno
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dwml import checks
from dwml.cli import main
from dwml.models.model import Arch, build_model

ARCH = ["--set", "model.layers=1", "--set", "model.hidden=16", "--set", "model.heads=2",
        "--set", "model.intermediate=32"]
SMALL = ["--set", "data.seq_len=32", "--set", "train.batch_size=4", "--set", "train.eval_batches=1",
         "--set", "train.eval_batch_size=4", "--set", "train.progress=false", "--set", "train.warmup_steps=1"]


def train_args(prepared, out, *extra) -> list[str]:
    return ["train", "--method", "mlm", "--data", str(prepared), "--out", str(out), *ARCH, *SMALL, *extra]


def error_line(capsys) -> str:
    """The error of a failed command: its last stderr line, the only `dwml: error:` line, and no traceback
    (progress lines of the work done before it, e.g. eval's model names, may precede it)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("dwml: error: ")]
    assert errors == err[-1:] and not any("Traceback" in line for line in err), err
    return err[-1]


def leftovers(directory: Path) -> list[str]:
    """Hidden temporary siblings that an interrupted atomic write would leave."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def run(tiny_prepared, tmp_path_factory):
    """A finished 2-step mlm run (RUN/final/peer0 + a checkpoint) shared by the probes."""
    out = tmp_path_factory.mktemp("bad_input") / "run"
    assert main(train_args(tiny_prepared, out, "--max-steps", "2", "--set", "train.save_every=2")) == 0
    return out


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    """An eval data root with one 2-pair blimp_fast file."""
    root = tmp_path_factory.mktemp("evaldata")
    (root / "blimp_fast").mkdir()
    rows = [{"sentence_good": "the dog runs .", "sentence_bad": "the dog run .", "UID": "agr", "field": "syntax"},
            {"sentence_good": "a cat sleeps .", "sentence_bad": "a cat sleep .", "UID": "agr", "field": "syntax"}]
    (root / "blimp_fast" / "agr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def eval_args(model, data, *extra) -> list[str]:
    return ["eval", str(model), "--tasks", "blimp_fast", "--data-dir", str(data), "--device", "cpu", *extra]


def model_folder(path: Path, tokenizer_from: Path | None, vocab_size: int = 1000, nan: bool = False) -> Path:
    model = build_model(Arch(layers=1, heads=2, hidden=16, intermediate=32, vocab_size=vocab_size,
                             max_positions=34), seed=0)
    if nan:
        with torch.no_grad():
            model.roberta.embeddings.word_embeddings.weight[7].fill_(float("nan"))
    model.save_pretrained(path)
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, path / f.name)
    return path


# ---------------------------------------------------------------------------------------------- item 3: divergence


def nan_at(monkeypatch, bad_steps: set[int], method: str = "mlm"):
    """Make the loss NaN on the given (1-based) optimizer steps (batch_size 4, grad_accum 1: one call a step)."""
    from dwml.training import train as train_mod

    real = train_mod.METHOD_LOSSES[method]
    calls = {"n": 0}

    def loss(outs, labels, *rest):
        calls["n"] += 1
        value, parts = real(outs, labels, *rest)
        return (value * float("nan") if calls["n"] in bad_steps else value), parts

    monkeypatch.setitem(train_mod.METHOD_LOSSES, method, loss)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_prepared, tmp_path,
                                                                                  monkeypatch, capsys):
    nan_at(monkeypatch, {5})
    out = tmp_path / "run"
    rc = main(train_args(tiny_prepared, out, "--max-steps", "8", "--set", "train.save_every=2",
                         "--set", "train.log_every=3"))
    assert rc == 2
    line = error_line(capsys)
    assert "non-finite loss or gradient norm at step 5" in line
    assert not (out / "final").exists()  # nothing exported
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000002.pt", "step_00000004.pt"]  # detected at the log step 6, before step 6's save
    state = torch.load(out / "checkpoints" / ckpts[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["students"][0].values() if v.is_floating_point())


def test_nonfinite_steps_are_skipped_up_to_the_limit(tiny_prepared, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {2})
    out = tmp_path / "skip"
    args = train_args(tiny_prepared, out, "--max-steps", "3", "--set", "train.max_nonfinite_skips=1")
    assert main(args) == 0
    assert (out / "final" / "peer0" / "model.safetensors").is_file()
    nan_at(monkeypatch, {2, 3})
    assert main(train_args(tiny_prepared, tmp_path / "skip2", "--max-steps", "3",
                           "--set", "train.max_nonfinite_skips=1")) == 2
    assert "2 non-finite steps > train.max_nonfinite_skips=1" in error_line(capsys)


def test_nonfinite_dwml_stops_before_the_outer_step_logs(tiny_prepared, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {3}, "dwml")
    out = tmp_path / "dwml"
    peers = "[{layers=1,heads=2,hidden=16,intermediate=32},{layers=1,heads=2,hidden=8,intermediate=16}]"
    args = train_args(tiny_prepared, out, "--max-steps", "6", "--set", f"model.peers={peers}",
                      "--set", "distill.outer_every=4", "--set", "train.log_every=100", "--set", "train.save_every=5",
                      "--set", "data.heldout_sequences=8")
    args[args.index("mlm")] = "dwml"
    assert main(args) == 2
    assert "non-finite loss or gradient norm at step 3" in error_line(capsys)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0]  # step 4's outer step never ran, nothing non-finite was logged
    assert not (out / "final").exists() and not list(out.glob("checkpoints/*.pt"))


def test_guard_reads_the_first_bad_step_only_when_checked():
    guard = checks.NonFiniteGuard()
    for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan"), 1.0], 1):
        guard.observe(torch.tensor(loss), [torch.tensor(0.5)])
        assert guard.step_ok(step)  # no skipping and no decision per step in the default mode
    with pytest.raises(checks.DwmlError, match="at step 3"):
        guard.check()


def test_nan_weights_are_never_exported_and_nan_scores_are_an_error(run, tmp_path, eval_data, capsys):
    bad_run = tmp_path / "nanrun"
    shutil.copytree(run, bad_run)
    peer = bad_run / "final" / "peer0"
    model_folder(peer, None, nan=True)  # same tokenizer, NaN weights
    assert main(["export", str(bad_run), "--out", str(tmp_path / "hf")]) == 2
    assert "non-finite (NaN/inf) weights" in error_line(capsys)
    assert not (tmp_path / "hf").exists()
    assert main(eval_args(peer, eval_data, "--out", str(tmp_path / "e.json"))) == 2
    assert "sentence scores are NaN/inf" in error_line(capsys)
    assert not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------------------------------------- item 4: eval tokenizer


def test_eval_refuses_a_model_without_tokenizer_or_with_a_larger_one(run, tmp_path, eval_data, capsys):
    bare = model_folder(tmp_path / "bare", None)
    assert main(eval_args(bare, eval_data)) == 2
    assert "no tokenizer files" in error_line(capsys)
    small = model_folder(tmp_path / "small", run / "final" / "peer0", vocab_size=300)
    assert main(eval_args(small, eval_data)) == 2
    assert "more than the model's vocabulary of 300" in error_line(capsys)
    assert main(["finetune", str(small), "--tasks", "rte", "--device", "cpu"]) == 2
    assert "more than the model's vocabulary of 300" in error_line(capsys)


# ---------------------------------------------------------------------------------------------- item 7: data tokenizer


def copy_prepared(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_prepared_data_tokenizer_is_checked_before_training(tiny_prepared, tmp_path, capsys):
    meta = json.loads((tiny_prepared / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == checks.tokenizer_fingerprint(tiny_prepared / "tokenizer")
    no_tok = copy_prepared(tiny_prepared, tmp_path / "no_tok")
    shutil.rmtree(no_tok / "tokenizer")
    assert main(train_args(no_tok, tmp_path / "r1", "--max-steps", "1")) == 2
    assert "tokenizer missing from the prepared data" in error_line(capsys)
    assert not (tmp_path / "r1").exists()  # refused before any output

    swapped = copy_prepared(tiny_prepared, tmp_path / "swapped")
    tok = json.loads((swapped / "tokenizer" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, other ids: only the hash can tell
    (swapped / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    assert main(train_args(swapped, tmp_path / "r2", "--max-steps", "1")) == 2
    assert "differs from the one the data was prepared with" in error_line(capsys)
    assert not (tmp_path / "r2").exists()


def test_export_checks_the_tokenizer_hash_of_the_run(run, tmp_path, capsys):
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert summary["export_tokenizer_sha256"] == checks.tokenizer_fingerprint(run / "final" / "peer0")
    swapped = tmp_path / "swapped_run"
    shutil.copytree(run, swapped)
    tok_file = swapped / "final" / "peer0" / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    tok["normalizer"] = None  # e.g. a tokenizer without NFKC: same ids for ASCII, other ids elsewhere
    tok_file.write_text(json.dumps(tok))
    assert main(["export", str(swapped), "--out", str(tmp_path / "hf")]) == 2
    assert "tokenizer differs from the one" in error_line(capsys)
    assert not (tmp_path / "hf").exists()
    assert main(["eval", str(swapped), "--tasks", "blimp_fast", "--device", "cpu"]) == 2  # before any scoring
    assert "tokenizer differs from the one" in error_line(capsys)


# ---------------------------------------------------------------------------------------------- item 8: peers file


def test_peers_file_of_another_vocabulary_is_refused(tiny_prepared, tmp_path, capsys):
    peers = {"peers": [{"arch": {"layers": 1, "heads": 2, "hidden": 16, "intermediate": 32, "vocab_size": 8192,
                                 "max_positions": 34}},
                       {"arch": {"layers": 1, "heads": 2, "hidden": 8, "intermediate": 16, "vocab_size": 8192,
                                 "max_positions": 34}}]}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(peers))
    args = ["train", "--method", "dml", "--data", str(tiny_prepared), "--out", str(tmp_path / "r"),
            "--peers-file", str(path), *SMALL, "--max-steps", "1"]
    assert main(args) == 2
    assert "peers[0].arch.vocab_size: 8192, but this run needs 1000" in error_line(capsys)
    for p in peers["peers"]:
        p["arch"].update(vocab_size=1000, max_positions=130)
    path.write_text(json.dumps(peers))
    assert main(args) == 2
    assert "max_positions: 130, but this run needs 34" in error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_peers_file_is_read_once_when_a_run_resolves_its_peers(tiny_prepared, tmp_path, monkeypatch):
    """The architectures and the vocabulary/positions check come from one read and parse of the peers file."""
    from dwml.training.setup import resolve_archs
    from runfixtures import make_cfg

    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"peers": [{"arch": {"layers": 1, "heads": 2, "hidden": 16, "intermediate": 32}},
                                          {"arch": {"layers": 1, "heads": 2, "hidden": 8, "intermediate": 16,
                                                    "vocab_size": 1000}}]}))
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (reads.append(self), read_text(self, *a, **k))[1])
    archs = resolve_archs(make_cfg(tiny_prepared, tmp_path / "r", model={"peers_file": str(path)},
                                   train={"method": "dml"}), 1000)
    assert [(a.hidden, a.vocab_size, a.max_positions) for _, a in archs] == [(16, 1000, 34), (8, 1000, 34)]
    assert [r for r in reads if r.name == "peers.json"] == [path]


# ---------------------------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("setting, field", [
    ("train.eval_every=0", "train.eval_every"), ("train.save_every=0", "train.save_every"),
    ("train.log_every=0", "train.log_every"), ("model.dropout=1.5", "model.dropout"),
    ("train.beta1=1.0", "train.beta1"), ("train.beta2=-0.1", "train.beta2"), ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"), ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.weight_decay=-0.1", "train.weight_decay"), ("train.max_nonfinite_skips=-1", "train.max_nonfinite_skips"),
])
def test_out_of_range_config_values(tiny_prepared, tmp_path, capsys, setting, field):
    assert main(train_args(tiny_prepared, tmp_path / "r", "--set", setting)) == 2
    assert error_line(capsys).startswith(f"dwml: error: {field}: expected")
    assert not (tmp_path / "r").exists()


def test_set_errors_name_the_set_not_the_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nmax_steps = 5\n")
    assert main(["train", str(cfg), "--set", "train.bogus=1"]) == 2
    line = error_line(capsys)
    assert line.startswith("dwml: error: --set train.bogus=1: train: unknown key(s) ['bogus']") and "c.toml" not in line
    assert main(["train", str(cfg), "--set", "train.lr=fast"]) == 2
    assert error_line(capsys) == "dwml: error: --set train.lr=fast: train.lr: expected float, got 'fast'"
    cfg.write_text("[train]\nbogus = 5\n")
    assert main(["train", str(cfg)]) == 2
    assert str(cfg) in error_line(capsys)


def test_foreign_and_mismatched_checkpoints(run, tiny_prepared, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints").mkdir(parents=True)
    torch.save({"model": torch.zeros(3)}, foreign / "checkpoints" / "step_00000001.pt")
    assert main(train_args(tiny_prepared, foreign, "--max-steps", "3")) == 2
    assert "not a dwml checkpoint" in error_line(capsys)

    other = tmp_path / "other"
    shutil.copytree(run, other)
    shutil.rmtree(other / "final")
    assert main(train_args(tiny_prepared, other, "--max-steps", "3", "--set", "model.hidden=32")) == 2
    assert "model.hidden: 16 -> 32" in error_line(capsys)  # the config comparison of dwml.training.rundir
    # Same config, but a checkpoint holding two students for a one-student run (e.g. copied from a dml run).
    from dwml.training.checkpoint import state_checksum

    (ckpt,) = (other / "checkpoints").iterdir()
    state = torch.load(ckpt, weights_only=False)
    for key in ("students", "optimizers", "schedulers"):
        state[key] = state[key] * 2
    state["checksum"] = state_checksum(state)
    torch.save(state, ckpt)
    assert main(train_args(tiny_prepared, other, "--max-steps", "3")) == 2
    assert "checkpoint has 2 student(s), the config has 1" in error_line(capsys)
    assert not (other / "final").exists()


def test_meta_json_without_vocab_size(tiny_prepared, tmp_path, capsys):
    data = copy_prepared(tiny_prepared, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    del meta["vocab_size"]
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(train_args(data, tmp_path / "r", "--max-steps", "1")) == 2
    assert "field 'vocab_size' missing" in error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_non_utf8_eval_file_and_corrupt_ewok_zip_member(run, tmp_path, capsys):
    data = tmp_path / "evaldata"
    (data / "blimp_fast").mkdir(parents=True)
    (data / "blimp_fast" / "x.jsonl").write_bytes(b'{"sentence_good": "a", "sentence_bad": "b"}\n'
                                                 b'{"sentence_good": "\xff"}\n')
    assert main(eval_args(run, data)) == 2
    assert "x.jsonl:2: not valid UTF-8" in error_line(capsys)

    (data / "ewok").mkdir()
    zpath = data / "ewok" / "ewok_data_babylm.zip"
    row = json.dumps({"Context1": "it is hot .", "Context2": "it is cold .", "Target1": "she sweats ."}) + "\n"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ewok_fast/physics.jsonl", row * 50)
    raw = bytearray(zpath.read_bytes())
    info = zipfile.ZipFile(zpath).infolist()[0]
    start = info.header_offset + 30 + len(info.filename)  # the local header is 30 bytes + the name
    raw[start + 5] ^= 0xFF  # one flipped byte inside the compressed member
    zpath.write_bytes(bytes(raw))
    assert main(["eval", str(run), "--tasks", "ewok_fast", "--data-dir", str(data), "--device", "cpu"]) == 2
    assert "ewok_fast/physics.jsonl" in error_line(capsys)


def test_corrupt_safetensors(run, tmp_path, eval_data, capsys):
    bad = tmp_path / "bad_run"
    shutil.copytree(run, bad)
    st = bad / "final" / "peer0" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:200])
    assert main(eval_args(bad / "final" / "peer0", eval_data)) == 2
    assert "cannot load the model or tokenizer files" in error_line(capsys)
    assert main(["export", str(bad), "--out", str(tmp_path / "hf")]) == 2
    assert "cannot load the model or tokenizer files" in error_line(capsys)
    assert not (tmp_path / "hf").exists()


def test_out_dot_is_refused(run, tiny_corpus, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["prepare", str(tiny_corpus), "--out", "."]) == 2
    assert "is the current directory or holds it" in error_line(capsys)
    assert main(["export", str(run), "--out", ".."]) == 2
    assert "is the current directory or holds it" in error_line(capsys)
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EROFS, "read-only file system")])
def test_disk_full_and_read_only_file_system(run, tmp_path, monkeypatch, capsys, code, text):
    from dwml.experiments import export

    def full(path, *_):
        raise OSError(code, "simulated", str(path))

    monkeypatch.setattr(export, "write_text", full)
    parent = tmp_path / "outs"
    parent.mkdir()
    assert main(["export", str(run), "--out", str(parent / "hf")]) == 2
    line = error_line(capsys)
    assert text in line and "README.md" in line
    assert list(parent.iterdir()) == []  # no half-written folder, no temporary left behind


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_directory(run, tmp_path, capsys):  # pragma: no cover - needs a non-root user
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["export", str(run), "--out", str(ro / "hf")]) == 2
        assert "permission denied" in error_line(capsys)
    finally:
        ro.chmod(0o700)


def test_eval_and_finetune_out_naming_a_directory_fail_before_the_work(run, tmp_path, eval_data, monkeypatch,
                                                                      capsys):
    from dwml.evaluation import evaluate
    from dwml.evaluation import finetune

    def no_work(*a, **k):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(evaluate, "load_task", no_work)
    monkeypatch.setattr(finetune, "finetune_model", no_work)
    assert main(eval_args(run, eval_data, "--out", str(tmp_path))) == 2
    assert "is a directory" in error_line(capsys)
    assert main(["finetune", str(run / "final" / "peer0"), "--tasks", "rte", "--out", str(tmp_path)]) == 2
    assert "is a directory" in error_line(capsys)


# ---------------------------------------------------------------------------------------------- item 10


def test_vocab_clamp_notice_and_max_length(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the dog runs .\na cat sleeps .\n" * 30, encoding="utf-8")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "p"), "--vocab-size", "10000000"]) == 0
    err = capsys.readouterr().err
    vocab = json.loads((tmp_path / "p" / "meta.json").read_text())["vocab_size"]
    assert f"vocabulary clamped: --vocab-size 10000000 requested, but the corpus yields only {vocab}" in err
    for bad in ("0", "-5"):
        assert main(["prepare", str(corpus), "--out", str(tmp_path / "q"), "--max-length", bad]) == 2
        assert "--max-length: expected an integer >= 3" in error_line(capsys)
    assert not (tmp_path / "q").exists()


class _RecordingTokenizer:
    """Forwards to a real tokenizer and records the longest text it was asked to encode at once."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __setattr__(self, name, value):
        if name in ("tok", "longest"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.tok, name, value)

    def encode_batch(self, texts, **kw):
        self.longest = max(self.longest, max(map(len, texts)))
        return self.tok.encode_batch(texts, **kw)


def test_huge_line_is_encoded_in_bounded_pieces_with_identical_ids(tiny_prepared):
    from dwml.data.shards import encode_documents
    from dwml.data.tokenizer import MAX_PIECE_CHARS, load_raw

    tok = load_raw(tiny_prepared / "tokenizer")
    text = (tiny_prepared / "train.txt").read_text(encoding="utf-8")[:200_000].replace("\n", "  ")
    docs = ["a short one .", text, "x" * (MAX_PIECE_CHARS + 10), "the end ."]
    whole = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    rec = _RecordingTokenizer(tok)
    ids, offsets = encode_documents(rec, docs, max_batch_chars=50_000)
    assert rec.longest <= MAX_PIECE_CHARS  # no single encode of the 200k-character line
    got = [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(docs))]
    assert got[:2] == whole[:2] and got[3] == whole[3]  # cut at word boundaries: the same ids
    assert len(got[2]) == pytest.approx(len(whole[2]), abs=2)  # a hard cut inside one "word" may differ at the seam
    assert np.array_equal(offsets, np.concatenate([[0], np.cumsum([len(g) for g in got])]))


def test_disk_full_while_writing_a_checkpoint(tiny_prepared, tmp_path, monkeypatch, capsys):
    """A real ENOSPC (writes to /dev/full) in the middle of torch.save: one line, no checkpoint, no temp file."""
    import builtins

    from dwml.training import checkpoint

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    out = tmp_path / "run"
    assert main(train_args(tiny_prepared, out, "--max-steps", "2", "--set", "train.save_every=2")) == 2
    assert "no space left on the device" in error_line(capsys)
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "final").exists()
