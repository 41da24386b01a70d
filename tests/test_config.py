from pathlib import Path

import pytest

from dwml.config import RunConfig, load_config, read_toml, to_toml
from dwml.errors import DwmlError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('out_dir = "x"\n[train]\nmax_steps = 7\nlr = 1\n[distill]\nalpha = 0.3\n')
    cfg = load_config([f], ["train.batch_size=4", "train.method=dwml", "model.peers=['tiny', 'tiny']"])
    assert cfg.out_dir == "x" and cfg.train.max_steps == 7 and cfg.train.batch_size == 4
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.train.method == "dwml" and cfg.distill.alpha == 0.3 and cfg.model.peers == ["tiny", "tiny"]
    assert cfg.data.seq_len == RunConfig().data.seq_len


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config(None, ["model.peers=[{layers=1, heads=2, hidden=8, intermediate=16}, 'tiny']",
                             'out_dir="a \\"quoted\\" dir"'])
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    again = load_config([f])
    assert again == cfg


@pytest.mark.parametrize(
    "text, match",
    [
        ("[train]\nmax_stepz = 3\n", r"unknown key\(s\) \['max_stepz'\]"),
        ("[trian]\nmax_steps = 3\n", r"unknown key\(s\) \['trian'\]"),
        ("[train]\nmax_steps = 'many'\n", r"train.max_steps: expected int"),
        ("[distill]\nalpha = 1.5\n", r"distill.alpha: expected a value in \[0, 1\]"),
        ("[distill]\nouter_every = 0\n", r"outer_every \(K\)"),
        ("[distill]\nunroll = 'adam'\n", r"distill.unroll: expected adamw\|sgd\|direct, got 'adam'"),
        ("[train]\nmethod = 'magic'\n", r"unknown method 'magic'"),
        ("[train]\nmethod = 'kd'\n", r"needs a teacher"),
        ("[train\n", r"invalid TOML"),
        ("[data]\nseparator = 'tab'\n", r"data.separator: expected eos\|newline\|mixed, got 'tab'"),
        ("[data]\nseparator_sources = ['cbt']\n", r"data.separator_sources: only with data.separator = newline"),
        ("[data]\nseparator = 'newline'\nseparator_sources = [3]\n", r"data.separator_sources: expected source"),
        ("[train]\nema_decay = 1.0\n", r"train.ema_decay: expected a value in \[0, 1\) \(0 = off\), got 1.0"),
        ("[train]\nema_decay = -0.5\n", r"train.ema_decay: expected a value in \[0, 1\)"),
    ],
)
def test_bad_configs_fail_loudly(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(DwmlError, match=match):
        load_config([f])


def test_missing_config_file(tmp_path):
    with pytest.raises(DwmlError, match="config file not found"):
        read_toml(tmp_path / "nope.toml")


def test_the_cpu_mlm_config_is_the_grammar_studys_winner(monkeypatch):
    """configs/cpu-mlm-30min.toml is the recipe the study measured (benchmarks/grammar_study.py, mini_compile30):
    every training setting of that variant, and nothing that changes the model or its data, differs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from grammar_study import RECIPE, VARIANTS

    cfg = load_config([str(ROOT / "configs" / "cpu-mlm-30min.toml")])
    recipe = {**RECIPE, **dict((n, o) for n, _, o in VARIANTS)["mini_compile30"]}
    bookkeeping = {"train.progress", "train.log_every", "train.eval_every", "train.save_every"}
    for key, value in recipe.items():
        if key in bookkeeping:
            continue
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key
    assert cfg.train.compile and cfg.data.mask_prob_end == 0.0 and cfg.train.max_steps * 32 * 128 / 3.4e6 < 10  # BabyLM's 10 epochs
