"""Self-distillation heads ("Be Your Own Teacher") on a tiny RoBERTa MLM."""
from __future__ import annotations

import math

import pytest
import torch

from dwml.errors import DwmlError
from dwml.models.model import Arch, build_model, masked_logits
from dwml.distill.selfdistill import SelfDistillHeads, sd_loss
from dwml.models.model import sd_logits

D = torch.float64
ARCH = Arch(layers=3, heads=2, hidden=16, intermediate=32, vocab_size=50, max_positions=20)


def make_model():
    return build_model(ARCH, seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).to(D).eval()


def make_inputs():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 50, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    positions = torch.tensor([2, 5, 10, 13])
    return input_ids, attention_mask, positions, torch.randint(5, 50, (4,), generator=g)


def make_heads(model, **kwargs):
    torch.manual_seed(1)
    return SelfDistillHeads(model.config, **kwargs).to(D)


def test_default_layers_and_shapes():
    model = make_model()
    heads = make_heads(model)
    assert heads.layers == (1, 2)
    ids, mask, pos, _ = make_inputs()
    final, aux = sd_logits(model, heads, ids, mask, pos)
    assert final.shape == (4, 50) and [a.shape for a in aux] == [(4, 50), (4, 50)]
    assert make_heads(model, layers=[2]).layers == (2,)


def test_final_logits_are_unchanged_and_heads_are_separate():
    model = make_model()
    names = set(model.state_dict())
    heads = make_heads(model)
    ids, mask, pos, _ = make_inputs()
    final, _ = sd_logits(model, heads, ids, mask, pos)
    torch.testing.assert_close(final, masked_logits(model, ids, mask, pos), rtol=0, atol=0)
    assert set(model.state_dict()) == names  # nothing attached to the exported model
    model_params = {id(p) for p in model.parameters()}
    assert not model_params & {id(p) for p in heads.parameters()}  # the tied embedding is not a head parameter


def test_aux_head_is_a_roberta_lm_head_on_the_layer_output():
    model = make_model()
    heads = make_heads(model, layers=[1])
    ids, mask, pos, _ = make_inputs()
    _, aux = sd_logits(model, heads, ids, mask, pos)
    hidden = model.roberta(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    x = hidden.reshape(-1, 16)[pos]
    head = heads.heads[0]
    x = torch.nn.functional.layer_norm(
        torch.nn.functional.gelu(x @ head.dense.weight.T + head.dense.bias), (16,),
        head.layer_norm.weight, head.layer_norm.bias, eps=model.config.layer_norm_eps,
    )
    expected = x @ model.roberta.embeddings.word_embeddings.weight.T + head.bias
    torch.testing.assert_close(aux[0], expected, rtol=1e-12, atol=1e-12)


def test_sd_loss_hand():
    def log_softmax(z, t=1.0):
        lse = math.log(sum(math.exp(x / t) for x in z))
        return [x / t - lse for x in z]

    final, aux1, aux2, y, alpha, t = [2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0], 0, 0.4, 2.0

    def kd(z):
        lt, ls = log_softmax(final, t), log_softmax(z, t)
        kl = sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
        return (1 - alpha) * -log_softmax(z)[y] + alpha * t**2 * kl

    as_t = lambda z: torch.tensor([z], dtype=D)
    total, parts = sd_loss([as_t(aux1), as_t(aux2)], as_t(final), torch.tensor([y]), alpha, t)
    assert total.item() == pytest.approx(-log_softmax(final)[y] + kd(aux1) + kd(aux2), rel=1e-12)
    assert parts["final_ce"].item() == pytest.approx(-log_softmax(final)[y], rel=1e-12)
    torch.testing.assert_close(parts["aux_loss"], torch.tensor([kd(aux1), kd(aux2)], dtype=D), rtol=1e-12, atol=0)


def test_aux_loss_reaches_shallow_layers_only_and_does_not_train_the_final_head():
    model = make_model()
    heads = make_heads(model, layers=[1])
    ids, mask, pos, labels = make_inputs()
    final, aux = sd_logits(model, heads, ids, mask, pos)
    total, _ = sd_loss(aux, final.detach(), labels, alpha=0.5, temperature=2.0)
    total.backward()  # the auxiliary part alone: the final CE of detached logits has no gradient
    layers = model.roberta.encoder.layer
    assert layers[0].output.dense.weight.grad.abs().max() > 0
    assert model.roberta.embeddings.word_embeddings.weight.grad.abs().max() > 0  # tied decoder + input path
    for deep in (layers[1], layers[2], model.lm_head.dense):  # above the head, or the detached teacher's head
        assert all(p.grad is None for p in deep.parameters())
    assert all(p.grad is not None for p in heads.parameters())


def test_untied_heads_own_their_projection():
    model = make_model()
    heads = make_heads(model, tie_decoder=False)
    assert heads.heads[0].decoder_weight.shape == (50, 16)
    ids, mask, pos, _ = make_inputs()
    _, aux = sd_logits(model, heads, ids, mask, pos)
    assert aux[0].shape == (4, 50)
    n_untied = sum(p.numel() for p in heads.parameters())
    n_tied = sum(p.numel() for p in make_heads(model).parameters())
    assert n_untied - n_tied == 2 * 50 * 16


def test_bad_layers_raise_dwml_error():
    model = make_model()
    with pytest.raises(DwmlError, match="layers"):
        SelfDistillHeads(model.config, layers=[3])  # the last layer already has the model's head
    with pytest.raises(DwmlError, match="layers"):
        SelfDistillHeads(model.config, layers=[0])
    one_layer = build_model(ARCH.replace(layers=1), seed=0)
    with pytest.raises(DwmlError, match="no shallower layer"):
        SelfDistillHeads(one_layer.config)


def test_final_head_learns_from_the_labels_only():
    g = torch.Generator().manual_seed(3)
    final = torch.randn(4, 50, generator=g, dtype=D, requires_grad=True)
    aux = [torch.randn(4, 50, generator=g, dtype=D, requires_grad=True) for _ in range(2)]
    labels = torch.tensor([1, 7, 3, 9])
    total, _ = sd_loss(aux, final, labels, alpha=0.9, temperature=2.0)
    (grad_final,) = torch.autograd.grad(total, final)
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(final, labels), final)
    torch.testing.assert_close(grad_final, expected, rtol=1e-12, atol=1e-15)
