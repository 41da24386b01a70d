"""Self-distillation for a masked LM: "Be Your Own Teacher" (Zhang et al. 2019, BYOT).

Shallow encoder layers get their own auxiliary MLM heads; each learns from the labels and from the model's own
deepest head (its soft outputs, detached), and the final head learns from the labels alone:

    L = CE(z_final, Y) + sum_{l in layers} [ (1 - alpha) CE(z_l, Y) + alpha T^2 KL(p_final^T || p_l^T) ]

BYOT's sum over all shallow classifiers, without its feature-hint (L2 between hidden features) term. The deep
supervision gives the shallow layers a short gradient path, and the detached final head is the teacher (its soft
targets only train the shallow heads; the final head is not pulled towards them).

The heads live in a separate `SelfDistillHeads` module: the model itself (and what gets exported with
`save_pretrained`) is the unchanged `RobertaForMaskedLM`, and its final logits do not depend on the heads.
Each head is a RobertaLMHead (dense -> gelu -> LayerNorm -> vocabulary projection + bias). On a pre-norm
ModernBERT the shallow hidden states are the raw residual stream (the model normalises only after its last layer,
`final_norm`), so there each head first applies its own LayerNorm, and its layers have no biases but the output
bias, like ModernBERT's own head. By default the
projection reuses the model's input word embeddings, like the model's own tied LM head: an untied V x H matrix
would add a whole embedding table per head (V >> H in small MLMs), and the shared table also receives the
auxiliary gradients. The embedding weight is passed in at call time instead of being registered, so the heads'
parameters never include (or double count in an optimizer) a parameter of the model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import RobertaConfig

from ..errors import require
from .losses import kd_loss, mlm_loss


class AuxLMHead(nn.Module):
    """A RobertaLMHead whose vocabulary projection may be the (shared) word-embedding matrix passed at call time;
    for a ModernBERT config, a bias-free ModernBERT-style head behind its own LayerNorm (see the module docstring)."""

    def __init__(self, config: RobertaConfig, tie_decoder: bool = True):
        super().__init__()
        hidden, vocab = config.hidden_size, config.vocab_size
        pre_norm = getattr(config, "model_type", "roberta") == "modernbert"
        eps = config.norm_eps if pre_norm else config.layer_norm_eps
        self.input_norm = nn.LayerNorm(hidden, eps=eps, bias=False) if pre_norm else nn.Identity()
        self.dense = nn.Linear(hidden, hidden, bias=not pre_norm)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps, bias=not pre_norm)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.decoder_weight = None if tie_decoder else nn.Parameter(torch.empty(vocab, hidden))
        # RoBERTa's initialisation: N(0, initializer_range) weights, zero biases, identity LayerNorm.
        nn.init.normal_(self.dense.weight, std=config.initializer_range)
        if self.dense.bias is not None:
            nn.init.zeros_(self.dense.bias)
        if self.decoder_weight is not None:
            nn.init.normal_(self.decoder_weight, std=config.initializer_range)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor | None = None) -> torch.Tensor:
        x = self.layer_norm(F.gelu(self.dense(self.input_norm(hidden))))
        weight = self.decoder_weight if self.decoder_weight is not None else embedding_weight
        if weight is None:
            raise ValueError("a tied auxiliary head needs the model's word-embedding weight")
        return F.linear(x, weight, self.bias)


class SelfDistillHeads(nn.Module):
    """Auxiliary MLM heads on encoder layers `layers` (1-based; default: every layer but the last)."""

    def __init__(self, config: RobertaConfig, layers: Sequence[int] | None = None, tie_decoder: bool = True):
        super().__init__()
        num_layers = config.num_hidden_layers
        chosen = list(range(1, num_layers)) if layers is None else sorted(set(int(x) for x in layers))
        require(
            len(chosen) > 0,
            f"self_distill.layers: a {num_layers}-layer model has no shallower layer to attach a head to",
        )
        require(
            all(1 <= layer < num_layers for layer in chosen),
            f"self_distill.layers: expected layers in 1..{num_layers - 1} (the last layer has the model's head), "
            f"got {list(layers or [])}",
        )
        self.layers = tuple(chosen)
        self.tie_decoder = tie_decoder
        self.heads = nn.ModuleList(AuxLMHead(config, tie_decoder) for _ in chosen)

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor],
        positions: torch.Tensor,
        embedding_weight: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """(N, V) logits of each head at the masked `positions`; hidden_states[l] is layer l's (B, T, H) output
        (index 0 = embeddings, as Hugging Face returns them)."""
        out = []
        for layer, head in zip(self.layers, self.heads):
            hidden = hidden_states[layer]
            selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
            out.append(head(selected, embedding_weight))
        return out


def sd_loss(
    aux_logits_list: Sequence[torch.Tensor],
    final_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(final) + sum over heads of Hinton KD from the detached final head (`kd_loss`). Returns (total, parts):
    "final_ce" and, per head (K,), "aux_ce" and "aux_loss" (detached)."""
    final_ce = mlm_loss(final_logits, labels)
    teacher = final_logits.detach()
    aux = [kd_loss(z, teacher, labels, alpha, temperature) for z in aux_logits_list]
    total = final_ce + sum(aux)
    with torch.no_grad():
        aux_ce = [mlm_loss(z, labels) for z in aux_logits_list]
    parts = {
        "final_ce": final_ce.detach(),
        "aux_loss": torch.stack(aux).detach() if aux else final_ce.new_zeros(0),
        "aux_ce": torch.stack(aux_ce) if aux else final_ce.new_zeros(0),
    }
    return total, parts
