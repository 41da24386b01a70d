"""Run configuration: dataclasses with defaults, overridden by TOML files and `--set section.key=value`.

Unknown keys and wrongly typed values fail loudly with the file and the field named, so a typo in a config can never
silently fall back to a default. The resolved configuration is written as TOML into every run directory.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import DwmlError

METHODS = ("mlm", "kd", "sd", "dml", "dwml", "kd_dwml")
SCHEDULES = ("cosine", "linear", "trapezoid", "constant")  # learning-rate shapes after warm-up (dwml.training.schedule)
BABYLM_TRACKS = ("none", "strict-small", "strict")  # train.babylm_track; budgets in dwml.training.exposure
MODEL_FAMILIES = ("roberta", "modernbert")  # model.family; see dwml.models.model


MISSING_TENSORBOARD = ("train.tensorboard: the tensorboard package is not installed "
                       "(pip install 'dwml[tensorboard]', or set train.tensorboard = false)")


def tensorboard_available() -> bool:
    """Whether `train.tensorboard = true` can work (checked when the config is validated, before any work)."""
    return importlib.util.find_spec("tensorboard") is not None


def check_family(family: Any, where: str) -> None:
    """The one check that `family` names a model family (`MODEL_FAMILIES`); `where` names the field."""
    _check(family in MODEL_FAMILIES,
           f"{where}: unknown model family {family!r}; expected one of {list(MODEL_FAMILIES)}")


@dataclass
class DataConfig:
    prepared: str = "runs/data"  # directory written by `dwml prepare`
    seq_len: int = 128  # tokens per packed sequence, <s> and </s> included
    mask_prob: float = 0.15
    # > 0: the training masking rate moves linearly from mask_prob at the first step to mask_prob_end at
    # train.max_steps (GPT-BERT, BabyLM 2025's baseline: 30% -> 15%); 0 = mask_prob throughout.
    mask_prob_end: float = 0.0
    # Validation masks at this fixed rate whatever mask_prob trains with, so validation losses of recipes with
    # different masking rates measure the same task (a 40%-masked loss is higher for reasons unrelated to learning).
    eval_mask_prob: float = 0.15
    # What becomes of a token selected for prediction in training (and DWML's held-out batches): this share turns
    # into <mask>, this share into a random token, the rest stays visible (BERT's 80/10/10). BabyBERTa's
    # "no unmasking" is 1.0 / 0.0. Validation keeps BERT's split, so valid losses compare across recipes.
    replace_mask: float = 0.8
    replace_random: float = 0.1
    # What ends each utterance (document) of a packed sequence but the last: "eos" (`<s> u1 </s> u2 </s>`) or
    # "newline" (`<s> u1 \n u2 </s>`: the tokenizer's newline token, the separator of BabyLM's dialogue pairs -
    # qa_congruence, turn_taking). An "eos" run exports a tokenizer that reads a line break as </s>
    # (`dwml.data.tokenizer.with_line_ends`), so its model meets those pairs as the lines it trained on. The newline
    # is a real token (masked and predicted like the others), so losses do not compare across the two. "mixed": the
    # newline after half of the utterances (a fixed hash of each one's index), </s> after the others, so that a
    # model knows both the dialogue form and BLiMP's `<s> sentence </s>`.
    separator: str = "eos"
    # Names of prepared sources (`dwml prepare`'s meta.json, one per corpus file) whose utterances alone take the
    # newline of "newline" / "mixed"; the others end with </s>. Empty = every source. E.g. the dialogue corpora
    # (CHILDES, Switchboard: a newline between turns, as in the supplement's pairs) with </s> between prose sentences.
    separator_sources: list = field(default_factory=list)
    heldout_sequences: int = 256  # valid sequences reserved for DWML's outer loop (L2); excluded from every
    #                               run's reporting set (also runs that learn no omega), so all runs report alike
    prefetch: int = 2  # batches built ahead in a background thread (0 = build each batch when the loop asks)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # architecture of a single-model run (mlm, kd, sd)
    # Explicit architecture fields override the preset (0 = keep the preset's value).
    layers: int = 0
    heads: int = 0
    hidden: int = 0
    intermediate: int = 0
    # Peers of a multi-model run (dml, dwml, kd_dwml): preset names, or a JSON file written by `dwml search`.
    peers: list = field(default_factory=list)
    peers_file: str = ""
    dropout: float = 0.1
    family: str = "roberta"  # roberta (the paper's model) | modernbert (pre-norm, RoPE, GeGLU; dwml.models.model)


@dataclass
class TrainConfig:
    method: str = "mlm"
    max_steps: int = 1000
    batch_size: int = 32  # sequences per micro-batch (per rank)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    schedule: str = "cosine"  # after warm-up: cosine | linear | trapezoid | constant (dwml.training.schedule)
    cooldown_fraction: float = 0.2  # trapezoid: the last fraction of max_steps decays linearly, the rest is flat
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    # > 0: validation, milestones and the export use an EMA of the weights with this decay (dwml.training.averaging;
    # GPT-BERT's weight averaging); 0 = the last weights
    ema_decay: float = 0.0
    eval_every: int = 200
    eval_batches: int = 16  # validation set = the first eval_batches x eval_batch_size valid sequences ...
    eval_batch_size: int = 32  # ... independent of the training batch size, so runs stay comparable
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    # BabyLM exposure rules (dwml.training.exposure): "strict-small" (100M words, 10 epochs), "strict" (1B words,
    # 10 epochs) or "none"; a track also writes the milestone checkpoints RUN/chck/chck_1M ... at those words seen
    babylm_track: str = "none"
    progress: bool = True
    max_nonfinite_skips: int = 0  # steps with a NaN/inf loss or gradient norm to skip before stopping (0 = stop)
    tensorboard: bool = False  # also log metrics.jsonl's numbers as TensorBoard scalars in RUN/tensorboard/


@dataclass
class DistillConfig:
    alpha: float = 0.5  # weight of the distillation terms, eq. (2)
    temperature: float = 1.0
    outer_every: int = 20  # K: inner steps between outer (omega) steps; an outer step costs ~3 inner steps
    heldout_batch_size: int = 0  # sequences per outer-step batch (L2 held-out, and L1 on the first rows of the
    #                             last train batch); 0 = half the train batch
    eta: float = 0.5  # mirror-descent step size, eq. (4)
    eta_schedule: str = "inv_sqrt"  # constant | inv_sqrt (eta / sqrt(t)) | cosine (to eta_min at the last step)
    eta_min: float = 0.0
    omega_floor: float = 0.01  # no peer weight drops below this (multiplicative updates cannot revive a zero)
    gamma: float = -1.0  # unroll step of eq. (3); < 0 means "the current learning rate"
    detach_targets: bool = True  # KL targets z_j are treated as constants (as in DML)
    learn_omega: bool = True  # False = keep omega fixed (ablation)
    omega: list = field(default_factory=list)  # initial / fixed omega; empty = uniform
    l2: str = "ensemble"  # outer loss: ensemble (CE of the omega-mixture) | sum (sum_i omega_i CE_i)
    # Exact mixed term of eq. (3): per_peer | double_backward | jvp. The default is the fastest measured on the CPU
    # (benchmarks/bench_outer_modes.py: 1.65 vs jvp 1.70 vs per_peer 1.92 inner steps, 3 peers); GPU unmeasured.
    hypergrad: str = "double_backward"
    unroll: str = "adamw"  # inner step the outer step differentiates: adamw (the real one) | sgd (eq. 3) | direct
    #                        (adamw's theta', mixed term dropped: ablation)
    teacher: str = ""  # HF model dir or run dir of a teacher (kd, kd_dwml)
    teacher_weight: float = 0.5  # kd_dwml: weight of the teacher term
    teacher_words: int = -1  # whitespace words the teacher was trained on; -1 = from its dwml run summary
    sd_layers: list = field(default_factory=list)  # sd: layers with auxiliary heads; empty = all but the last


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> "RunConfig":
        t, d = self.train, self.distill
        _check(t.method in METHODS, f"train.method: unknown method {t.method!r}; expected one of {list(METHODS)}")
        _check(0.0 <= d.alpha <= 1.0, f"distill.alpha: expected a value in [0, 1], got {d.alpha}")
        _check(d.outer_every >= 1, f"distill.outer_every (K): expected an integer >= 1, got {d.outer_every}")
        _check(math.isfinite(d.temperature) and d.temperature > 0,
               f"distill.temperature: expected a finite value > 0, got {d.temperature}")
        _check(math.isfinite(d.eta) and d.eta > 0, f"distill.eta: expected a finite value > 0, got {d.eta}")
        _check(d.eta_schedule in ("constant", "inv_sqrt", "cosine"),
               f"distill.eta_schedule: expected constant|inv_sqrt|cosine, got {d.eta_schedule!r}")
        _check(0.0 <= d.eta_min <= d.eta, f"distill.eta_min: expected [0, eta], got {d.eta_min}")
        _check(0.0 <= d.omega_floor < 1.0, f"distill.omega_floor: expected [0, 1), got {d.omega_floor}")
        _check(d.l2 in ("ensemble", "sum"), f"distill.l2: expected ensemble|sum, got {d.l2!r}")
        _check(d.hypergrad in ("per_peer", "double_backward", "jvp"),
               f"distill.hypergrad: expected per_peer|double_backward|jvp, got {d.hypergrad!r}")
        _check(d.unroll in ("adamw", "sgd", "direct"),
               f"distill.unroll: expected adamw|sgd|direct, got {d.unroll!r}")
        _check(0.0 <= d.teacher_weight <= 1.0, f"distill.teacher_weight: expected [0, 1], got {d.teacher_weight}")
        _check(t.max_steps >= 1, f"train.max_steps: expected >= 1, got {t.max_steps}")
        _check(t.batch_size >= 1, f"train.batch_size: expected >= 1, got {t.batch_size}")
        _check(t.grad_accum >= 1, f"train.grad_accum: expected >= 1, got {t.grad_accum}")
        _check(math.isfinite(t.lr) and t.lr > 0, f"train.lr: expected a finite value > 0, got {t.lr}")
        _check(t.warmup_steps >= 0, f"train.warmup_steps: expected >= 0, got {t.warmup_steps}")
        _check(math.isfinite(t.weight_decay) and t.weight_decay >= 0,
               f"train.weight_decay: expected a finite value >= 0, got {t.weight_decay}")
        for name in ("beta1", "beta2"):
            b = getattr(t, name)
            _check(0.0 <= b < 1.0, f"train.{name}: expected a value in [0, 1), got {b}")
        _check(math.isfinite(t.eps) and t.eps > 0, f"train.eps: expected a finite value > 0, got {t.eps}")
        _check(math.isfinite(t.grad_clip) and t.grad_clip >= 0,
               f"train.grad_clip: expected a finite value >= 0 (0 = off), got {t.grad_clip}")
        _check(math.isfinite(t.ema_decay) and 0.0 <= t.ema_decay < 1.0,
               f"train.ema_decay: expected a value in [0, 1) (0 = off), got {t.ema_decay}")
        for name in ("eval_every", "save_every", "log_every", "eval_batches", "eval_batch_size"):
            _check(getattr(t, name) >= 1, f"train.{name}: expected an integer >= 1, got {getattr(t, name)}")
        _check(t.max_nonfinite_skips >= 0, f"train.max_nonfinite_skips: expected >= 0, got {t.max_nonfinite_skips}")
        _check(0.0 <= self.model.dropout < 1.0, f"model.dropout: expected a value in [0, 1), got {self.model.dropout}")
        _check(math.isfinite(d.gamma), f"distill.gamma: expected a finite value, got {d.gamma}")
        _check(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio: expected [0, 1], got {t.min_lr_ratio}")
        _check(t.schedule in SCHEDULES, f"train.schedule: expected one of {'|'.join(SCHEDULES)}, got {t.schedule!r}")
        _check(0.0 < t.cooldown_fraction <= 1.0,
               f"train.cooldown_fraction: expected (0, 1], got {t.cooldown_fraction}")
        _check(t.dtype in ("auto", "bf16", "fp32"), f"train.dtype: expected auto|bf16|fp32, got {t.dtype!r}")
        _check(t.babylm_track in BABYLM_TRACKS,
               f"train.babylm_track: expected one of {'|'.join(BABYLM_TRACKS)}, got {t.babylm_track!r}")
        _check(isinstance(d.teacher_words, int) and d.teacher_words >= -1,
               f"distill.teacher_words: expected a number of words >= 0 (or -1: from the teacher's run), "
               f"got {d.teacher_words!r}")
        if t.tensorboard:
            _check(tensorboard_available(), MISSING_TENSORBOARD)
        _check(self.data.seq_len >= 8, f"data.seq_len: expected >= 8, got {self.data.seq_len}")
        _check(self.data.separator in ("eos", "newline", "mixed"),
               f"data.separator: expected eos|newline|mixed, got {self.data.separator!r}")
        _check(all(isinstance(n, str) and n for n in self.data.separator_sources),
               f"data.separator_sources: expected source names, got {self.data.separator_sources!r}")
        _check(not self.data.separator_sources or self.data.separator != "eos",
               "data.separator_sources: only with data.separator = newline or mixed")
        check_family(self.model.family, "model.family")
        _check(0.0 < self.data.mask_prob < 1.0, f"data.mask_prob: expected (0, 1), got {self.data.mask_prob}")
        _check(self.data.mask_prob_end == 0.0 or 0.0 < self.data.mask_prob_end < 1.0,
               f"data.mask_prob_end: expected (0, 1), or 0 for a constant rate, got {self.data.mask_prob_end}")
        _check(0.0 < self.data.eval_mask_prob < 1.0,
               f"data.eval_mask_prob: expected (0, 1), got {self.data.eval_mask_prob}")
        check_replace(self.data.replace_mask, self.data.replace_random, "data.replace_mask/replace_random")
        _check(0 <= self.data.prefetch <= 64, f"data.prefetch: expected an integer in [0, 64], got {self.data.prefetch}")
        if t.method in ("kd", "kd_dwml"):
            _check(bool(d.teacher), f"distill.teacher: method {t.method} needs a teacher model directory")
        for w in d.omega:
            _check(isinstance(w, (int, float)) and math.isfinite(w) and w > 0,
                   f"distill.omega: expected positive finite numbers, got {d.omega}")
        return self


def check_replace(to_mask: float, to_random: float, where: str = "replace") -> None:
    """The one check of a masking corruption split: shares of the selected tokens that become <mask> and a random
    token (`data.replace_mask` / `data.replace_random`; `dwml.data.masking`)."""
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0 for x in (to_mask, to_random))
    _check(ok and to_mask + to_random <= 1.0 + 1e-12,
           f"{where}: expected two shares in [0, 1] with a sum <= 1 (<mask>, random token), got {to_mask!r}, "
           f"{to_random!r}")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise DwmlError(message)


# --------------------------------------------------------------------------------------------------------------
# Strict dataclass <- mapping conversion


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    if tp is list or origin is list:
        return isinstance(value, list)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    return True


def from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise DwmlError naming `where`.key."""
    if not isinstance(data, Mapping):
        raise DwmlError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise DwmlError(f"{prefix}unknown key(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{where}.{name}" if where else name)
            continue
        if not _type_ok(value, tp):
            expected = getattr(tp, "__name__", str(tp))
            raise DwmlError(f"{where + '.' if where else ''}{name}: expected {expected}, got {value!r}")
        kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def merge(base: dict, override: Mapping[str, Any]) -> dict:
    """Recursive dict merge (override wins), used to layer several config files."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DwmlError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DwmlError(f"{path}: invalid TOML ({e})") from None


def parse_set(expr: str) -> dict:
    """`section.key=value` -> nested dict; value parsed as TOML (numbers, booleans, lists, strings)."""
    if "=" not in expr:
        raise DwmlError(f"--set {expr!r}: expected section.key=value")
    key, raw = expr.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(
    paths: list[str | Path] | None = None, sets: list[str] | None = None, cls: type = RunConfig
) -> Any:
    """Defaults <- each TOML file in order <- each `--set` override; validated."""
    data: dict = {}
    where = "config"
    for p in paths or []:
        data = merge(data, read_toml(p))
        where = str(p)
    if data:
        from_dict(cls, data, where)  # errors in the files name the file ...
    for s in sets or []:
        override = parse_set(s)
        try:
            from_dict(cls, override, "")  # ... and errors in an override name that --set
        except DwmlError as e:
            raise DwmlError(f"--set {s}: {e}") from None
        data = merge(data, override)
    cfg = from_dict(cls, data, where)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


# --------------------------------------------------------------------------------------------------------------
# TOML output (the subset our configs use: scalars, lists, nested tables)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(obj: Any) -> str:
    """Serialise a (nested) dataclass or dict; `read_toml(to_toml(cfg))` round-trips."""
    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    lines: list[str] = []
    tables: list[tuple[str, Mapping]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        for k, v in table.items():
            lines.append(f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"
