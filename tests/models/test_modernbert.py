"""model.family = "modernbert" end to end: every method trains, DWML's hypergradient is exact, the search counts
exactly, export reloads to identical logits and `dwml eval` scores the exported model and the run.

(The architecture itself - exact parameter counts, presets, config, masked-position logits - is in test_model.py.)
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from dwml.training.checkpoint import list_checkpoints, load_checkpoint
from dwml.cli import main
from dwml.config import RunConfig, from_dict, merge
from dwml.errors import DwmlError
from dwml.distill.hypergrad import hypergradient
from dwml.distill.losses import dwml_loss, ensemble_loss
from dwml.models.model import Arch, build_model, count_params, masked_logits
from dwml.evaluation.scoring import score_sentences, score_sentences_naive
from dwml.models.search import SearchConfig, load_peer_archs, run_search_to_file, search
from dwml.training.setup import resolve_archs
from dwml.training.train import train

from evalfixtures import EVAL_DATA, blimp_sentences

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

PEERS = [{"layers": 1, "heads": 2, "hidden": 32, "intermediate": 48},
         {"layers": 2, "heads": 2, "hidden": 24, "intermediate": 32}]


def make_cfg(prepared, out, **sections) -> RunConfig:
    base = {
        "out_dir": str(out),
        "data": {"prepared": str(prepared), "seq_len": 32, "heldout_sequences": 16},
        "model": {"family": "modernbert", "preset": "tiny", "layers": 2, "hidden": 32, "heads": 2,
                  "intermediate": 48},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
                  "eval_batches": 2, "save_every": 6, "log_every": 3, "progress": False, "seed": 3},
        "distill": {"outer_every": 3},
    }
    return from_dict(RunConfig, merge(base, sections), "test").validate()


@pytest.fixture(scope="module")
def dwml_run(tiny_prepared, tmp_path_factory):
    """Two ModernBERT peers trained with DWML (learned omega) for 6 steps (64 positions: room for BLiMP)."""
    out = tmp_path_factory.mktemp("modernbert") / "dwml"
    summary = train(make_cfg(tiny_prepared, out, data={"seq_len": 64}, model={"peers": PEERS},
                             train={"method": "dwml", "batch_size": 4}))
    return out, summary


# --------------------------------------------------------------------------------------------------------------
# Training: every method


def test_every_method_trains_modernbert(tiny_prepared, tmp_path, dwml_run):
    teacher = tmp_path / "teacher"
    mlm = train(make_cfg(tiny_prepared, teacher))
    cases = {
        "kd": {"distill": {"teacher": str(teacher)}},
        "sd": {},
        "dml": {"model": {"peers": PEERS}},
        "kd_dwml": {"model": {"peers": PEERS}, "distill": {"teacher": str(teacher), "hypergrad": "double_backward"}},
    }
    summaries = {"mlm": mlm, "dwml": dwml_run[1]}
    for method, extra in cases.items():
        summaries[method] = train(make_cfg(tiny_prepared, tmp_path / method, **merge(extra, {"train": {
            "method": method}})))
    for method, summary in summaries.items():
        losses = [p["valid_loss"] for p in summary["peers"]]
        assert all(v < i for v, i in zip(losses, summary["initial_valid_loss"])), method
        assert all(p["arch"]["family"] == "modernbert" for p in summary["peers"]), method
        assert [p["params"] for p in summary["peers"]] == [count_params(Arch.from_dict(p["arch"]))
                                                           for p in summary["peers"]]
        if method in ("dwml", "kd_dwml"):
            assert summary["omega"] != [0.5, 0.5], method  # learned by the outer steps
    run_dir = teacher / "final" / "peer0"
    assert json.loads((run_dir / "config.json").read_text())["model_type"] == "modernbert"
    # sd exports only the ModernBERT itself, and its auxiliary heads normalise the pre-norm residual stream
    sd = AutoModelForMaskedLM.from_pretrained(tmp_path / "sd" / "final" / "peer0")
    assert type(sd).__name__ == "ModernBertForMaskedLM"
    assert not any("aux" in k or "heads" in k for k in sd.state_dict())


def test_family_of_presets_tables_and_peers_files(tiny_prepared, tmp_path):
    cfg = make_cfg(tiny_prepared, tmp_path / "x", model={"layers": 0, "hidden": 0, "heads": 0, "intermediate": 0})
    ((_, tiny),) = resolve_archs(cfg, 1000)
    assert tiny.family == "modernbert" and tiny.intermediate == 368 and tiny.max_positions == 34
    two = resolve_archs(make_cfg(tiny_prepared, tmp_path / "x", model={"peers": ["tiny", PEERS[0]]}), 1000)
    assert [a.family for _, a in two] == ["modernbert", "modernbert"]
    # A peers file carries its family, which must be model.family.
    path = tmp_path / "peers.json"
    run_search_to_file(SearchConfig(reference="tiny", peers=2, init_points=3, n_iter=3, vocab_size=1000), path)
    with pytest.raises(DwmlError, match="holds roberta peers but model.family is modernbert"):
        resolve_archs(make_cfg(tiny_prepared, tmp_path / "x", model={"peers_file": str(path)},
                               train={"method": "dwml"}), 1000)
    with pytest.raises(DwmlError, match="model.family"):
        make_cfg(tiny_prepared, tmp_path / "x", model={"family": "bert"})


def test_analytic_flops_describe_what_modernbert_runs(tiny_prepared, tmp_path):
    """FlopCounterMode over a real micro-step equals the closed form with ModernBERT's 3 H I GeGLU products."""
    from dwml.training.measure import measure_step_flops

    for method in ("mlm", "sd"):
        m = measure_step_flops(make_cfg(tiny_prepared, tmp_path / method, train={"method": method}))
        assert m["ratio"] == pytest.approx(1.0, abs=1e-6), method


# --------------------------------------------------------------------------------------------------------------
# DWML's hypergradient (eq. 3) through functional_call on ModernBERT peers


def _batch(seed: int, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 10), generator=g)
    att = torch.ones_like(ids)
    att[2, 7:] = 0
    ids[2, 7:] = 1
    positions = torch.tensor([1, 4, 6, 12, 15, 22, 25])
    ids.view(-1)[positions] = 4
    return type("B", (), dict(input_ids=ids, attention_mask=att, positions=positions,
                              labels=torch.randint(5, vocab, (7,), generator=g)))


def test_modernbert_hypergradient_matches_finite_differences():
    archs = [Arch(layers=1, heads=2, hidden=16, intermediate=24, vocab_size=50, max_positions=20, family="modernbert"),
             Arch(layers=2, heads=2, hidden=8, intermediate=16, vocab_size=50, max_positions=20, family="modernbert")]
    peers = [build_model(a, seed=i, dropout=0.0).to(torch.float64).eval() for i, a in enumerate(archs)]
    train_b, held_b = _batch(1), _batch(2)
    omega = torch.tensor([0.6, 0.4], dtype=torch.float64)
    cfg = dict(alpha=0.5, temperature=2.0, gamma=2.0, detach_targets=True, l2_kind="ensemble")

    def unrolled(w):  # L2(theta - gamma grad L1(theta, w), w) by an explicit SGD step on copies
        models = [copy.deepcopy(m) for m in peers]
        z = [masked_logits(m, train_b.input_ids, train_b.attention_mask, train_b.positions) for m in models]
        l1, _ = dwml_loss(z, train_b.labels, w, cfg["alpha"], cfg["temperature"], cfg["detach_targets"])
        params = [p for m in models for p in m.parameters()]
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(l1, params)):
                p -= cfg["gamma"] * g
            held = [masked_logits(m, held_b.input_ids, held_b.attention_mask, held_b.positions) for m in models]
            return ensemble_loss(held, held_b.labels, w, cfg["l2_kind"]).item()

    eps = 1e-5
    fd = torch.tensor([(unrolled(omega + e) - unrolled(omega - e)) / (2 * eps)
                       for e in torch.eye(2, dtype=torch.float64) * eps], dtype=torch.float64)
    results = {mode: hypergradient(peers, train_b, held_b, omega, mode=mode, **cfg)
               for mode in ("per_peer", "double_backward", "jvp")}
    for mode, (g, info) in results.items():
        assert ((g - fd).norm() / fd.norm()).item() < 1e-4, (mode, g, fd)
        assert info["mixed"].abs().max() > 1e-4  # the second term of eq. (3) is there and matters
    torch.testing.assert_close(results["jvp"][0], results["per_peer"][0], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Search


def test_search_modernbert_is_exact_and_close_to_the_exhaustive_optimum(tmp_path):
    cfg = SearchConfig(reference="mini", family="modernbert", peers=3, init_points=5, n_iter=30, vocab_size=1000,
                       max_positions=34, layers=[1, 8], heads=[1, 8], head_dim=[16, 64])
    result = search(cfg)
    assert result["family"] == "modernbert" and result["intermediate_ratio"] == pytest.approx(8 / 3)
    assert result["reference"]["family"] == "modernbert"
    for p in result["peers"]:
        arch = Arch.from_dict(p["arch"])
        assert arch.family == "modernbert" and arch.intermediate == round(8 / 3 * arch.hidden)
        assert p["params"] == count_params(arch) == build_model(arch).num_parameters()
        assert 0 <= p["gap_to_exhaustive"] + 1e-12 and p["gap_to_exhaustive"] < 0.02, p
    # A RoBERTa reference keeps its count: ModernBERT peers for RoBERTa-base's budgets.
    mixed = search(SearchConfig(reference=str(_roberta_ref(tmp_path)), family="modernbert", peers=1, init_points=3,
                                n_iter=3, vocab_size=1000))
    assert mixed["reference"]["family"] == "roberta" and mixed["peers"][0]["arch"]["family"] == "modernbert"
    # The CLI flag, and the peers file that train reads back.
    out = tmp_path / "peers.json"
    assert main(["search", "--reference", "tiny", "--family", "modernbert", "--peers", "2", "--vocab-size", "1000",
                 "--init-points", "3", "--n-iter", "5", "--out", str(out)]) == 0
    assert [a.family for a in load_peer_archs(out)] == ["modernbert", "modernbert"]


@pytest.mark.slow
def test_search_modernbert_base_default_settings_within_1pct():
    """The acceptance run of the RoBERTa search, for ModernBERT peers: base budget, 4 peers, 10 + 100 evaluations."""
    result = search(SearchConfig(family="modernbert"))
    for p in result["peers"]:
        assert p["rel_error"] < 0.01 and 0 <= p["gap_to_exhaustive"] + 1e-12 < 0.01, p
        assert p["bo_evaluations"] == 110


def test_experiment_searches_peers_in_the_base_family(tmp_path):
    from dwml.experiments.config import load_experiment
    from dwml.experiments.plan import plan_runs
    from dwml.experiments.stages import search_settings

    text = """
name = "mb"
out_dir = "OUT"
[base.data]
seq_len = 32
[base.model]
family = "modernbert"
[search]
reference = "tiny"
peers = 2
init_points = 3
n_iter = 3
[[runs]]
name = "dwml"
method = "dwml"
""".replace("OUT", str(tmp_path / "exp"))
    (tmp_path / "exp.toml").write_text(text)
    cfg = load_experiment(tmp_path / "exp.toml")
    settings = search_settings(cfg, 1000)
    assert settings.family == "modernbert" and settings.max_positions == 34
    peers = [p["arch"] for p in search(settings)["peers"]]
    (plan,) = plan_runs(cfg, tmp_path / "exp", tmp_path, peers)
    assert [a.family for _, a in resolve_archs(plan.config, 1000)] == ["modernbert", "modernbert"]
    # A run of another family than the searched peers' is refused, not silently trained as the peers' family.
    (tmp_path / "exp2.toml").write_text(text.replace('family = "modernbert"', 'family = "roberta"') + """
[runs.model]
family = "modernbert"
""")
    cfg2 = load_experiment(tmp_path / "exp2.toml")
    roberta_peers = [p["arch"] for p in search(search_settings(cfg2, 1000))["peers"]]
    with pytest.raises(DwmlError, match="model.family is modernbert, but the \\[search\\] peers are not"):
        plan_runs(cfg2, tmp_path / "exp", tmp_path, roberta_peers)
    with pytest.raises(DwmlError, match=r"model.peers\[0\]: a roberta architecture, but model.family is modernbert"):
        resolve_archs(make_cfg(tmp_path, tmp_path / "x", model={"peers": [dict(PEERS[0], family="roberta"),
                                                                          PEERS[1]]}), 1000)


def _roberta_ref(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"arch": {"layers": 2, "heads": 2, "hidden": 64, "intermediate": 256}}))
    return path


# --------------------------------------------------------------------------------------------------------------
# Export and evaluation


def test_export_reloads_to_the_trained_weights_and_eval_scores_it(dwml_run, tmp_path, capsys):
    run, summary = dwml_run
    out = tmp_path / "hf"
    assert main(["export", str(run), "--peer", "1", "--out", str(out)]) == 0
    assert "ModernBERT" in (out / "README.md").read_text()
    model = AutoModelForMaskedLM.from_pretrained(out).eval()  # no trust_remote_code
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "modernbert"
    # The exported weights are the trained student's: rebuild it from the last checkpoint and compare logits.
    state = load_checkpoint(list_checkpoints(run)[-1])["students"][1]
    student = build_model(Arch.from_dict(summary["peers"][1]["arch"]))
    student.load_state_dict({k.removeprefix("mlm."): v for k, v in state.items()})
    enc = tok(["the cat sat on the <mask> .", "where is it ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, student.eval()(**enc).logits)
    # Scoring takes the masked-positions path for ModernBERT and agrees with one-masked-copy-at-a-time PLL.
    sentences = blimp_sentences(2, 2)
    fast = score_sentences(model, tok, sentences, device="cpu")
    naive = score_sentences_naive(model, tok, sentences, device="cpu")
    assert fast == pytest.approx(naive, rel=1e-4, abs=1e-4)
    assert main(["eval", str(out), "--tasks", "blimp_fast", "--limit", "2", "--device", "cpu",
                 "--data-dir", str(EVAL_DATA), "--out", str(tmp_path / "model.json")]) == 0
    res = json.loads((tmp_path / "model.json").read_text())
    task = res["models"]["hf"]["tasks"]["blimp_fast"]
    assert task["n"] == 134 and 0 <= task["macro_accuracy"] <= 100
    assert main(["eval", str(run), "--tasks", "supplement_fast", "--limit", "1", "--device", "cpu",
                 "--data-dir", str(EVAL_DATA), "--out", str(tmp_path / "run.json")]) == 0
    assert list(json.loads((tmp_path / "run.json").read_text())["models"]) == ["peer0", "peer1", "ensemble"]


# --------------------------------------------------------------------------------------------------------------
# GLUE fine-tuning


def test_finetune_keeps_the_modernbert_encoder_and_learns(dwml_run, tmp_path):
    import dwml.evaluation.finetune as ft
    from runfixtures import quick_finetune_cfg as _quick_cfg, sentences as _sentences, write_jsonl as _write_jsonl

    peer = dwml_run[0] / "final" / "peer0"
    mlm = AutoModelForMaskedLM.from_pretrained(peer)
    clf = ft.load_classifier(peer, 2)  # only the classifier is new: the encoder and its head are the MLM's
    assert type(clf).__name__ == "ModernBertForSequenceClassification"
    assert torch.equal(clf.model.layers[0].mlp.Wi.weight, mlm.model.layers[0].mlp.Wi.weight)
    assert torch.equal(clf.head.dense.weight, mlm.head.dense.weight)
    _write_jsonl(tmp_path / "sst2.train.jsonl", _sentences(300, seed=1))
    _write_jsonl(tmp_path / "sst2.valid.jsonl", _sentences(200, seed=2))
    row = ft.finetune_model(peer, _quick_cfg(tmp_path, epochs=6))["tasks"]["sst2"]
    assert row["score"] >= row["majority"] + 0.2, row
