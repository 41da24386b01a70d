"""Learning-rate schedules (dwml.training.schedule) against their closed forms, and the config keys that select them."""
import math

import pytest

from dwml.config import TrainConfig, load_config
from dwml.errors import DwmlError
from dwml.training.schedule import lr_factor


def t(**kw):
    return TrainConfig(**{"max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "trapezoid", "constant"])
def test_shared_warmup_and_end(schedule):
    c = t(schedule=schedule)
    assert [lr_factor(s, c) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(100, c) == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_shapes_between_warmup_and_end():
    for s in range(10, 101):
        p = (s - 10) / 90
        assert lr_factor(s, t(schedule="cosine")) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        assert lr_factor(s, t(schedule="linear")) == pytest.approx(1 - 0.9 * p)
        # trapezoid with a 20% cool-down: flat until step 80, then linear to the floor at 100
        expect = 1.0 if s <= 80 else 1 - 0.9 * (s - 80) / 20
        assert lr_factor(s, t(schedule="trapezoid", cooldown_fraction=0.2)) == pytest.approx(expect)
    one_cycle = t(schedule="linear", warmup_steps=50, min_lr_ratio=0.0)  # Cramming's triangle
    assert lr_factor(49, one_cycle) == pytest.approx(1.0) and lr_factor(75, one_cycle) == pytest.approx(0.5)


def test_bad_schedule_keys_fail_loudly():
    with pytest.raises(DwmlError, match="train.schedule"):
        load_config(sets=["train.schedule=onecycle"])
    with pytest.raises(DwmlError, match="train.cooldown_fraction"):
        load_config(sets=["train.cooldown_fraction=0"])
    with pytest.raises(DwmlError, match="data.eval_mask_prob"):
        load_config(sets=["data.eval_mask_prob=1.0"])
    with pytest.raises(DwmlError, match="data.mask_prob_end"):
        load_config(sets=["data.mask_prob_end=1.0"])
    with pytest.raises(DwmlError, match="data.replace_mask/replace_random"):
        load_config(sets=["data.replace_mask=0.95", "data.replace_random=0.1"])
    with pytest.raises(DwmlError, match="data.replace_mask/replace_random"):
        load_config(sets=["data.replace_random=-0.1"])
    with pytest.raises(DwmlError, match="train.warmup_steps"):
        load_config(sets=["train.warmup_steps=-1"])
