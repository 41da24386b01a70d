"""BabyLM exposure: words seen per step against a brute-force count over the real stream, the track's budget
before training, and milestone checkpoints that a killed and resumed run writes once and identically."""
import json

import pytest
from transformers import AutoModelForMaskedLM

from dwml.cli import main
from dwml.data.masking import BatchStream
from dwml.data.shards import PackedSequences, load_meta
from dwml.data.words import sequence_words, split_words, word_start_table
from dwml.errors import DwmlError
from dwml.training import exposure as exp
from dwml.training.train import Interrupted, train

from runfixtures import make_cfg


def test_sequence_words_equal_the_whitespace_words_of_the_documents(tiny_prepared):
    """len(text.split()) per document, summed, is meta.json's count; packing (documents cut into pieces across
    sequences) counts every word exactly once."""
    meta = load_meta(tiny_prepared)
    for split in ("train", "valid"):
        for seq_len in (16, 32, 128):
            words = split_words(tiny_prepared, split, seq_len, int(meta["vocab_size"]))
            assert int(words.sum()) == meta["splits"][split]["words"]
    text = (tiny_prepared / "train.txt").read_text(encoding="utf-8").splitlines()
    assert sum(len(line.split()) for line in text) == meta["splits"]["train"]["words"]


@pytest.mark.parametrize("world_size,grad_accum", [(1, 1), (2, 3)])
def test_words_after_each_step_match_the_stream(tiny_prepared, world_size, grad_accum):
    """Exposure.words_after(step) = the words of the sequences that every rank's stream delivered, over epochs."""
    meta = load_meta(tiny_prepared)
    seqs = PackedSequences(tiny_prepared, "train", 32)
    words = sequence_words(seqs, word_start_table(tiny_prepared / "tokenizer" / "tokenizer.json",
                                                  int(meta["vocab_size"])))
    streams = [BatchStream(seqs, 7, seed=5, rank=r, world_size=world_size, vocab_size=int(meta["vocab_size"]))
               for r in range(world_size)]
    steps = 3 * streams[0].batches_per_epoch // grad_accum + 2  # crosses epoch boundaries
    e = exp.Exposure(words, streams[0], grad_accum, steps, meta["splits"]["train"]["words"])
    seen = 0
    for step in range(1, steps + 1):
        for s in streams:
            for _ in range(grad_accum):
                idx = s._indices(s.epoch, s._cursor)
                seen += int(words[idx].sum())
                next(s)
        assert e.words_after(step) == seen
    assert e.epochs_after(steps) == pytest.approx(seen / meta["splits"]["train"]["words"])
    # a milestone is taken at the first step whose words reach it
    track = exp.Track(10**12, 99, (1, seen // 2, seen))
    stones = e.milestones(track)
    per_step = [e.words_after(s) for s in range(steps + 1)]
    for m in track.milestones:
        first = next(s for s in range(1, steps + 1) if per_step[s] >= m)
        assert exp.milestone_name(m) in stones[first]


def test_a_plan_over_the_budget_stops_before_training_with_the_numbers(tiny_prepared, tmp_path, capsys, monkeypatch):
    # 11 epochs of the tiny train split under the 10-epoch rule
    stream = BatchStream(PackedSequences(tiny_prepared, "train", 32), 8, seed=3, vocab_size=1000)
    steps = 11 * stream.batches_per_epoch
    cfg = make_cfg(tiny_prepared, tmp_path / "run", train={"babylm_track": "strict-small", "max_steps": steps})
    with pytest.raises(DwmlError, match=rf"{steps:,} steps see [\d,]+ words \(1[01]\.\d\d epochs of [\d,]+ train "
                                        r"words\); the track allows 100,000,000 words and 10 epochs"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a teacher whose words push the total past the cap
    taught = train(make_cfg(tiny_prepared, tmp_path / "teacher", train={"max_steps": 6}))["exposure"]["words_seen"]
    cap = taught * 3 // 2  # the student alone (6 steps of the same batch size) fits; with its teacher it does not
    monkeypatch.setitem(exp.TRACKS, "strict-small", exp.Track(cap, 10, ()))
    argv = ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "kd"), "--method", "kd",
            "--teacher", str(tmp_path / "teacher"), "--max-steps", "6",
            "--set", "train.babylm_track=strict-small", "--set", "train.batch_size=8", "--set", "data.seq_len=32",
            "--set", "model.preset=tiny", "--set", "train.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"+ the teacher's {taught:,}" in err and f"the track allows {cap:,} words" in err
    assert main(argv + ["--set", "distill.teacher_words=0"]) == 0  # a teacher declared as trained on no words


def _milestone_files(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted((run / "chck").rglob("*")) if p.is_file()}


def test_milestones_are_written_once_and_identical_after_a_kill(tiny_prepared, tmp_path, monkeypatch):
    """A track run writes RUN/chck/chck_<n>M/ at the first step reaching each milestone (a loadable HF folder plus
    milestone.json); killed between two milestones and resumed, it writes the same folders, byte for byte."""
    monkeypatch.setattr(exp, "MILLION", 1)  # milestones of 250, 500, ... words: reachable by a tiny run
    monkeypatch.setitem(exp.TRACKS, "strict-small", exp.Track(10**8, 100, tuple(range(250, 2501, 250))))
    extra = {"train": {"babylm_track": "strict-small"}}
    whole = train(make_cfg(tiny_prepared, tmp_path / "whole", **extra))
    reached = whole["exposure"]["milestones"]
    assert len(reached) >= 3 and (tmp_path / "whole" / "chck").is_dir()
    for name, step in reached.items():
        record = json.loads((tmp_path / "whole" / "chck" / name / "milestone.json").read_text())
        assert record["step"] == step and record["words_seen"] >= int(name[5:-1])
        AutoModelForMaskedLM.from_pretrained(tmp_path / "whole" / "chck" / name)
    steps = sorted(set(reached.values()))
    kill_after = next(s for s in (6,) if steps[0] < s < steps[-1])  # save_every 6: between two milestones
    with pytest.raises(Interrupted):
        train(make_cfg(tiny_prepared, tmp_path / "killed", **extra), stop_after=kill_after)
    partial = sorted(p.name for p in (tmp_path / "killed" / "chck").iterdir())
    assert 0 < len(partial) < len(reached)
    resumed = train(make_cfg(tiny_prepared, tmp_path / "killed", **extra))
    assert resumed["exposure"] == whole["exposure"]
    assert _milestone_files(tmp_path / "killed") == _milestone_files(tmp_path / "whole")
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert any("words_seen" in r for r in lines)
    assert not any(p.name.endswith(".dwmltmp") for p in (tmp_path / "killed" / "chck").rglob("*"))
    # `dwml export RUN --checkpoints` gathers them with the final model and writes the upload script
    out = tmp_path / "babylm"
    assert main(["export", str(tmp_path / "whole"), "--checkpoints", "--out", str(out), "--repo", "me/tiny"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([*reached, "final"])
    for name in reached:
        assert json.loads((out / name / "milestone.json").read_text())["step"] == reached[name]
        AutoModelForMaskedLM.from_pretrained(out / name)
    script = (out / "upload.py").read_text()
    compile(script, "upload.py", "exec")
    assert "create_branch" in script and all(repr(n) in script for n in reached) and "'me/tiny'" in script
    assert "words seen:" in (out / "final" / "README.md").read_text()
