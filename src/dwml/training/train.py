"""The training loop: one or several students on the same batches and masks, any method, exact resume.

`_loop` is the loop, short enough to read at a glance; each phase is one method of `Trainer`: set-up (`__init__`,
from `dwml.training.setup`), resume (`restore`), the step (`train_step`: micro-batches with gradient accumulation ->
clip -> one optimizer step per student), DWML's outer omega step every K steps (`outer_step`), log / validation /
checkpoint (`log_train`, `log_validation`, `save`) and export (`finish`). Everything a resumed run needs (weights,
optimizer and scheduler states, omega, data stream positions, RNG states) is in the checkpoint, so a killed run
continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import config as config_mod
from ..checks import (NonFiniteGuard, check_checkpoint_matches, check_prepared_tokenizer, check_same_inputs,
                      check_same_tokenizer)
from ..config import RunConfig
from ..data.entropy import train_unigram_entropy
from ..data.masking import MaskedBatch, Prefetcher
from ..data.shards import load_meta
from ..distill.hypergrad import MirrorDescentConfig, hypergradient, mixed_ratio
from ..distill.losses import ensemble_loss, mlm_loss
from ..distill.methods import METHOD_LOSSES, TEACHER_METHODS
from ..io import write_text
from ..models.model import masked_logits
from . import rundir
from .averaging import all_swapped_in, averages_for, load_averages
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .metrics import MetricsLog
from .plateau import plateau_exit_step, valid_history
from .runtime import Runtime, compute_cleanup, compute_init
from .schedule import lr_factor
from .setup import (build_students, check_memory, dump_rank_state, export_final, export_line_ends, gather_rng,
                    initial_omega, input_fingerprints, load_teacher, make_batches, make_optimizer, peer_summaries,
                    plan_exposure, prefetch, resolve_archs, set_rng_state, student_logits, wrap_students)

# --------------------------------------------------------------------------------------------------------------
# The run, phase by phase


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
        with rundir.RunLock(cfg.out_dir, enabled=rt.is_master):  # one trainer per run directory
            return _train(cfg, rt, resume, stop_after)
    finally:
        compute_cleanup()


def _train(cfg: RunConfig, rt: Runtime, resume: bool, stop_after: int | None = None) -> dict:
    """The loop. Each phase is one method of `Trainer`; `_loop` only decides when each runs."""
    t0 = time.perf_counter()
    run = Trainer(cfg, rt)  # set-up: students, optimizers, omega, data streams
    run.timings["setup"] = time.perf_counter() - t0
    try:
        return _loop(run, resume, stop_after)
    finally:
        run.close()


def _loop(run: "Trainer", resume: bool, stop_after: int | None) -> dict:
    cfg, rt = run.cfg, run.rt
    t, d = cfg.train, cfg.distill
    with run.phase("setup"):
        # Master: placement checks, the run id; --no-resume moves the previous run aside (see dwml.training.rundir).
        run.run_id = rundir.begin_run(run.run_dir, cfg.data.prepared, resume) if rt.is_master else None
        rt.barrier()
        resumed = run.restore() if resume else False
        run.open_log(resumed)
    if run.step == 0 and rt.is_master:
        with run.phase("initial_validation"):
            run.initial_validation()
    run.start_clock()
    bar = tqdm(total=t.max_steps, initial=run.step, disable=not (t.progress and rt.is_master), desc=t.method,
               dynamic_ncols=True)
    while run.step < t.max_steps:
        lr = run.lr()
        stats = run.train_step()  # micro-batches -> backward -> clip -> one optimizer step per student
        step = run.step
        record = run.outer_step(stats, lr) if run.learn_omega and step % d.outer_every == 0 else {}
        if rt.is_master:  # BabyLM's milestone checkpoints RUN/chck/chck_1M ... (train.babylm_track)
            run.exposure.write(step, run.run_dir, run.students, run.tokenizer_dir, run.averages, run.line_ends)
        if step % t.log_every == 0 or record or step == t.max_steps:
            run.log_train(stats, lr, record, bar)
        if (step % t.eval_every == 0 or step == t.max_steps) and rt.is_master:
            with run.phase("validation"):
                run.log_validation(bar)
        if step % t.save_every == 0 or step == t.max_steps:
            with run.phase("checkpoint"):
                run.save()
        bar.update(1)
        if stop_after is not None and stop_after <= step < t.max_steps:
            bar.close()
            raise Interrupted(f"stopped after step {step}")
    bar.close()
    return run.finish()


@dataclass
class StepStats:
    """What one optimizer step leaves for the log and the outer step: per-peer loss parts, gradient norms, its last
    micro-batch and, for a teacher method that learns omega (kd_dwml), the teacher's logits on that micro-batch."""

    parts: dict[str, torch.Tensor]  # per-peer numbers, still on the device
    grad_norms: list[torch.Tensor]
    batch: MaskedBatch
    teacher_logits: torch.Tensor | None = None


class Trainer:
    """Everything a run holds. `__init__` is the set-up phase; the other methods are the loop's phases."""

    def __init__(self, cfg: RunConfig, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        t, d, method = cfg.train, cfg.distill, cfg.train.method
        self.run_dir = Path(cfg.out_dir)
        prepared = Path(cfg.data.prepared)
        meta = load_meta(prepared)
        vocab_size = int(meta["vocab_size"])
        self.unigram = train_unigram_entropy(prepared, meta)  # the "frequencies only" loss, next to valid loss
        self.tokenizer_dir, self.line_ends = prepared / "tokenizer", export_line_ends(cfg)  # line break: </s>?
        self.tokenizer_sha = check_prepared_tokenizer(prepared, meta)  # before any work, not at the export
        self.archs = resolve_archs(cfg, vocab_size)
        check_memory(cfg, self.archs, rt)  # an estimate of the peak, before anything is allocated
        n = len(self.archs)
        self.students = build_students(cfg, self.archs, rt.device)
        self.averages = averages_for(self.students, t.ema_decay)  # train.ema_decay: the weights a run produces
        self.teacher = load_teacher(d.teacher, self.tokenizer_dir, rt.device) if method in TEACHER_METHODS else None
        self.inputs = input_fingerprints(cfg, prepared, meta, self.tokenizer_sha)  # compared on resume
        self.optimizers = [make_optimizer(s, t) for s in self.students]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, t)) for o in self.optimizers]
        self.omega = initial_omega(cfg, n)
        self.mirror = MirrorDescentConfig(eta=d.eta, schedule=d.eta_schedule, eta_min=d.eta_min, floor=d.omega_floor,
                                          total_steps=max(1, t.max_steps // d.outer_every))
        self.learn_omega = method in ("dwml", "kd_dwml") and d.learn_omega
        batches = make_batches(cfg, prepared, vocab_size, rt, need_heldout=self.learn_omega)
        self.exposure = plan_exposure(cfg, meta, batches.train)  # words per step; BabyLM's budget and milestones
        self.batches = prefetch(batches, cfg, rt)
        self.non_blocking = rt.device.type == "cuda" and cfg.data.prefetch > 0

        self.models = wrap_students(self.students, rt, t.compile)  # DDP / torch.compile; `students` stay bare
        self.loss_fn = METHOD_LOSSES[method]
        self.omega_device = self.omega.omega.to(rt.device)  # refreshed when omega changes, not copied every step
        self.step, self.elapsed_before, self.initial_valid = 0, 0.0, None
        self.log: MetricsLog | None = None
        # NaN/inf losses and gradient norms: flags stay on the device, read on the steps that log, validate, save or
        # take an outer step (dwml.checks), so nothing non-finite is written and no extra sync is added.
        # (Save steps are not listed: `save` runs the same check, with the weights', before it writes.)
        cadences = (t.log_every, t.eval_every) + ((d.outer_every,) if self.learn_omega else ())
        self.guard = NonFiniteGuard(t.max_nonfinite_skips, rt.device, cadences, t.max_steps)
        self.timings: dict[str, float] = {}  # seconds per phase of this process, in final/summary.json

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def close(self) -> None:
        """Stop the data threads (also on errors and interruptions)."""
        for stream in (self.batches.train, self.batches.heldout):
            if isinstance(stream, Prefetcher):
                stream.close()
        if self.log is not None:  # flush and close the TensorBoard writer
            self.log.close()

    # -- resume -------------------------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the newest checkpoint of the run directory, if any; True when there was one."""
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return False
        state = load_checkpoint(ckpts[-1])
        rundir.check_resume(ckpts[-1], state, self.cfg, self.run_id)  # same run, same config
        check_same_inputs(ckpts[-1], state, self.inputs)  # same tokenizer, data and teacher
        check_checkpoint_matches(state, self.students, ckpts[-1])  # and a dwml state of these students' shapes
        for modules, key in ((self.students, "students"), (self.optimizers, "optimizers"),
                             (self.schedulers, "schedulers")):
            for m, sd in zip(modules, state[key]):
                m.load_state_dict(sd)
        load_averages(self.averages, state.get("averages") or [])
        self.omega.load_state_dict(state["omega"])
        self.omega_device = self.omega.omega.to(self.rt.device)
        self.batches.train.load_state_dict(state["train_stream"])
        if self.batches.heldout is not None and state.get("heldout_stream"):
            self.batches.heldout.load_state_dict(state["heldout_stream"])
        rng = state["rng"]
        set_rng_state(rng[self.rt.rank] if isinstance(rng, list) else rng)
        self.step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.initial_valid = state.get("initial_valid_loss")
        return True

    def open_log(self, resumed: bool) -> None:
        if self.rt.is_master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.toml", config_mod.to_toml(self.cfg))
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.step if resumed else None, self.rt.is_master,
                              tensorboard=self.cfg.train.tensorboard)

    def start_clock(self) -> None:
        self.loop_start = time.perf_counter()
        self.window_start, self.window_tokens, self.window_wait = self.loop_start, self.batches.train.tokens_seen, 0.0

    def elapsed(self) -> float:
        """Training wall time (validation included), summed over resumed segments of the run."""
        return self.elapsed_before + time.perf_counter() - self.loop_start

    def lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    # -- step ---------------------------------------------------------------------------------------------------
    def attention_mask(self, batch: MaskedBatch) -> torch.Tensor:
        """On CUDA the (B, 1, 1, T) boolean mask SDPA takes as it is: given the 2-D mask, transformers first checks
        on the host whether it has padding at all (`mask.all()`), a GPU sync in every forward of every student."""
        if self.rt.device.type != "cuda":
            return batch.attention_mask
        return batch.attention_mask[:, None, None, :].bool()

    def forward_all(self, batch: MaskedBatch, train_mode: bool, modules=None) -> list:
        outs, mask = [], self.attention_mask(batch)
        for m in modules or self.models:
            m.train(train_mode)
            with self.rt.autocast():
                outs.append(m(batch.input_ids, mask, batch.positions))
        return outs

    def teacher_logits(self, batch: MaskedBatch) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad(), self.rt.autocast():
            return masked_logits(self.teacher, batch.input_ids, self.attention_mask(batch), batch.positions)

    def next_batch(self, stream) -> MaskedBatch:
        """The next batch on the device; the time the loop waited for it counts into the log's data_wait_s."""
        t0 = time.perf_counter()
        batch = next(stream)
        self.window_wait += time.perf_counter() - t0
        return batch.to(self.rt.device, non_blocking=self.non_blocking)

    def train_step(self) -> StepStats:
        """One optimizer step of every student: gradient accumulation over micro-batches, clip, AdamW, schedule.

        Nothing here waits for the GPU: loss parts and gradient norms stay on the device until a log step reads them
        (token counts come from the data stream, on the host)."""
        t, rt = self.cfg.train, self.rt
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        micro_batches = [self.next_batch(self.batches.train) for _ in range(t.grad_accum)]
        # Each loss is a mean over its micro-batch's masked tokens, whose number varies. Weighting every micro-batch
        # by its share of all masked tokens of the step (over all ranks; DDP then averages over ranks, hence the
        # world_size factor) makes accumulation and DDP compute exactly the gradient of the one big batch.
        counts = [b.labels.numel() for b in micro_batches]
        n_masked: float | torch.Tensor = float(sum(counts))
        if rt.ddp:
            n_masked = torch.full((), n_masked, device=rt.device)  # a fill kernel, not a blocking host copy
            dist.all_reduce(n_masked)
        parts: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(micro_batches):
            # With DDP, only the last micro-batch all-reduces gradients.
            sync = contextlib.ExitStack()
            if rt.ddp and micro < t.grad_accum - 1:
                for m in self.models:
                    sync.enter_context(m.no_sync())
            with sync:
                outs = self.forward_all(batch, train_mode=True)  # the losses upcast to fp32 where they need it
                teacher = self.teacher_logits(batch)
                loss, micro_parts = self.loss_fn(outs, batch.labels, self.omega_device, teacher, self.cfg.distill)
                (loss * (counts[micro] * rt.world_size / n_masked)).backward()
                self.guard.observe(loss)
            share = counts[micro] / sum(counts)
            for k, v in micro_parts.items():
                parts[k] = parts[k] + v * share if k in parts else v * share
        grad_norms = [torch.nn.utils.clip_grad_norm_(s.parameters(), t.grad_clip) for s in self.students] \
            if t.grad_clip > 0 else []
        self.guard.observe(grad_norms)
        apply_update = self.guard.step_ok(self.step + 1)  # False only for a skipped step (max_nonfinite_skips)
        for o, sc in zip(self.optimizers, self.schedulers):
            if apply_update:
                o.step()
            sc.step()
        for a in self.averages if apply_update else ():
            a.update()
        self.step += 1
        self.guard.maybe_check(self.step)  # stop at the first log/eval/save step after a non-finite one
        return StepStats(parts, grad_norms, micro_batches[-1], teacher if self.learn_omega else None)

    # -- outer step ---------------------------------------------------------------------------------------------
    def outer_step(self, stats: StepStats, lr: float) -> dict:
        """DWML's omega step after the optimizer step `stats`: hypergradient of eq. (3) on a held-out batch, mirror
        descent of eq. (4)."""
        d, rt = self.cfg.distill, self.rt
        held = self.next_batch(self.batches.heldout)
        # sgd: the paper's step size gamma (default: this step's lr); adamw/direct: each peer's own lr (the one its
        # next real step uses) unless distill.gamma overrides it.
        gamma = (lr if d.unroll == "sgd" else None) if d.gamma < 0 else d.gamma
        # L1 of eq. (3) on as many sequences of the last training batch as the held-out batch has: the outer
        # step costs ~3 inner steps of its batch size, so this halves its cost at the default sizes.
        batch = stats.batch
        inner = batch.head(held.input_ids.shape[0])
        if inner.labels.numel() == 0:
            inner = batch
        # kd_dwml: the teacher's logits of the inner step on this batch, restricted to the head's masked positions
        # (its first ones), rather than a second teacher forward; L2 on the held-out batch has no teacher term.
        teacher = None if stats.teacher_logits is None else stats.teacher_logits[: inner.labels.numel()]
        g, info = hypergradient(
            self.students, inner, held, self.omega.omega.to(rt.device),
            alpha=d.alpha, temperature=d.temperature, gamma=gamma, detach_targets=d.detach_targets,
            l2_kind=d.l2, mode=d.hypergrad, forward=student_logits, unroll=d.unroll, optimizers=self.optimizers,
            grad_clip=self.cfg.train.grad_clip, teacher_logits=teacher,
            teacher_weight=d.teacher_weight,
        )
        if rt.ddp:  # every rank must take the same omega step: average the hypergradients
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g /= rt.world_size
        # The outer step's one host read: the mirror descent step needs g on the host, the record the rest.
        m = g.numel()
        host = torch.cat([g, info["direct"], info["mixed"], info["l2"].reshape(1).to(g.dtype)]).cpu()
        g, direct, mixed, l2 = host[:m], host[m : 2 * m], host[2 * m : 3 * m], float(host[3 * m])
        ratio = mixed_ratio(direct, mixed)
        self.omega.update(g, self.mirror)
        self.omega_device = self.omega.omega.to(rt.device)
        return dict(outer_step=self.omega.step, omega=self.omega.omega.tolist(), hypergrad=g.tolist(), l2=l2,
                    mixed_ratio=ratio if math.isfinite(ratio) else None)

    # -- log and validation -------------------------------------------------------------------------------------
    def log_train(self, stats: StepStats, lr: float, record: dict, bar) -> None:
        """One metrics line: the only place the step's device-side numbers are read (one host sync per log step)."""
        now = time.perf_counter()
        tokens = self.batches.train.tokens_seen
        tps = (tokens - self.window_tokens) * self.rt.world_size / max(now - self.window_start, 1e-9)
        wait = self.window_wait
        self.window_start, self.window_tokens, self.window_wait = now, tokens, 0.0
        parts = {k: v.tolist() for k, v in stats.parts.items()}
        ce = parts.get("ce")
        grad_norm = torch.stack(stats.grad_norms).tolist() if stats.grad_norms else None
        self.log.write(**record, step=self.step, elapsed_s=self.elapsed(), lr=lr, tokens_per_s=tps,
                       data_wait_s=wait, train_ce=ce, grad_norm=grad_norm, **self.exposure.record(self.step),
                       **({} if "omega" in record else {"omega": self.omega.omega.tolist()}))
        bar.set_postfix(loss=f"{min(ce or [float('nan')]):.3f}", tok_s=f"{tps:,.0f}")

    @torch.no_grad()
    def validate(self, per_batch_losses: bool = False) -> dict:
        """Mean validation loss of every student (and of the omega ensemble) on the fixed validation batches, and
        with `per_batch_losses` each batch's loss ("batches"): the units a paired bootstrap between runs resamples."""
        n = len(self.students)
        per_batch = torch.zeros(n + 1, len(self.batches.valid), dtype=torch.float64, device=self.rt.device)
        for b, vb in enumerate(self.batches.valid):
            vb = vb.to(self.rt.device)
            # The bare students, not their DDP wrappers: validation runs on rank 0 alone.
            logits = [o[0] for o in self.forward_all(vb, train_mode=False, modules=self.students)]
            for i, z in enumerate(logits):
                per_batch[i, b] = mlm_loss(z, vb.labels)
            if n > 1:  # the ensemble of one model is that model
                per_batch[-1, b] = ensemble_loss(logits, vb.labels, self.omega_device, kind="ensemble")
        means = per_batch.mean(dim=1).tolist()  # one host sync for the whole validation
        out = {"valid_loss": means[:-1], **({"batches": per_batch.tolist()} if per_batch_losses else {})}
        if n > 1:
            out["valid_ensemble_loss"] = means[-1]
        return out

    def initial_validation(self) -> None:
        first = self.validate()
        self.log.write(step=0, **first, unigram_entropy=self.unigram, omega=self.omega.omega.tolist())
        self.initial_valid = first["valid_loss"]

    def log_validation(self, bar) -> None:
        live = {"valid_loss_live": self.validate()["valid_loss"]} if self.averages else {}
        with all_swapped_in(self.averages):  # the loss of the weights the run exports
            v = {**self.validate(), **live}
        self.log.write(step=self.step, **v, unigram_entropy=self.unigram, omega=self.omega.omega.tolist())
        bar.write(f"step {self.step}: valid loss " + ", ".join(f"{x:.4f}" for x in v["valid_loss"])
                  + f" (unigram entropy {self.unigram:.4f})")

    # -- checkpoint ---------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.guard.check(self.students, self.omega.omega)  # a checkpoint never holds NaN weights
        state = {
            "step": self.step,
            "students": [s.state_dict() for s in self.students],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [sc.state_dict() for sc in self.schedulers],
            "omega": self.omega.state_dict(),
            "averages": [a.state_dict() for a in self.averages],
            "train_stream": self.batches.train.state_dict(),
            "heldout_stream": self.batches.heldout.state_dict() if self.batches.heldout is not None else None,
            "rng": gather_rng(self.rt),
            "config": config_mod.to_toml(self.cfg),
            "elapsed_s": self.elapsed(),
            "initial_valid_loss": self.initial_valid,
            "run_id": self.run_id,
            "inputs": self.inputs,
        }
        if self.rt.is_master:
            save_checkpoint(self.run_dir, self.step, state)
        self.rt.barrier()

    # -- export -------------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Final validation, summary and Hugging Face export (rank 0); returns the summary ({} on other ranks)."""
        rt = self.rt
        dump_rank_state(self.students, self.omega.omega, rt.rank)  # $DWML_RANK_DUMP: a DDP test hook
        summary: dict = {}
        self.guard.check(self.students, self.omega.omega)  # NaN weights are never exported
        if rt.is_master:
            self.timings["steps"] = self.elapsed() - self.elapsed_before - sum(
                self.timings.get(k, 0.0) for k in ("validation", "checkpoint"))
            with all_swapped_in(self.averages):  # train.ema_decay: the averages are what is validated and exported
                with self.phase("final_validation"):
                    final = self.validate(per_batch_losses=True)
                history = valid_history(self.run_dir / "metrics.jsonl", len(self.archs))
                exits = [plateau_exit_step(h + [(self.step, v)], self.unigram)
                         for h, v in zip(history, final["valid_loss"])]
                summary = dict(
                    method=self.cfg.train.method, steps=self.step, omega=self.omega.omega.tolist(),
                    omega_learned=self.learn_omega, ema_decay=self.cfg.train.ema_decay, precision=rt.precision,
                    peers=peer_summaries(self.archs, final["valid_loss"], exits, final["batches"]),
                    unigram_entropy=self.unigram, initial_valid_loss=self.initial_valid, train_seconds=self.elapsed(),
                    train_tokens=int(self.batches.train.tokens_seen) * rt.world_size,
                    exposure=self.exposure.summary(self.step), valid_ensemble_loss=final.get("valid_ensemble_loss"),
                    valid_ensemble_batch_losses=final["batches"][-1] if len(self.archs) > 1 else None,
                    tokenizer=str(self.tokenizer_dir), tokenizer_sha256=self.tokenizer_sha,
                    timings_s={k: round(v, 3) for k, v in self.timings.items()})  # export is not included
                check_same_tokenizer(self.tokenizer_dir, self.tokenizer_sha, "the one this training started with")
                summary.update(export_final(self.run_dir, self.students, self.tokenizer_dir, summary, self.line_ends))
        rt.barrier()
        return summary


