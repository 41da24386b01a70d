"""RoBERTa masked-LM architectures: presets, exact parameter count, construction, masked-position logits.

Models are plain `transformers.RobertaForMaskedLM` so every checkpoint is a Hugging Face model. `count_params` is the
closed-form parameter count of that class (tied input/output embeddings, no pooler), used by the architecture search
(paper section 3.1) to evaluate thousands of candidate shapes without instantiating any.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers' model code takes seconds to import: only where a model is built
    from transformers import RobertaConfig, RobertaForMaskedLM

from .errors import DwmlError

# RoBERTa's padding_idx is 1 and positions start at padding_idx + 1, so a sequence of n tokens needs n + 2 positions.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class Arch:
    """Shape of one RoBERTa masked LM."""

    layers: int
    heads: int
    hidden: int
    intermediate: int
    vocab_size: int = 16384
    max_positions: int = 130  # = seq_len + POSITION_OFFSET

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "hidden", "intermediate", "vocab_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DwmlError(f"arch.{name}: expected a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise DwmlError(f"arch: hidden ({self.hidden}) must be divisible by heads ({self.heads})")

    def replace(self, **changes: Any) -> "Arch":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "arch") -> "Arch":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise DwmlError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
        missing = sorted({"layers", "heads", "hidden", "intermediate"} - set(d))
        if missing:
            raise DwmlError(f"{where}: missing key(s) {missing}")
        return cls(**{k: d[k] for k in d})

    @property
    def name(self) -> str:
        return f"L{self.layers}-A{self.heads}-H{self.hidden}-I{self.intermediate}"

    def to_hf_config(self, **overrides: Any) -> RobertaConfig:
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
        kwargs.update(overrides)
        from transformers import RobertaConfig

        return RobertaConfig(**kwargs)

    @classmethod
    def from_hf_config(cls, cfg: RobertaConfig) -> "Arch":
        return cls(
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
        )


# Named presets. `vocab_size`/`max_positions` are defaults: training replaces them with the tokenizer's vocabulary
# and the configured sequence length. `base` is exactly RoBERTa-base (125M with its 50,265-token vocabulary).
PRESETS: dict[str, Arch] = {
    "tiny": Arch(layers=2, heads=2, hidden=128, intermediate=512, vocab_size=8192, max_positions=130),
    "mini": Arch(layers=4, heads=4, hidden=256, intermediate=1024, vocab_size=16384, max_positions=130),
    "small": Arch(layers=6, heads=8, hidden=512, intermediate=2048, vocab_size=16384, max_positions=130),
    "medium": Arch(layers=8, heads=8, hidden=512, intermediate=2048, vocab_size=16384, max_positions=514),
    "base": Arch(layers=12, heads=12, hidden=768, intermediate=3072, vocab_size=50265, max_positions=514),
}


def get_preset(name: str) -> Arch:
    try:
        return PRESETS[name]
    except KeyError:
        raise DwmlError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None


def count_params(arch: Arch) -> int:
    """Exact `RobertaForMaskedLM(arch.to_hf_config()).num_parameters()` in closed form.

    embeddings: word V*H + position P*H + token-type 1*H + LayerNorm 2H
    per layer:  Q,K,V,O 4(H*H + H) + attn LayerNorm 2H + FFN (H*I + I) + (I*H + H) + out LayerNorm 2H
    LM head:    dense H*H + H, LayerNorm 2H, output bias V (decoder weight tied to the word embeddings)
    """
    V, H, I, L, P = arch.vocab_size, arch.hidden, arch.intermediate, arch.layers, arch.max_positions
    embeddings = V * H + P * H + H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
    head = H * H + H + 2 * H + V
    return embeddings + L * layer + head


def build_model(arch: Arch, seed: int | None = None, **config_overrides: Any) -> RobertaForMaskedLM:
    """A freshly initialised RoBERTa MLM; `seed` makes the initialisation reproducible without touching global RNG."""
    from transformers import RobertaForMaskedLM

    cfg = arch.to_hf_config(**config_overrides)
    if seed is None:
        return RobertaForMaskedLM(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RobertaForMaskedLM(cfg)


def masked_logits(
    model: RobertaForMaskedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    return_hidden_states: bool = False,
):
    """Logits only at the flat indices `positions` of the (B*T) token grid: shape (len(positions), V).

    The vocabulary projection dominates a small MLM's cost (V >> H); masked LM only needs it at the ~15% masked
    positions, so we run the encoder, gather those hidden states and apply the LM head to them alone.
    With `return_hidden_states` it also returns the tuple of all layers' hidden states (for self-distillation).
    """
    out = model.roberta(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=return_hidden_states,
    )
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    logits = model.lm_head(hidden.index_select(0, positions))
    if return_hidden_states:
        return logits, out.hidden_states
    return logits


class Student(torch.nn.Module):
    """One trainable network of a run: a RoBERTa MLM plus, for self-distillation, auxiliary heads.

    Wrapping the masked-position forward in a module (rather than calling `masked_logits` on the bare HF model) lets
    DDP see the forward pass, so gradients are all-reduced as usual; `aux` (if any) is a
    `dwml.selfdistill.SelfDistillHeads` whose heads read the shallower layers' hidden states.
    """

    def __init__(self, mlm: RobertaForMaskedLM, aux: torch.nn.Module | None = None):
        super().__init__()
        self.mlm = mlm
        self.aux = aux

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        """Returns (logits at masked positions (N, V), list of auxiliary logits (empty without aux heads))."""
        if self.aux is None:
            return masked_logits(self.mlm, input_ids, attention_mask, positions), []
        from .selfdistill import sd_logits

        return sd_logits(self.mlm, self.aux, input_ids, attention_mask, positions)
