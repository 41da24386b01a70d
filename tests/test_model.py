import random

import pytest
import torch

from dwml.errors import DwmlError
from dwml.model import PRESETS, Arch, Student, build_model, count_params, get_preset, masked_logits


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


def test_masked_logits_equal_full_logits_at_positions():
    torch.manual_seed(0)
    arch = Arch(layers=2, heads=2, hidden=32, intermediate=64, vocab_size=100, max_positions=34)
    model = build_model(arch, seed=0).eval()
    ids = torch.randint(5, 100, (3, 12))
    att = torch.ones_like(ids)
    ids[2, 8:] = 1  # padding
    att[2, 8:] = 0
    positions = torch.tensor([0, 5, 13, 30, 33])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=att).logits.reshape(-1, 100)[positions]
        ours = masked_logits(model, ids, att, positions)
        student_logits, aux = Student(model)(ids, att, positions)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student_logits, full, rtol=1e-5, atol=1e-5)
    assert aux == []
