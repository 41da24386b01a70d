import json
import random
import types

import pytest
import torch

from dwml.errors import DwmlError
from dwml.models.model import PRESETS, Arch, Student, build_model, count_params, get_preset, masked_logits


def _random_arch(rng: random.Random) -> Arch:
    heads = rng.choice([1, 2, 3, 4, 6, 8])
    return Arch(
        layers=rng.randint(1, 4),
        heads=heads,
        hidden=heads * rng.randint(1, 24),
        intermediate=rng.randint(1, 300),
        vocab_size=rng.randint(5, 3000),
        max_positions=rng.randint(3, 600),
    )


def test_count_params_matches_hf_on_random_archs():
    rng = random.Random(1234)
    for _ in range(40):
        arch = _random_arch(rng)
        assert count_params(arch) == build_model(arch).num_parameters(), arch


def test_presets_sizes():
    tiny = count_params(get_preset("tiny"))
    assert 1_000_000 <= tiny <= 3_000_000
    base = get_preset("base")
    assert (base.layers, base.heads, base.hidden, base.intermediate) == (12, 12, 768, 3072)
    assert 124_000_000 <= count_params(base) <= 126_000_000
    sizes = [count_params(a) for a in PRESETS.values()]
    assert sizes == sorted(sizes)


def test_bad_archs_and_presets():
    with pytest.raises(DwmlError, match="divisible"):
        Arch(layers=2, heads=3, hidden=64, intermediate=128)
    with pytest.raises(DwmlError, match="layers"):
        Arch(layers=0, heads=2, hidden=64, intermediate=128)
    with pytest.raises(DwmlError, match="unknown model preset"):
        get_preset("huge")
    with pytest.raises(DwmlError, match="unknown key"):
        Arch.from_dict({"layers": 1, "heads": 1, "hidden": 8, "intermediate": 8, "width": 3})


def test_build_model_seeded_and_hf_roundtrip():
    arch = Arch(layers=1, heads=2, hidden=16, intermediate=32, vocab_size=50, max_positions=20)
    a, b = build_model(arch, seed=7), build_model(arch, seed=7)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)
    assert Arch.from_hf_config(a.config) == arch


# ---------------------------------------------------------------------------------------------------------------
# model.family = "modernbert"


def test_modernbert_count_params_matches_hf_on_random_archs():
    rng = random.Random(99)
    for _ in range(24):
        arch = _random_arch(rng).replace(family="modernbert")
        model = build_model(arch)
        assert type(model).__name__ == "ModernBertForMaskedLM"
        assert count_params(arch) == model.num_parameters() == sum(p.numel() for p in model.parameters()), arch


def test_modernbert_presets_match_roberta_parameter_counts():
    for name, roberta in PRESETS.items():
        modern = get_preset(name, "modernbert")
        assert (modern.layers, modern.heads, modern.hidden) == (roberta.layers, roberta.heads, roberta.hidden)
        assert modern.family == "modernbert" and modern.intermediate % 16 == 0
        assert count_params(modern) == pytest.approx(count_params(roberta), rel=3e-3), name
    assert get_preset("tiny", "roberta") == PRESETS["tiny"]
    with pytest.raises(DwmlError, match="model family"):
        get_preset("tiny", "gpt2")
    with pytest.raises(DwmlError, match="arch.family"):
        Arch(layers=1, heads=1, hidden=8, intermediate=8, family="bert")


def test_every_unknown_family_gets_the_one_check_and_message(tmp_path):
    """config, Arch (presets, HF configs, search references) and the search config share `config.check_family`."""
    from dwml.config import RunConfig, from_dict
    from dwml.models.search import SearchConfig, resolve_reference

    msg = "unknown model family 'bert'; expected one of ['roberta', 'modernbert']"
    hf = {"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8,
          "intermediate_size": 8, "vocab_size": 10, "max_position_embeddings": 10}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    for where, make in (("arch.family", lambda: get_preset("tiny", "bert")),
                        ("arch.family", lambda: Arch.from_hf_config(types.SimpleNamespace(**hf))),
                        ("arch.family", lambda: resolve_reference(str(tmp_path))),
                        ("search.family", lambda: SearchConfig(family="bert").validate()),
                        ("model.family", lambda: from_dict(RunConfig, {"model": {"family": "bert"}}, "t").validate())):
        with pytest.raises(DwmlError) as e:
            make()
        assert str(e.value) == f"{where}: {msg}"


def test_modernbert_config_settings_and_roundtrip():
    arch = Arch(layers=3, heads=2, hidden=16, intermediate=24, vocab_size=60, max_positions=34, family="modernbert")
    a, b = build_model(arch, seed=5, dropout=0.2), build_model(arch, seed=5, dropout=0.2)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)
    c = build_model(arch, seed=6)
    assert not torch.equal(a.model.layers[0].attn.Wqkv.weight, c.model.layers[0].attn.Wqkv.weight)
    cfg = a.config
    assert Arch.from_hf_config(cfg) == arch and arch.name == "MB-L3-A2-H16-I24"
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.cls_token_id, cfg.sep_token_id) == (1, 0, 2, 0, 2)
    assert cfg.embedding_dropout == cfg.attention_dropout == cfg.mlp_dropout == 0.2
    assert cfg.tie_word_embeddings and a.decoder.weight is a.model.embeddings.tok_embeddings.weight
    assert cfg._attn_implementation == "sdpa"
    saved = cfg.to_dict()  # what config.json holds: the same model for transformers 4.51 (old keys) and 5.x
    assert saved["global_attn_every_n_layers"] == 1 and saved["local_attention"] >= 2 * (arch.max_positions - 1)
    assert saved["global_rope_theta"] == saved["local_rope_theta"] == 10_000.0
    if "layer_types" in saved:  # transformers 5.x
        assert set(saved["layer_types"]) == {"full_attention"}
        assert {v["rope_theta"] for v in saved["rope_parameters"].values()} == {10_000.0}
    # pre-norm: the first layer reads the normalised embeddings, every later one normalises its input
    assert isinstance(a.model.layers[0].attn_norm, torch.nn.Identity)
    assert isinstance(a.model.layers[1].attn_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("family", ["roberta", "modernbert"])
def test_masked_logits_equal_full_logits_at_positions(family):
    arch = Arch(layers=2, heads=2, hidden=32, intermediate=48, vocab_size=100, max_positions=34, family=family)
    model = build_model(arch, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 12), generator=g)
    att = torch.ones_like(ids)
    ids[2, 8:] = 1  # padding
    att[2, 8:] = 0
    positions = torch.tensor([0, 5, 13, 30, 33])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=att).logits.reshape(-1, 100)[positions]
        ours = masked_logits(model, ids, att, positions)
        student_logits, aux = Student(model)(ids, att, positions)
        # padding is masked: the unpadded row 2 alone gives the same logits at its real tokens
        alone = model(input_ids=ids[2:, :8], attention_mask=att[2:, :8]).logits[0]
        padded = model(input_ids=ids, attention_mask=att).logits[2, :8]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student_logits, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)
    assert aux == []
