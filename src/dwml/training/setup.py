"""The training run's set-up pieces: which students (`resolve_archs`), their initial weights, optimizers and omega,
a KD teacher, the batch streams (train, the outer step's held-out split, fixed validation batches), RNG states for
exact resume, DDP wrapping and the final Hugging Face export. `dwml.training.train.Trainer` assembles them.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checks import check_peer_arch, check_peers_file, data_fingerprint, model_fingerprint, tokenizer_fingerprint
from ..config import RunConfig
from ..data.masking import BatchStream, Prefetcher
from ..data.shards import PackedSequences, load_meta
from ..data.tokenizer import copy_tokenizer, newline_id
from ..distill.hypergrad import OmegaState
from ..distill.methods import PEER_METHODS, TEACHER_METHODS
from ..distill.selfdistill import SelfDistillHeads
from ..errors import DwmlError
from ..io import atomic_dir, write_json
from ..models.memory import arch_from_folder, check_training_memory
from ..models.model import POSITION_OFFSET, Arch, Student, build_model, count_params, get_preset
from .exposure import TRACKS, ExposurePlan, check_budget, stream_exposure, teacher_words
from .runtime import Runtime


def resolve_archs(cfg: RunConfig, vocab_size: int) -> list[tuple[str, Arch]]:
    """(name, Arch) of every student. Peers come from `model.peers` / `model.peers_file`; else one from the preset.
    Presets and peer tables are built in `model.family`; a peers file (or table) that names another family is an
    error rather than a silent switch of the family."""
    m = cfg.model
    positions = cfg.data.seq_len + POSITION_OFFSET
    archs: list[tuple[str, Arch]] = []
    if m.peers_file:
        from ..models.search import read_peers_file

        peers = read_peers_file(m.peers_file)
        archs = [(f"peer{i}", a) for i, (a, _) in enumerate(peers)]
        families = sorted({a.family for _, a in archs})
        if families != [m.family]:
            raise DwmlError(f"model.peers_file: {m.peers_file} holds {'/'.join(families)} peers but model.family is "
                            f"{m.family}; search with `dwml search --family {m.family}` or set model.family")
        check_peers_file(m.peers_file, [table for _, table in peers], vocab_size, positions)
    for i, p in enumerate(m.peers):
        if isinstance(p, str):
            archs.append((p, get_preset(p, m.family)))
        elif isinstance(p, dict):
            check_peer_arch(p, vocab_size, positions, f"model.peers[{i}]")
            if p.get("family", m.family) != m.family:  # e.g. searched peers of another family than this run's
                raise DwmlError(f"model.peers[{i}]: a {p['family']} architecture, but model.family is {m.family}")
            archs.append((f"peer{len(archs)}", Arch.from_dict({"vocab_size": vocab_size, "family": m.family, **p},
                                                              f"model.peers[{i}]")))
        else:
            raise DwmlError(f"model.peers[{i}]: expected a preset name or an architecture table, got {p!r}")
    if not archs:
        a = get_preset(m.preset, m.family)
        overrides = {k: getattr(m, k) for k in ("layers", "heads", "hidden", "intermediate") if getattr(m, k)}
        archs = [(m.preset, a.replace(**overrides) if overrides else a)]
    method = cfg.train.method
    if method in PEER_METHODS and len(archs) < 2:
        raise DwmlError(f"train.method {method}: needs at least 2 peers (model.peers or model.peers_file)")
    if method == "sd" and len(archs) != 1:
        raise DwmlError("train.method sd: trains a single network; give model.preset, not model.peers")
    return [(name, a.replace(vocab_size=vocab_size, max_positions=positions)) for name, a in archs]


def make_optimizer(module: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (all 1-D parameters) get no weight decay. On CUDA the fused kernel (one
    launch for all parameters instead of several per tensor); the CPU has no fused AdamW worth using."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)


def teacher_dir(path: str) -> Path:
    """The model folder of `distill.teacher`: a Hugging Face folder, or a finished run (its first peer)."""
    p = Path(path)
    if (p / "final" / "peer0" / "config.json").is_file():
        p = p / "final" / "peer0"
    if not (p / "config.json").is_file():
        raise DwmlError(f"distill.teacher: {path} is not a model directory (no config.json) or a finished run")
    return p


def input_fingerprints(cfg: RunConfig, prepared: Path, meta: dict, tokenizer_sha: str) -> dict[str, str]:
    """What the weights depend on besides the config: the tokenizer, the prepared data and a KD teacher. Saved in
    every checkpoint; a resume with other ones is refused (`dwml.checks.check_same_inputs`)."""
    inputs = {"tokenizer_sha256": tokenizer_sha, "data_sha256": data_fingerprint(prepared, meta)}
    if cfg.train.method in TEACHER_METHODS:
        inputs["teacher_sha256"] = model_fingerprint(teacher_dir(cfg.distill.teacher))
    return inputs


def plan_exposure(cfg: RunConfig, meta: dict, stream: BatchStream) -> ExposurePlan:
    """Words seen after every step of the plan (`dwml.training.exposure`); with a BabyLM track, its budget - the
    teacher's words included - is checked here, before any step, and its milestone steps are fixed."""
    t = cfg.train
    exposure = stream_exposure(stream, Path(cfg.data.prepared), int(meta["vocab_size"]), t.grad_accum, t.max_steps)
    teacher = None
    if t.method in TEACHER_METHODS:
        try:
            teacher = teacher_words(cfg, teacher_dir(cfg.distill.teacher))
        except DwmlError:
            if t.babylm_track != "none":
                raise
    check_budget(t.babylm_track, exposure, t.max_steps, teacher or 0)
    track = TRACKS.get(t.babylm_track)
    return ExposurePlan(t.babylm_track, exposure, teacher, exposure.milestones(track) if track else {})


def check_memory(cfg: RunConfig, archs: list[tuple[str, Arch]], rt: Runtime) -> None:
    """Before any student is built: the run's estimated peak memory (`dwml.models.memory`) fits the device, or one
    line naming the largest model, the estimate and the limit."""
    teacher = None
    if cfg.train.method in TEACHER_METHODS:
        teacher = arch_from_folder(teacher_dir(cfg.distill.teacher))
    check_training_memory(cfg, archs, rt.device, bf16=rt.autocast_dtype is not None, teacher=teacher,
                          world_size=rt.world_size)


def planned_words(cfg: RunConfig, prepared: Path) -> tuple[int, float]:
    """(words seen, epochs) after `train.max_steps` steps of one process, before any training (the dry run)."""
    meta = load_meta(prepared)
    t = cfg.train
    stream = BatchStream(PackedSequences(prepared, "train", cfg.data.seq_len, **separator_args(cfg, prepared)),
                         t.batch_size, seed=t.seed,
                         vocab_size=int(meta["vocab_size"]), mask_prob=cfg.data.mask_prob)
    e = stream_exposure(stream, prepared, int(meta["vocab_size"]), t.grad_accum, t.max_steps)
    return e.words_after(t.max_steps), e.epochs_after(t.max_steps)


def load_teacher(path: str, tokenizer_dir: Path, device: torch.device):
    """A frozen teacher MLM; refuses one trained with another vocabulary than this run's tokenizer."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    p = teacher_dir(path)
    ours = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    try:
        theirs = AutoTokenizer.from_pretrained(p).get_vocab()
    except (OSError, ValueError):
        raise DwmlError(f"distill.teacher: {p} has no tokenizer files; cannot check its vocabulary") from None
    if ours != theirs:
        raise DwmlError(f"distill.teacher: {p} uses a different tokenizer/vocabulary than {tokenizer_dir}")
    teacher = AutoModelForMaskedLM.from_pretrained(p).to(device).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    return teacher


class Subset:
    """A view of some sequences of a PackedSequences (used to split valid into reporting and held-out parts)."""

    def __init__(self, base, indices: np.ndarray):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def gather(self, indices: np.ndarray, pad_id: int):
        return self.base.gather(self.indices[np.asarray(indices)], pad_id)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Batches:
    train: BatchStream | Prefetcher
    heldout: BatchStream | Prefetcher | None
    valid: list  # fixed MaskedBatches for reporting


def separator_args(cfg: RunConfig, prepared: Path) -> dict:
    """How a packed sequence's inner utterances end (`PackedSequences`' separator and share): </s>, the tokenizer's
    newline, or ("mixed") the newline after half of them and </s> after the others; with data.separator_sources only
    in those sources."""
    d = cfg.data
    if d.separator == "eos":
        return {"separator": None}
    if d.separator_sources:  # a misspelt name would silently select nothing: fail before training
        known = load_meta(prepared).get("splits", {}).get("train", {}).get("sources", {})
        for name in d.separator_sources:
            if name not in known:
                raise DwmlError(f"data.separator_sources: {name!r} is not a source of {prepared} "
                                f"(its sources: {', '.join(known)})")
    return {"separator": newline_id(prepared / "tokenizer"), "share": 0.5 if d.separator == "mixed" else 1.0,
            "sources": tuple(d.separator_sources)}


def make_batches(cfg: RunConfig, prepared: Path, vocab_size: int, rt: Runtime, need_heldout: bool) -> Batches:
    t, dcfg = cfg.train, cfg.data
    sep = separator_args(cfg, prepared)  # the same for train, valid and DWML's held-out sequences
    # Training and the held-out batches corrupt selected tokens by data.replace_mask / replace_random.
    common = dict(vocab_size=vocab_size, mask_prob=dcfg.mask_prob, replace=(dcfg.replace_mask, dcfg.replace_random))
    train_seqs = PackedSequences(prepared, "train", dcfg.seq_len, **sep)
    if len(train_seqs) < t.batch_size * rt.world_size:
        raise DwmlError(f"{prepared}: train split has {len(train_seqs)} sequences, fewer than one batch "
                        f"({t.batch_size} x {rt.world_size} ranks); use a smaller train.batch_size or more data")
    # The masking schedule (data.mask_prob_end) runs over the micro-batches of train.max_steps steps of this rank.
    train = BatchStream(train_seqs, t.batch_size, seed=t.seed, rank=rt.rank, world_size=rt.world_size,
                        mask_prob_end=dcfg.mask_prob_end, schedule_batches=t.max_steps * t.grad_accum, **common)
    valid_seqs = PackedSequences(prepared, "valid", dcfg.seq_len, **sep)
    n = len(valid_seqs)
    # The held-out part of valid feeds DWML's outer loss L2 (eq. 3); reporting uses the rest, so reported
    # validation losses are never the ones omega was fitted on. It is left out of the reporting set of every run,
    # learned omega or not, so all runs of an experiment report on the same sequences.
    n_held = min(dcfg.heldout_sequences, n // 2)
    report_idx, held_idx = np.arange(0, n - n_held), np.arange(n - n_held, n)
    report = Subset(valid_seqs, report_idx)
    bs = min(t.eval_batch_size, len(report))
    if bs < 1:
        raise DwmlError(f"{prepared}: valid split is empty")
    # A fixed masking rate for validation (data.eval_mask_prob) and BERT's 80/10/10, so losses compare across
    # training mask rates and corruption splits.
    vstream = BatchStream(report, bs, seed=t.seed + 1, drop_last=False, vocab_size=vocab_size,
                          mask_prob=dcfg.eval_mask_prob)
    n_valid = max(1, min(t.eval_batches, math.ceil(len(report) / bs)))
    valid = [next(vstream) for _ in range(n_valid)]
    heldout = None
    if need_heldout:
        if n_held < 1:
            raise DwmlError(f"{prepared}: valid split too small to hold out sequences for the outer loop")
        held = Subset(valid_seqs, held_idx)
        held_bs = cfg.distill.heldout_batch_size or max(1, t.batch_size // 2)
        heldout = BatchStream(held, min(held_bs, len(held)), seed=t.seed + 2, rank=0, world_size=1, **common)
    return Batches(train, heldout, valid)


def prefetch(batches: Batches, cfg: RunConfig, rt: Runtime) -> Batches:
    """With `data.prefetch`, the next batches are built in a background thread, page-locked for async copies."""
    if cfg.data.prefetch:
        pin = rt.device.type == "cuda"
        batches.train = Prefetcher(batches.train, cfg.data.prefetch, pin)
        if batches.heldout is not None:
            batches.heldout = Prefetcher(batches.heldout, cfg.data.prefetch, pin)
    return batches


def gather_rng(rt: Runtime):
    """RNG states of every rank (dropout differs per rank), so each resumes its own stream."""
    mine = rng_state()
    if not rt.ddp:
        return mine
    everyone: list = [None] * rt.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def export_line_ends(cfg: RunConfig) -> bool:
    """Whether the run's model folders carry a tokenizer that reads a line break as </s>
    (`dwml.data.tokenizer.with_line_ends`): with data.separator = "eos" every line of the corpus ended with </s> in
    training and the newline token never appeared, so that is how the model knows a line to end. A "newline" or
    "mixed" model learnt the newline token itself and keeps it."""
    return cfg.data.separator == "eos"


def export_final(run_dir: Path, students: list[Student], tokenizer_dir: Path, summary: dict,
                 line_ends: bool = False) -> dict:
    """RUN/final/peer{i}/: Hugging Face folders (model + tokenizer, `export_line_ends`) + summary.json, swapped in
    atomically. Returns what the export adds to the summary: the exported tokenizer's form and fingerprint."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the middle of our own output
    with atomic_dir(run_dir / "final") as tmp:
        for i, s in enumerate(students):
            s.mlm.save_pretrained(tmp / f"peer{i}")
            copy_tokenizer(tokenizer_dir, tmp / f"peer{i}", line_ends=line_ends)  # loads in transformers 4.x and 5.x
        exported = {"tokenizer_line_ends": line_ends, "export_tokenizer_sha256": tokenizer_fingerprint(tmp / "peer0")}
        write_json(tmp / "summary.json", {**summary, **exported})
    return exported


def peer_summaries(archs: list[tuple[str, Arch]], valid_loss: list[float], exits: list[int | None],
                   batch_losses: list[list[float]]) -> list[dict]:
    """summary.json's "peers": each student's shape, size, final validation loss (and per validation batch) and
    plateau exit step."""
    return [{"name": n, "arch": a.to_dict(), "params": count_params(a), "valid_loss": v, "plateau_exit_step": x,
             "valid_batch_losses": b} for (n, a), v, x, b in zip(archs, valid_loss, exits, batch_losses)]


def build_students(cfg: RunConfig, archs: list[tuple[str, Arch]], device: torch.device) -> list[Student]:
    """A fresh init per peer from (seed, peer index), identical on every rank; sd adds its auxiliary heads."""
    students = []
    for i, (_, arch) in enumerate(archs):
        mlm = build_model(arch, seed=cfg.train.seed * 1000 + i, dropout=cfg.model.dropout)
        aux = SelfDistillHeads(mlm.config, layers=cfg.distill.sd_layers or None) if cfg.train.method == "sd" else None
        students.append(Student(mlm, aux).to(device))
    return students


def initial_omega(cfg: RunConfig, n: int) -> OmegaState:
    """omega_0: `distill.omega` normalised onto the simplex, else uniform; dml always keeps it uniform (1/M)."""
    d = cfg.distill
    if d.omega and len(d.omega) != n:
        raise DwmlError(f"distill.omega: {len(d.omega)} weights given for {n} students")
    if d.omega and cfg.train.method != "dml":
        return OmegaState(torch.tensor(d.omega, dtype=torch.float64) / sum(d.omega))
    return OmegaState.uniform(n)


def wrap_students(students: list[Student], rt: Runtime, compile_: bool) -> list[torch.nn.Module]:
    """DDP wraps each student so its gradients are all-reduced in backward; then torch.compile if asked."""
    models: list[torch.nn.Module] = list(students)
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        models = [DDP(s, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) for s in students]
    if compile_:
        models = [torch.compile(m) for m in models]
    return models


def student_logits(model, input_ids, attention_mask, positions):
    """A `Student`'s final logits at the masked positions (the hypergradient's forward; aux heads' are not used)."""
    return model(input_ids, attention_mask, positions)[0]


def dump_rank_state(students: list[Student], omega: torch.Tensor, rank: int) -> None:
    """Debugging/test hook: with $DWML_RANK_DUMP set, every rank saves its final weights and omega there, so a test
    can check that DDP ranks agree."""
    dump = os.environ.get("DWML_RANK_DUMP")
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        torch.save({"students": [s.state_dict() for s in students], "omega": omega.clone()},
                   Path(dump) / f"rank{rank}.pt")
