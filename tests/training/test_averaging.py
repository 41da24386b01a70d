"""Weight averaging (train.ema_decay): the EMA against a naive loop, the swap, and a run that exports the average
and resumes it exactly."""
import json

import pytest
import torch
from transformers import AutoModelForMaskedLM

from dwml.training import exposure as exp
from dwml.errors import DwmlError
from dwml.training.averaging import WeightAverage, averages_for, ema_decay_at, load_averages
from dwml.training.checkpoint import list_checkpoints, load_checkpoint
from dwml.training.train import Interrupted, train

from runfixtures import PEERS, make_cfg


def test_ema_matches_a_naive_loop_with_the_warm_up():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    avg = WeightAverage(module, decay=0.9)
    ref = [p.detach().double().clone() for p in module.parameters()]
    for step in range(1, 31):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        avg.update()
        d = min(0.9, (1 + step) / (10 + step))  # written out, not through ema_decay_at
        ref = [d * r + (1 - d) * p.detach().double() for r, p in zip(ref, module.parameters())]
    assert [ema_decay_at(0.9, t) for t in (1, 2, 80, 81)] == [2 / 11, 3 / 12, 0.9, 0.9]
    for s, r in zip(avg.shadow, ref):
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-6)
    assert not all(torch.allclose(s, p) for s, p in zip(avg.shadow, module.parameters()))


def test_swap_holds_the_average_inside_and_restores_the_live_weights_bit_exact_even_on_errors():
    torch.manual_seed(1)
    module = torch.nn.Linear(4, 4)
    avg = WeightAverage(module, decay=0.5)
    with torch.no_grad():
        module.weight.mul_(3.0)
    avg.update()
    live = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with avg.swapped_in():
            assert all(torch.equal(p, s) for p, s in zip(module.parameters(), avg.shadow))
            raise RuntimeError("boom")
    assert all(torch.equal(p, v) for p, v in zip(module.parameters(), live))
    assert averages_for([module], 0.0) == []


def test_a_checkpoint_of_other_shapes_is_refused():
    avg = WeightAverage(torch.nn.Linear(2, 2), decay=0.9)
    other = WeightAverage(torch.nn.Linear(3, 2), decay=0.9)
    with pytest.raises(DwmlError, match="do not match"):
        avg.load_state_dict(other.state_dict())
    with pytest.raises(DwmlError, match="holds 2 averages, the run 1"):
        load_averages([avg], [avg.state_dict()] * 2)


@pytest.mark.parametrize("method", ["mlm", "dml"])
def test_the_run_exports_the_average_and_a_killed_run_resumes_it_exactly(tiny_prepared, tmp_path, method):
    extra = {"train": {"method": method, "ema_decay": 0.8}}
    if method == "dml":
        extra["model"] = {"peers": PEERS}
    whole = train(make_cfg(tiny_prepared, tmp_path / "whole", **extra))
    with pytest.raises(Interrupted):
        train(make_cfg(tiny_prepared, tmp_path / "killed", **extra), stop_after=6)
    resumed = train(make_cfg(tiny_prepared, tmp_path / "killed", **extra))
    assert resumed["peers"] == whole["peers"] and whole["ema_decay"] == 0.8

    state = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])
    for peer in range(len(whole["peers"])):
        a, b = (AutoModelForMaskedLM.from_pretrained(run / "final" / f"peer{peer}") for run in
                (tmp_path / "whole", tmp_path / "killed"))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        # The export is the average of the last checkpoint (its parameters in order), not its live weights.
        shadow = state["averages"][peer]["shadow"]
        exported = list(a.parameters())
        assert len(exported) == len(shadow) and all(torch.equal(x, s) for x, s in zip(exported, shadow))
        a.load_state_dict({k.removeprefix("mlm."): v for k, v in state["students"][peer].items()})
        assert any(not torch.equal(x, s) for x, s in zip(a.parameters(), shadow))
    records = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "valid_loss_live" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["valid_loss"] != r["valid_loss_live"] for r in evals)



def test_babylm_milestones_hold_the_average_of_their_step(tiny_prepared, tmp_path, monkeypatch):
    """With train.babylm_track the milestone checkpoints, like the export, are the averaged weights of their step."""
    probe = train(make_cfg(tiny_prepared, tmp_path / "probe", train={"babylm_track": "strict-small"}))
    assert probe["steps"] == 12
    words = {r["step"]: r["words_seen"] for r in map(json.loads, (tmp_path / "probe" / "metrics.jsonl").open())
             if "words_seen" in r}
    monkeypatch.setattr(exp, "MILLION", 1)  # milestones at the words seen after steps 6 and 12 (the checkpoints)
    monkeypatch.setitem(exp.TRACKS, "strict-small", exp.Track(10**8, 100, (words[6], words[12])))
    run = tmp_path / "avg"
    summary = train(make_cfg(tiny_prepared, run, train={"babylm_track": "strict-small", "ema_decay": 0.8}))
    assert sorted(summary["exposure"]["milestones"].values()) == [6, 12]
    for path in list_checkpoints(run):
        state = load_checkpoint(path)
        name = next(n for n, s in summary["exposure"]["milestones"].items() if s == state["step"])
        milestone = AutoModelForMaskedLM.from_pretrained(run / "chck" / name)
        assert all(torch.equal(p, s) for p, s in zip(milestone.parameters(), state["averages"][0]["shadow"]))


def test_averaging_leaves_the_training_itself_unchanged(tiny_prepared, tmp_path):
    """The live weights of an averaging run are those of the same run without averaging, to the last bit: the
    logged valid_loss_live equals the plain run's valid_loss at every validation."""
    plain = train(make_cfg(tiny_prepared, tmp_path / "plain"))
    avg = train(make_cfg(tiny_prepared, tmp_path / "avg", train={"ema_decay": 0.9}))
    read = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    live = {r["step"]: r["valid_loss_live"] for r in read(tmp_path / "avg") if "valid_loss_live" in r}
    base = {r["step"]: r["valid_loss"] for r in read(tmp_path / "plain") if "valid_loss" in r and r["step"] > 0}
    assert live == base and len(live) == 2
    assert avg["peers"][0]["valid_loss"] != plain["peers"][0]["valid_loss"]
    train_ce = lambda run: [r["train_ce"] for r in read(run) if "train_ce" in r]  # noqa: E731
    assert train_ce(tmp_path / "avg") == train_ce(tmp_path / "plain")


def test_the_grammar_study_scores_an_averaging_runs_live_weights(tiny_prepared, tmp_path, monkeypatch):
    """benchmarks/grammar_study.py --live: OUT/<variant>_live holds the last checkpoint's live weights (the average's
    own effect is then a paired comparison within one run); a run without averaging is refused."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import grammar_study

    train(make_cfg(tiny_prepared, tmp_path / "avg", train={"ema_decay": 0.8}))
    folder = grammar_study.live_weights("avg", tmp_path)
    state = load_checkpoint(list_checkpoints(tmp_path / "avg")[-1])
    live = AutoModelForMaskedLM.from_pretrained(folder)
    assert folder == tmp_path / "avg_live" and (folder / "tokenizer.json").is_file()
    assert all(torch.equal(v, state["students"][0]["mlm." + k]) for k, v in live.state_dict().items())
    train(make_cfg(tiny_prepared, tmp_path / "plain"))
    with pytest.raises(SystemExit, match="not a finished run with weight averaging"):
        grammar_study.live_weights("plain", tmp_path)
