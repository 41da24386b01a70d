"""Architecture search (paper section 3.1): exact counts, hidden % heads, determinism, distinctness, BO vs
exhaustive optimum, bad input."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest

from dwml.errors import DwmlError
from dwml.models.model import PRESETS, Arch, build_model, count_params
from dwml.models.search import SearchConfig, format_table, load_peer_archs, load_search_config, register, resolve_reference, run_search_to_file, search, _run_bo
from dwml.models.space import build_space, exhaustive_best, objective, peer_targets

REPO_ROOT = Path(__file__).resolve().parents[2]
# A cheap search for the tests that do not need the default budget: tiny reference, small vocabulary.
CHEAP = SearchConfig(reference="tiny", peers=3, init_points=5, n_iter=15, vocab_size=1000)


@pytest.fixture(scope="module")
def base_result() -> dict:
    """The issue's acceptance run: default settings (base reference, 4 peers, 10 + 100 evaluations, seed 0)."""
    return search(SearchConfig())


def naive_optimum(cfg: SearchConfig, ref: Arch, target: int, exclude: list[Arch]) -> int:
    """Reference for the vectorised exhaustive search: a plain loop over every valid shape with count_params."""
    best = None
    for layers in range(cfg.layers[0], cfg.layers[1] + 1):
        for heads in range(cfg.heads[0], cfg.heads[1] + 1):
            for head_dim in range(cfg.head_dim[0], cfg.head_dim[1] + 1, cfg.head_dim_step):
                h = heads * head_dim
                if any((a.layers, a.hidden) == (layers, h) for a in exclude):
                    continue
                n = count_params(Arch(layers, heads, h, 4 * h, ref.vocab_size, ref.max_positions))
                err = abs(math.log(n / target))
                if best is None or err < best[0]:
                    best = (err, n)
    return best[1]


# --------------------------------------------------------------------------------------------------------------
# Exactness and the hidden % heads constraint


def test_space_counts_equal_count_params_and_respect_heads():
    cfg = SearchConfig(layers=[1, 6], heads=[1, 12], head_dim=[16, 80], head_dim_step=16, intermediate_ratio=8 / 3)
    space = build_space(cfg, vocab_size=1234, max_positions=66)
    assert len(space) == 6 * 12 * 5
    for k in range(len(space)):
        a = space.arch_at(k)  # Arch() itself rejects hidden % heads != 0
        assert a.hidden % a.heads == 0
        assert a.intermediate == round(8 / 3 * a.hidden)
        assert int(space.params[k]) == count_params(a)


def test_reported_params_are_exact_hf_counts():
    """The count the search optimises is the real RobertaForMaskedLM size: build the smallest peer it found."""
    result = search(CHEAP)
    for p in result["peers"]:
        arch = Arch.from_dict(p["arch"])
        assert p["params"] == count_params(arch)
        assert arch.hidden % arch.heads == 0 and arch.intermediate == 4 * arch.hidden
        assert p["rel_error"] == pytest.approx(abs(p["params"] - p["target"]) / p["target"])
    smallest = Arch.from_dict(result["peers"][-1]["arch"])
    assert build_model(smallest, seed=0).num_parameters() == result["peers"][-1]["params"]


def test_targets_are_n_over_i_plus_1():
    assert peer_targets(120, 4) == [60, 40, 30, 24]
    assert peer_targets(count_params(PRESETS["base"]), 1) == [round(count_params(PRESETS["base"]) / 2)]


# --------------------------------------------------------------------------------------------------------------
# Acceptance: base reference, 4 peers, default settings


def test_base_default_within_1pct_and_gap_to_exhaustive(base_result):
    ref = PRESETS["base"]
    assert base_result["reference"]["params"] == count_params(ref) == 124_697_433
    peers = base_result["peers"]
    assert [p["target"] for p in peers] == peer_targets(count_params(ref), 4)
    chosen: list[Arch] = []
    for p in peers:
        arch = Arch.from_dict(p["arch"])
        assert arch.hidden % arch.heads == 0
        assert p["rel_error"] < 0.01, p
        assert p["bo_evaluations"] == 110  # every iteration evaluated a new architecture
        # The exhaustive optimum is recomputed here by a plain loop, independently of the numpy version.
        assert p["exhaustive_params"] == naive_optimum(SearchConfig(), ref, p["target"], chosen)
        assert p["gap_to_exhaustive"] == pytest.approx(p["rel_error"] - p["exhaustive_rel_error"])
        assert p["gap_to_exhaustive"] >= -1e-6  # BO cannot beat the optimum of its own objective
        assert p["gap_to_exhaustive"] < 0.01
        chosen.append(arch)
    assert base_result["wall_time_s"] > 0
    table = format_table(base_result)
    assert "62,348,716" in table and "rel_err" in table and len(table.splitlines()) == 4 + 3


def test_peers_are_distinct(base_result):
    shapes = [(p["arch"]["layers"], p["arch"]["hidden"]) for p in base_result["peers"]]
    assert len(set(shapes)) == len(shapes)


def test_earlier_peer_shape_is_infeasible():
    """With the best shape taken, both BO and the exhaustive search must return the next best, never a copy (and
    not a heads-only variant of it: heads change no weight shape)."""
    cfg = SearchConfig(reference="tiny", layers=[1, 3], heads=[1, 2], head_dim=[16, 48], head_dim_step=16,
                       init_points=4, n_iter=30)  # 18 points, 15 distinct shapes: BO sees them all
    space = build_space(cfg, vocab_size=8192, max_positions=130)
    target = int(space.params[7])
    first = exhaustive_best(space, target, [])
    assert count_params(first) == target
    second = exhaustive_best(space, target, [first])
    assert (second.layers, second.hidden) != (first.layers, first.hidden)
    bo_arch, _ = _run_bo(space, cfg, target, [first], peer=2)
    assert (bo_arch.layers, bo_arch.hidden) != (first.layers, first.hidden)
    assert count_params(bo_arch) == count_params(second)
    with pytest.raises(DwmlError, match="fewer distinct architectures"):
        exhaustive_best(space, target, [space.arch_at(k) for k in range(len(space))])


def test_diversity_term_spreads_width_depth_ratios():
    def min_log_ratio_distance(archs):
        r = [math.log(a.hidden / a.layers) for a in archs]
        return min(abs(x - y) for i, x in enumerate(r) for y in r[i + 1:])

    cfg = SearchConfig()
    ref = PRESETS["base"]
    space = build_space(cfg, ref.vocab_size, ref.max_positions)
    spread = {}
    for w in (0.0, 0.05):
        chosen: list[Arch] = []
        for t in peer_targets(count_params(ref), 4):
            chosen.append(exhaustive_best(space, t, chosen, w))
        spread[w] = min_log_ratio_distance(chosen)
    assert spread[0.05] > spread[0.0]
    # BO optimises that same diversity-augmented J and, with the default budget, reaches its optimum (peer 2 is the
    # first one the diversity term applies to).
    result = search(dataclasses.replace(CHEAP, peers=2, n_iter=100, diversity_weight=0.05))
    first, second = (Arch.from_dict(p["arch"]) for p in result["peers"])
    best = Arch.from_dict(result["peers"][1]["exhaustive_arch"])

    def J(a):
        return float(objective(count_params(a), a.hidden, a.layers, result["peers"][1]["target"], [first], 0.05))

    assert best == exhaustive_best(build_space(CHEAP, 1000, 130), result["peers"][1]["target"], [first], 0.05)
    assert J(second) == pytest.approx(J(best), abs=1e-9)


# --------------------------------------------------------------------------------------------------------------
# Determinism, output file, CLI


def test_same_seed_same_result():
    def strip(r):
        return {k: v for k, v in r.items() if k not in ("wall_time_s", "exhaustive_time_s")}

    a, b = search(CHEAP), search(CHEAP)
    assert json.dumps(strip(a)) == json.dumps(strip(b))


def test_cli_writes_json_that_load_peer_archs_reads(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "peers.json"
    args = parser.parse_args(["search", "--reference", "tiny", "--peers", "2", "--out", str(out), "--n-iter", "8",
                              "--init-points", "4", "--vocab-size", "1000", "--seed", "3", "--layers", "1", "8"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "peer" in printed and "target" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert data["config"]["seed"] == 3 and data["config"]["layers"] == [1, 8] and data["config"]["n_iter"] == 8
    assert data["reference"]["vocab_size"] == 1000 and data["reference"]["params"] == count_params(
        PRESETS["tiny"].replace(vocab_size=1000))
    archs = load_peer_archs(out)
    assert [a.to_dict() for a in archs] == [p["arch"] for p in data["peers"]]
    assert all(a.vocab_size == 1000 and a.layers <= 8 for a in archs)


def test_example_config_is_the_defaults_and_cli_flags_override_it(tmp_path):
    assert load_search_config(REPO_ROOT / "configs" / "search-base.toml") == SearchConfig()
    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text('[search]\nreference = "tiny"\npeers = 2\nn_iter = 3\ninit_points = 2\nvocab_size = 500\n')
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "p.json"
    args = parser.parse_args(["search", "--config", str(cfg_file), "--peers", "3", "--out", str(out)])
    args.func(args)
    data = json.loads(out.read_text())
    assert data["config"]["peers"] == 3 and data["config"]["n_iter"] == 3 and len(data["peers"]) == 3


def test_reference_from_preset_json_toml_and_hf_dir(tmp_path):
    tiny = PRESETS["tiny"]
    assert resolve_reference("tiny") == tiny
    (tmp_path / "a.json").write_text(json.dumps({"arch": tiny.to_dict()}))
    assert resolve_reference(str(tmp_path / "a.json")) == tiny
    (tmp_path / "a.toml").write_text("layers = 2\nheads = 2\nhidden = 128\nintermediate = 512\nvocab_size = 8192\n")
    assert resolve_reference(str(tmp_path / "a.toml")) == tiny
    hf_dir = tmp_path / "model"
    hf_dir.mkdir()
    tiny.to_hf_config().to_json_file(hf_dir / "config.json")
    assert resolve_reference(str(hf_dir)) == tiny
    result = run_search_to_file(dataclasses.replace(CHEAP, reference=str(hf_dir), n_iter=2), tmp_path / "o.json")
    assert result["reference"]["params"] == count_params(tiny.replace(vocab_size=1000))


# --------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("changes, message", [
    ({"peers": 0}, "search.peers: expected an integer >= 1"),
    ({"init_points": 0}, "search.init_points"),
    ({"n_iter": -1}, "search.n_iter"),
    ({"layers": [5, 3]}, r"search.layers: empty or non-positive bounds \[5, 3\]"),
    ({"heads": [0, 4]}, "search.heads: empty"),
    ({"head_dim": [16]}, r"search.head_dim: expected \[lo, hi\]"),
    ({"head_dim_step": 0}, "search.head_dim_step"),
    ({"intermediate_ratio": -1.0}, "search.intermediate_ratio"),
    ({"family": "gpt2"}, "search.family"),
    ({"reference": "nope"}, "not a preset"),
    ({"reference": "tiny", "peers": 20}, r"peer \d+ target .* below the smallest model in the search space"),
    ({"reference": "base", "layers": [1, 4], "heads": [1, 1], "head_dim": [16, 16]}, "above the largest model"),
    ({"layers": [1, 1], "heads": [1, 1], "head_dim": [16, 32], "peers": 3}, "only 2 distinct .* shapes"),
])
def test_bad_search_input_is_a_clear_error(changes, message):
    with pytest.raises(DwmlError, match=message):
        search(dataclasses.replace(SearchConfig(n_iter=1, init_points=1), **changes))


def test_bad_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 1\n")
    with pytest.raises(DwmlError, match="no \\[search\\] section"):
        load_search_config(f)
    f.write_text("[search]\npeerz = 3\n")
    with pytest.raises(DwmlError, match="unknown key"):
        load_search_config(f)
    f.write_text("[search]\npeers = 'four'\n")
    with pytest.raises(DwmlError, match="search.peers"):
        load_search_config(f)


@pytest.mark.parametrize("content, message", [
    (None, "peers file not found"),
    ("{not json", "invalid JSON"),
    ('{"peers": []}', "non-empty 'peers' list"),
    ('[1, 2]', "non-empty 'peers' list"),
    ('{"peers": [{"peer": 1}]}', r"peers\[0\]: expected an object with an 'arch'"),
    ('{"peers": [{"arch": {"layers": 2, "heads": 2, "hidden": 64}}]}', r"peers\[0\].arch: missing key"),
    ('{"peers": [{"arch": {"layers": 2, "heads": 3, "hidden": 64, "intermediate": 256}}]}', "divisible"),
])
def test_load_peer_archs_rejects_malformed_files(tmp_path, content, message):
    f = tmp_path / "peers.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(DwmlError, match=message):
        load_peer_archs(f)
