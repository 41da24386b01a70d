"""The training loop: one or several students on the same batches and masks, any method, exact resume.

Read top to bottom: set-up (runtime, data, students, optimizers, omega), resume, then the loop: micro-batches with
gradient accumulation -> clip -> one optimizer step per student -> (DWML) an outer omega step every K steps ->
log / validate / checkpoint. Everything a resumed run needs (weights, optimizer and scheduler states, omega, data
stream positions, RNG states) is in the checkpoint, so a killed run continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import config as config_mod
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import RunConfig
from .errors import DwmlError
from .hypergrad import MirrorDescentConfig, OmegaState, hypergradient
from .io import atomic_dir, write_json, write_text
from .losses import ensemble_loss, mlm_loss
from .metrics import MetricsLog
from .masking import BatchStream
from .methods import METHOD_LOSSES, PEER_METHODS, TEACHER_METHODS
from .model import POSITION_OFFSET, Arch, Student, build_model, count_params, get_preset
from .runtime import Runtime, compute_cleanup, compute_init
from .selfdistill import SelfDistillHeads
from .shards import PackedSequences, load_meta
from .tokenizer import copy_tokenizer


# --------------------------------------------------------------------------------------------------------------
# Set-up helpers


def resolve_archs(cfg: RunConfig, vocab_size: int) -> list[tuple[str, Arch]]:
    """(name, Arch) of every student. Peers come from `model.peers` / `model.peers_file`; else one from the preset."""
    m = cfg.model
    positions = cfg.data.seq_len + POSITION_OFFSET
    archs: list[tuple[str, Arch]] = []
    if m.peers_file:
        from .search import load_peer_archs

        archs = [(f"peer{i}", a) for i, a in enumerate(load_peer_archs(m.peers_file))]
    for i, p in enumerate(m.peers):
        if isinstance(p, str):
            archs.append((p, get_preset(p)))
        elif isinstance(p, dict):
            archs.append((f"peer{len(archs)}", Arch.from_dict({"vocab_size": vocab_size, **p}, f"model.peers[{i}]")))
        else:
            raise DwmlError(f"model.peers[{i}]: expected a preset name or an architecture table, got {p!r}")
    if not archs:
        a = get_preset(m.preset)
        overrides = {k: getattr(m, k) for k in ("layers", "heads", "hidden", "intermediate") if getattr(m, k)}
        archs = [(m.preset, a.replace(**overrides) if overrides else a)]
    method = cfg.train.method
    if method in PEER_METHODS and len(archs) < 2:
        raise DwmlError(f"train.method {method}: needs at least 2 peers (model.peers or model.peers_file)")
    if method == "sd" and len(archs) != 1:
        raise DwmlError("train.method sd: trains a single network; give model.preset, not model.peers")
    return [(name, a.replace(vocab_size=vocab_size, max_positions=positions)) for name, a in archs]


def make_optimizer(module: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (all 1-D parameters) get no weight decay."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def lr_factor(step: int, t) -> float:
    """Linear warm-up to the peak, then cosine decay to `min_lr_ratio` of it at `max_steps`."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_teacher(path: str, tokenizer_dir: Path, device: torch.device):
    """A frozen teacher MLM; refuses one trained with another vocabulary than this run's tokenizer."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    p = Path(path)
    if (p / "final" / "peer0" / "config.json").is_file():  # a run directory: take its (first) model
        p = p / "final" / "peer0"
    if not (p / "config.json").is_file():
        raise DwmlError(f"distill.teacher: {path} is not a model directory (no config.json) or a finished run")
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


class _Subset:
    """A view of some sequences of a PackedSequences (used to split valid into reporting and held-out parts)."""

    def __init__(self, base, indices: np.ndarray):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Batches:
    train: BatchStream
    heldout: BatchStream | None
    valid: list  # fixed MaskedBatches for reporting


def make_batches(cfg: RunConfig, prepared: Path, vocab_size: int, rt: Runtime, need_heldout: bool) -> Batches:
    t, dcfg = cfg.train, cfg.data
    common = dict(vocab_size=vocab_size, mask_prob=dcfg.mask_prob)
    train_seqs = PackedSequences(prepared, "train", dcfg.seq_len)
    if len(train_seqs) < t.batch_size * rt.world_size:
        raise DwmlError(f"{prepared}: train split has {len(train_seqs)} sequences, fewer than one batch "
                        f"({t.batch_size} x {rt.world_size} ranks); use a smaller train.batch_size or more data")
    train = BatchStream(train_seqs, t.batch_size, seed=t.seed, rank=rt.rank, world_size=rt.world_size, **common)
    valid_seqs = PackedSequences(prepared, "valid", dcfg.seq_len)
    n = len(valid_seqs)
    # The held-out part of valid feeds DWML's outer loss L2 (eq. 3); reporting uses the rest, so reported
    # validation losses are never the ones omega was fitted on.
    n_held = min(dcfg.heldout_sequences, n // 2) if need_heldout else 0
    report_idx, held_idx = np.arange(0, n - n_held), np.arange(n - n_held, n)
    report = _Subset(valid_seqs, report_idx)
    bs = min(t.eval_batch_size, len(report))
    if bs < 1:
        raise DwmlError(f"{prepared}: valid split is empty")
    vstream = BatchStream(report, bs, seed=t.seed + 1, drop_last=False, **common)
    n_valid = max(1, min(t.eval_batches, math.ceil(len(report) / bs)))
    valid = [next(vstream) for _ in range(n_valid)]
    heldout = None
    if need_heldout:
        if n_held < 1:
            raise DwmlError(f"{prepared}: valid split too small to hold out sequences for the outer loop")
        held = _Subset(valid_seqs, held_idx)
        held_bs = cfg.distill.heldout_batch_size or max(1, t.batch_size // 2)
        heldout = BatchStream(held, min(held_bs, len(held)), seed=t.seed + 2, rank=0, world_size=1, **common)
    return Batches(train, heldout, valid)


# --------------------------------------------------------------------------------------------------------------
# The run


class Interrupted(Exception):
    """Raised by `train(..., stop_after=N)`: simulates a run killed right after step N (its checkpoint written)."""


def train(cfg: RunConfig, resume: bool = True, stop_after: int | None = None) -> dict:
    """Train according to `cfg` into `cfg.out_dir`; returns the final summary (also written to final/summary.json).

    `stop_after` (tests) stops the run after that step as if it had been killed there; `save_every` must divide it
    for the run to be resumable without repeating steps.
    """
    cfg.validate()
    t = cfg.train
    rt = compute_init(t.device, t.seed, t.dtype)
    try:
        return _train(cfg, rt, resume, stop_after)
    finally:
        compute_cleanup()


def _train(cfg: RunConfig, rt: Runtime, resume: bool, stop_after: int | None = None) -> dict:
    t, d, method = cfg.train, cfg.distill, cfg.train.method
    run_dir = Path(cfg.out_dir)
    prepared = Path(cfg.data.prepared)
    meta = load_meta(prepared)
    vocab_size = int(meta["vocab_size"])
    tokenizer_dir = prepared / "tokenizer"
    archs = resolve_archs(cfg, vocab_size)
    n_students = len(archs)

    # Students: a fresh init per peer from (seed, peer index), identical on every rank.
    dropout = dict(hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout)
    students = []
    for i, (_, arch) in enumerate(archs):
        mlm = build_model(arch, seed=t.seed * 1000 + i, **dropout)
        aux = SelfDistillHeads(mlm.config, layers=d.sd_layers or None) if method == "sd" else None
        students.append(Student(mlm, aux).to(rt.device))
    teacher = load_teacher(d.teacher, tokenizer_dir, rt.device) if method in TEACHER_METHODS else None
    optimizers = [make_optimizer(s, t) for s in students]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, t)) for o in optimizers]
    if d.omega and len(d.omega) != n_students:
        raise DwmlError(f"distill.omega: {len(d.omega)} weights given for {n_students} students")
    # Initial omega: as given (normalised onto the simplex) or uniform; dml always keeps it uniform (1/M).
    omega = OmegaState(torch.tensor(d.omega, dtype=torch.float64) / sum(d.omega)) if d.omega and method != "dml" \
        else OmegaState.uniform(n_students)
    mirror = MirrorDescentConfig(eta=d.eta, schedule=d.eta_schedule, eta_min=d.eta_min, floor=d.omega_floor,
                                 total_steps=max(1, t.max_steps // d.outer_every))
    learn_omega = method in ("dwml", "kd_dwml") and d.learn_omega
    batches = make_batches(cfg, prepared, vocab_size, rt, need_heldout=learn_omega)

    # Resume from the newest checkpoint, if any.
    step, elapsed_before, initial_valid = 0, 0.0, None
    ckpts = list_checkpoints(run_dir) if resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1])
        if len(state["students"]) != n_students:
            raise DwmlError(f"{ckpts[-1]}: checkpoint has {len(state['students'])} students, config has {n_students}")
        for s, sd in zip(students, state["students"]):
            s.load_state_dict(sd)
        for o, sd in zip(optimizers, state["optimizers"]):
            o.load_state_dict(sd)
        for sc, sd in zip(schedulers, state["schedulers"]):
            sc.load_state_dict(sd)
        omega.load_state_dict(state["omega"])
        batches.train.load_state_dict(state["train_stream"])
        if batches.heldout is not None and state.get("heldout_stream"):
            batches.heldout.load_state_dict(state["heldout_stream"])
        _set_rng_state(state["rng"][rt.rank] if isinstance(state["rng"], list) else state["rng"])
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        initial_valid = state.get("initial_valid_loss")
    if rt.is_master:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.toml", config_mod.to_toml(cfg))
    log = MetricsLog(run_dir / "metrics.jsonl", step if ckpts else None, rt.is_master, tensorboard=t.tensorboard)

    # DDP wraps each student so its gradients are all-reduced in backward; `students` stay the bare modules.
    models = students
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        models = [DDP(s, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) for s in students]
    if t.compile:
        models = [torch.compile(m) for m in models]
    loss_fn = METHOD_LOSSES[method]
    params = [count_params(a) for _, a in archs]

    def forward_all(batch, train_mode: bool, modules=None):
        outs = []
        for m in modules or models:
            m.train(train_mode)
            with rt.autocast():
                outs.append(m(batch.input_ids, batch.attention_mask, batch.positions))
        return outs

    def teacher_logits(batch):
        if teacher is None:
            return None
        from .model import masked_logits

        with torch.no_grad(), rt.autocast():
            return masked_logits(teacher, batch.input_ids, batch.attention_mask, batch.positions).float()

    @torch.no_grad()
    def validate() -> dict:
        sums = torch.zeros(n_students + 1, dtype=torch.float64)
        for vb in batches.valid:
            vb = vb.to(rt.device)
            # The bare students, not their DDP wrappers: validation runs on rank 0 alone.
            outs = forward_all(vb, train_mode=False, modules=students)
            logits = [o[0].float() for o in outs]
            for i, z in enumerate(logits):
                sums[i] += mlm_loss(z, vb.labels).item()
            if n_students > 1:  # the ensemble of one model is that model
                sums[-1] += ensemble_loss(logits, vb.labels, omega.omega.to(rt.device), kind="ensemble").item()
        sums /= len(batches.valid)
        out = {"valid_loss": sums[:-1].tolist()}
        if n_students > 1:
            out["valid_ensemble_loss"] = sums[-1].item()
        return out

    def save(step_now: int) -> None:
        state = {
            "step": step_now,
            "students": [s.state_dict() for s in students],
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [sc.state_dict() for sc in schedulers],
            "omega": omega.state_dict(),
            "train_stream": batches.train.state_dict(),
            "heldout_stream": batches.heldout.state_dict() if batches.heldout is not None else None,
            "rng": _gather_rng(rt),
            "config": config_mod.to_toml(cfg),
            "elapsed_s": elapsed(),
            "initial_valid_loss": initial_valid,
        }
        if rt.is_master:
            save_checkpoint(run_dir, step_now, state)
        rt.barrier()

    if step == 0 and rt.is_master:
        first = validate()
        log.write(step=0, **first, omega=omega.omega.tolist())
        initial_valid = first["valid_loss"]

    loop_start = time.perf_counter()

    def elapsed() -> float:
        """Training wall time (validation included), summed over resumed segments of the run."""
        return elapsed_before + time.perf_counter() - loop_start

    bar = tqdm(total=t.max_steps, initial=step, disable=not (t.progress and rt.is_master), desc=method,
               dynamic_ncols=True)
    t_last, tok_since = time.perf_counter(), 0
    while step < t.max_steps:
        lr_now = schedulers[0].get_last_lr()[0]
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        logs: dict[str, list[float]] = {}
        micro_batches = [next(batches.train).to(rt.device) for _ in range(t.grad_accum)]
        # Each loss is a mean over its micro-batch's masked tokens, whose number varies. Weighting every micro-batch
        # by its share of all masked tokens of the step (over all ranks; DDP then averages over ranks, hence the
        # world_size factor) makes accumulation and DDP compute exactly the gradient of the one big batch.
        counts = [b.labels.numel() for b in micro_batches]
        n_masked = torch.tensor(float(sum(counts)), device=rt.device)
        if rt.ddp:
            dist.all_reduce(n_masked)
        for micro, batch in enumerate(micro_batches):
            # With DDP, only the last micro-batch all-reduces gradients.
            sync = contextlib.ExitStack()
            if rt.ddp and micro < t.grad_accum - 1:
                for m in models:
                    sync.enter_context(m.no_sync())
            with sync:
                outs = forward_all(batch, train_mode=True)
                outs = [(z.float(), [a.float() for a in aux]) for z, aux in outs]
                loss, parts = loss_fn(outs, batch.labels, omega.omega.to(rt.device), teacher_logits(batch), d)
                (loss * (counts[micro] * rt.world_size / n_masked)).backward()
            for k, v in parts.items():
                acc = logs.setdefault(k, [0.0] * len(v))
                for i, x in enumerate(v):
                    acc[i] += x * counts[micro] / sum(counts)
            tok_since += int(batch.attention_mask.sum())
        grad_norms = []
        for s, o, sc in zip(students, optimizers, schedulers):
            if t.grad_clip > 0:
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(s.parameters(), t.grad_clip)))
            o.step()
            sc.step()
        step += 1

        record: dict[str, Any] = {}
        if learn_omega and step % d.outer_every == 0:
            held = next(batches.heldout).to(rt.device)
            gamma = lr_now if d.gamma < 0 else d.gamma
            # L1 of eq. (3) on as many sequences of the last training batch as the held-out batch has: the outer
            # step costs ~3 inner steps of its batch size, so this halves its cost at the default sizes.
            inner = batch.head(held.input_ids.shape[0])
            if inner.labels.numel() == 0:
                inner = batch
            g, info = hypergradient(
                students, inner, held, omega.omega.to(rt.device),
                alpha=d.alpha, temperature=d.temperature, gamma=gamma, detach_targets=d.detach_targets,
                l2_kind=d.l2, mode=d.hypergrad, forward=_student_forward,
            )
            if rt.ddp:  # every rank must take the same omega step: average the hypergradients
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= rt.world_size
            omega.update(g, mirror)
            record.update(outer_step=omega.step, omega=omega.omega.tolist(), hypergrad=g.tolist(),
                          l2=float(info.get("l2", float("nan"))))

        if step % t.log_every == 0 or record or step == t.max_steps:
            now = time.perf_counter()
            tps = tok_since * rt.world_size / max(now - t_last, 1e-9)
            t_last, tok_since = now, 0
            record.update(step=step, elapsed_s=elapsed(), lr=lr_now, tokens_per_s=tps, train_ce=logs.get("ce"),
                          grad_norm=grad_norms or None)
            if "omega" not in record:
                record["omega"] = omega.omega.tolist()
            log.write(**record)
            ce = logs.get("ce") or [float("nan")]
            bar.set_postfix(loss=f"{min(ce):.3f}", tok_s=f"{tps:,.0f}")
        if step % t.eval_every == 0 or step == t.max_steps:
            if rt.is_master:
                v = validate()
                log.write(step=step, **v, omega=omega.omega.tolist())
                bar.write(f"step {step}: valid loss " + ", ".join(f"{x:.4f}" for x in v["valid_loss"]))
        if step % t.save_every == 0 or step == t.max_steps:
            save(step)
        bar.update(1)
        if stop_after is not None and step >= stop_after and step < t.max_steps:
            bar.close()
            raise Interrupted(f"stopped after step {step}")
    bar.close()
    log.close()

    dump = os.environ.get("DWML_RANK_DUMP")
    if dump:  # debugging/test hook: every rank's final weights and omega, to check that DDP ranks agree
        Path(dump).mkdir(parents=True, exist_ok=True)
        torch.save({"students": [s.state_dict() for s in students], "omega": omega.omega.clone()},
                   Path(dump) / f"rank{rt.rank}.pt")
    summary = {}
    if rt.is_master:
        final = validate()
        summary = {
            "method": method,
            "steps": step,
            "omega": omega.omega.tolist(),
            "omega_learned": learn_omega,
            "peers": [
                {"name": n, "arch": a.to_dict(), "params": p, "valid_loss": v}
                for (n, a), p, v in zip(archs, params, final["valid_loss"])
            ],
            "initial_valid_loss": initial_valid,
            "train_seconds": elapsed(),
            "train_tokens": int(batches.train.tokens_seen) * rt.world_size,
            "valid_ensemble_loss": final.get("valid_ensemble_loss"),
            "tokenizer": str(tokenizer_dir),
        }
        export_final(run_dir, students, tokenizer_dir, summary)
    rt.barrier()
    return summary


def _student_forward(model, input_ids, attention_mask, positions):
    return model(input_ids, attention_mask, positions)[0]


def _gather_rng(rt: Runtime):
    """RNG states of every rank (dropout differs per rank), so each resumes its own stream."""
    mine = _rng_state()
    if not rt.ddp:
        return mine
    everyone: list = [None] * rt.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def export_final(run_dir: Path, students: list[Student], tokenizer_dir: Path, summary: dict) -> None:
    """RUN/final/peer{i}/: Hugging Face folders (model + tokenizer) + summary.json, swapped in atomically."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the middle of our own output
    with atomic_dir(run_dir / "final") as tmp:
        for i, s in enumerate(students):
            s.mlm.save_pretrained(tmp / f"peer{i}")
            copy_tokenizer(tokenizer_dir, tmp / f"peer{i}")  # loadable in transformers 4.x and 5.x
        write_json(tmp / "summary.json", summary)
