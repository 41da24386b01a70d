"""Masked-LM architectures: presets, exact parameter count, construction, masked-position logits.

Two families (`Arch.family`, config `model.family`):
- "roberta" (default, the paper's model): plain `transformers.RobertaForMaskedLM`, post-LayerNorm, learned absolute
  positions, GELU FFN, biases everywhere.
- "modernbert": `transformers.ModernBertForMaskedLM` (model_type "modernbert", in transformers since 4.48, loaded by
  `AutoModelForMaskedLM` without trust_remote_code): pre-LayerNorm, rotary positions, GeGLU FFN, no biases except
  the decoder's. Its `intermediate` is HF's `intermediate_size`, the GLU width: the FFN has 3*H*I weights
  (Wi: H -> 2I, Wo: I -> H) where RoBERTa's has 2*H*I, so I = 8H/3 matches a 4H RoBERTa FFN (Shazeer 2020).

Every checkpoint is a Hugging Face model. `count_params` is the closed-form parameter count of each class (tied
input/output embeddings, no pooler), used by the architecture search (paper section 3.1) to evaluate thousands of
candidate shapes without instantiating any.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:  # transformers' model code takes seconds to import: only where a model is built
    from transformers import ModernBertConfig, ModernBertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    MaskedLM = RobertaForMaskedLM | ModernBertForMaskedLM

from ..config import check_family
from ..data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from ..errors import DwmlError

# RoBERTa's padding_idx is 1 and positions start at padding_idx + 1, so a sequence of n tokens needs n + 2 positions.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class Arch:
    """Shape of one masked LM of family `family` (see the module docstring)."""

    layers: int
    heads: int
    hidden: int
    intermediate: int
    vocab_size: int = 16384
    max_positions: int = 130  # = seq_len + POSITION_OFFSET (ModernBERT: RoPE has no table, this only caps lengths)
    family: str = "roberta"

    def __post_init__(self) -> None:
        check_family(self.family, "arch.family")
        for name in ("layers", "heads", "hidden", "intermediate", "vocab_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DwmlError(f"arch.{name}: expected a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise DwmlError(f"arch: hidden ({self.hidden}) must be divisible by heads ({self.heads})")

    def replace(self, **changes: Any) -> "Arch":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
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
        prefix = "MB-" if self.family == "modernbert" else ""  # RoBERTa names stay as they always were
        return f"{prefix}L{self.layers}-A{self.heads}-H{self.hidden}-I{self.intermediate}"

    def _hf_shape(self) -> dict[str, int]:
        """The shape fields both families' Hugging Face configs spell alike."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, intermediate_size=self.intermediate,
                    max_position_embeddings=self.max_positions)

    def to_hf_config(self, dropout: float | None = None, **overrides: Any) -> RobertaConfig | ModernBertConfig:
        """The Hugging Face config of this shape; `dropout` (None = HF's default) sets every dropout of the family."""
        if self.family == "modernbert":
            return self._modernbert_config(dropout, overrides)
        kwargs = dict(
            **self._hf_shape(),
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
        if dropout is not None:
            kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        kwargs.update(overrides)
        from transformers import RobertaConfig

        return RobertaConfig(**kwargs)

    def _modernbert_config(self, dropout: float | None, overrides: Mapping[str, Any]) -> ModernBertConfig:
        """ModernBERT settings for BabyLM-sized sequences (data.seq_len 128), each chosen so that the model is the
        same under transformers 4.51.3 and 5.x (which spell attention layout and RoPE differently) and needs
        nothing but PyTorch:
        - global attention in every layer (`global_attn_every_n_layers=1`, written to config.json, which both
          versions read): ModernBERT alternates global and 128-token local layers for 8k contexts; at 128 tokens a
          local window buys nothing. `local_attention` still covers every position, so even a reader that made
          some layers local would mask nothing.
        - RoPE base 10,000 for both layer kinds (old `global_rope_theta`/`local_rope_theta` and 5.x's
          `rope_parameters` alike): ModernBERT's 160k global base is for 8k positions; over 128 positions most of
          its frequencies would barely turn.
        - attention through PyTorch SDPA on padded batches (`attn_implementation="sdpa"`, no flash-attn, no
          unpadding): our packed sequences are almost never padded, and SDPA keeps double backward (DWML's
          hypergradient) and torch.func working.
        - `reference_compile=False`: dwml decides about torch.compile (`train.compile`); 4.51.3 would otherwise
          compile parts of the model on its own (5.x dropped the option).
        - dropout: `model.dropout` for the embedding, attention and MLP dropouts (ModernBERT's default is 0).
        - special ids from our tokenizer (<s>=cls=bos, </s>=sep=eos, <pad>), tied input/output embeddings (HF's
          default for the family); initialisation is HF's (`post_init`: truncated normal, depth-scaled outputs).
        """
        from transformers import ModernBertConfig

        theta = 10_000.0
        kwargs: dict[str, Any] = dict(
            **self._hf_shape(),
            global_attn_every_n_layers=1,
            local_attention=2 * self.max_positions,
            global_rope_theta=theta,
            local_rope_theta=theta,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            cls_token_id=BOS_ID,
            sep_token_id=EOS_ID,
            tie_word_embeddings=True,
            reference_compile=False,
            attn_implementation="sdpa",
        )
        if dropout is not None:
            kwargs.update(embedding_dropout=dropout, attention_dropout=dropout, mlp_dropout=dropout)
        kwargs.update(overrides)
        cfg = ModernBertConfig(**kwargs)
        # 5.x turns the two thetas into `rope_parameters` and drops the old keys from config.json; 4.51.3 reads only
        # the old keys (defaulting the global one to 160k), so keep them as plain attributes that are saved too.
        cfg.global_rope_theta = cfg.local_rope_theta = kwargs["global_rope_theta"]
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "Arch":
        return cls(  # (a model type that is no dwml family is refused by __post_init__)
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
            family=getattr(cfg, "model_type", "roberta"),
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
# ModernBERT presets: the RoBERTa preset's layers, heads and hidden size, and the GeGLU width (a multiple of 16 near
# 8H/3) that makes the exact parameter count equal the RoBERTa preset's within 0.3% (tested), so that `model.family`
# can be switched at a fixed preset and parameter budget. (`base` here is RoBERTa-base-sized, not ModernBERT-base,
# which has 22 layers and an 8k context.)
MODERNBERT_INTERMEDIATE = {"tiny": 368, "mini": 704, "small": 1376, "medium": 1392, "base": 2064}


def get_preset(name: str, family: str = "roberta") -> Arch:
    try:
        arch = PRESETS[name]
    except KeyError:
        raise DwmlError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None
    if family == "roberta":
        return arch
    return arch.replace(family=family, intermediate=MODERNBERT_INTERMEDIATE[name])


def count_params(arch: Arch) -> Any:
    """Exact `num_parameters()` of `build_model(arch)` in closed form (plain arithmetic, so the search also calls it
    on numpy arrays of shapes).

    RoBERTa (`RobertaForMaskedLM`):
      embeddings: word V*H + position P*H + token-type 1*H + LayerNorm 2H
      per layer:  Q,K,V,O 4(H*H + H) + attn LayerNorm 2H + FFN (H*I + I) + (I*H + H) + out LayerNorm 2H
      LM head:    dense H*H + H, LayerNorm 2H, output bias V (decoder weight tied to the word embeddings)
    ModernBERT (`ModernBertForMaskedLM`; no biases, bias-free LayerNorms, RoPE has no parameters):
      embeddings: word V*H + LayerNorm H
      per layer:  Wqkv 3H*H + Wo H*H + GeGLU Wi 2I*H + Wo I*H + mlp_norm H + attn_norm H (none in layer 0, which
                  reads the already normalised embeddings)
      final_norm H; head: dense H*H + LayerNorm H; decoder bias V (weight tied to the word embeddings)
    """
    V, H, I, L, P = arch.vocab_size, arch.hidden, arch.intermediate, arch.layers, arch.max_positions
    if getattr(arch, "family", "roberta") == "modernbert":
        embeddings = V * H + H
        layers = L * (4 * H * H + 3 * H * I + H) + (L - 1) * H
        return embeddings + layers + H + (H * H + H) + V
    embeddings = V * H + P * H + H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
    head = H * H + H + 2 * H + V
    return embeddings + L * layer + head


def build_model(arch: Arch, seed: int | None = None, dropout: float | None = None, **config_overrides: Any) -> MaskedLM:
    """A freshly initialised MLM of `arch.family` with Hugging Face's initialisation for that family; `seed` makes it
    reproducible without touching the global RNG; `dropout` (None = HF's default) sets every dropout probability."""
    from transformers import ModernBertForMaskedLM, RobertaForMaskedLM

    cls = ModernBertForMaskedLM if arch.family == "modernbert" else RobertaForMaskedLM
    cfg = arch.to_hf_config(dropout, **config_overrides)
    if seed is None:
        return cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def encoder_and_head(model: Any) -> tuple[torch.nn.Module, Any] | None:
    """(encoder, LM head) of a RoBERTa or ModernBERT MLM, the head mapping final hidden states to logits; None for
    any other model. ModernBERT's head is its `head` (dense -> GELU -> LayerNorm) followed by the tied `decoder`."""
    if hasattr(model, "roberta") and hasattr(model, "lm_head"):
        return model.roberta, model.lm_head
    if getattr(getattr(model, "config", None), "model_type", None) == "modernbert" and hasattr(model, "decoder"):
        return model.model, lambda h: model.decoder(model.head(h))
    return None


def masked_logits(
    model: MaskedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    return_hidden_states: bool = False,
):
    """Logits only at the flat indices `positions` of the (B*T) token grid: shape (len(positions), V).

    The vocabulary projection dominates a small MLM's cost (V >> H); masked LM only needs it at the ~15% masked
    positions, so we run the encoder, gather those hidden states and apply the LM head to them alone.
    With `return_hidden_states` it also returns the tuple of all layers' hidden states (for self-distillation;
    index 0 = embeddings, l = the output of layer l).
    """
    parts = encoder_and_head(model)
    if parts is None:
        raise DwmlError(f"masked_logits: expected a RoBERTa or ModernBERT masked LM, got {type(model).__name__}")
    encoder, head = parts
    out = encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=return_hidden_states,
    )
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    logits = head(hidden.index_select(0, positions))
    if return_hidden_states:
        return logits, out.hidden_states
    return logits


class Student(torch.nn.Module):
    """One trainable network of a run: a RoBERTa or ModernBERT MLM plus, for self-distillation, auxiliary heads.

    Wrapping the masked-position forward in a module (rather than calling `masked_logits` on the bare HF model) lets
    DDP see the forward pass, so gradients are all-reduced as usual; `aux` (if any) is a
    `dwml.distill.selfdistill.SelfDistillHeads` whose heads read the shallower layers' hidden states.
    """

    def __init__(self, mlm: MaskedLM, aux: torch.nn.Module | None = None):
        super().__init__()
        self.mlm = mlm
        self.aux = aux

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        """Returns (logits at masked positions (N, V), list of auxiliary logits (empty without aux heads))."""
        if self.aux is None:
            return masked_logits(self.mlm, input_ids, attention_mask, positions), []
        return sd_logits(self.mlm, self.aux, input_ids, attention_mask, positions)


def sd_logits(
    model: torch.nn.Module,
    heads: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final logits, [aux logits per head]) at the masked positions, from one encoder pass; `heads` is a
    `dwml.distill.selfdistill.SelfDistillHeads` (it lives with the self-distillation loss, a layer above)."""
    final, hidden_states = masked_logits(model, input_ids, attention_mask, positions, return_hidden_states=True)
    embedding = model.get_input_embeddings().weight if heads.tie_decoder else None
    return final, heads(hidden_states, positions, embedding)
