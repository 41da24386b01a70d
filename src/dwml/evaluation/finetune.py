"""Fine-tuning evaluation on BabyLM's (Super)GLUE subsets (`glue_filtered`): `dwml finetune MODEL --tasks ...`.

Each task fine-tunes a fresh copy of the pretrained encoder with a sequence-classification head
(`AutoModelForSequenceClassification` on our RobertaForMaskedLM folders: the LM head is dropped, a classifier head is
initialised) and reports the metrics BabyLM reports: accuracy everywhere, MCC for CoLA, F1 for MRPC and QQP.

The tasks, their data (templates, carving of missing train splits) and metrics are in `dwml.evaluation.glue`.
There is no model selection on the evaluation split: we train for a fixed number of epochs and report the last one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_model_tokenizer, model_files
from ..errors import DwmlError, require
from ..io import check_output_file, result_document, write_json
from ..models.memory import check_folder_memory
from ..models.model import POSITION_OFFSET
from .glue import (DEFAULT_DATA_DIR, DEFAULT_TASKS, TASKS, Example, FinetuneConfig, TaskData, TaskSpec, accuracy,
                   compute_metrics, load_task, resolve_device)

# --------------------------------------------------------------------------------------------------------------
# Model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the expected load report (LM head unused, classifier newly initialised) and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_model_dir(model_dir: Path) -> None:
    require(model_dir.is_dir(), f"{model_dir}: model directory not found")
    require((model_dir / "config.json").is_file(),
            f"{model_dir}: not a Hugging Face model directory (no config.json)")


def load_tokenizer(model_dir: Path):
    check_model_dir(model_dir)
    check_model_tokenizer(model_dir)  # without tokenizer files transformers would build an empty tokenizer
    try:
        with _quiet_transformers():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise DwmlError(f"{model_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    require(tokenizer.pad_token_id is not None, f"{model_dir}: the tokenizer has no pad token")
    return tokenizer


def load_classifier(model_dir: Path, num_labels: int):
    """The pretrained encoder with a freshly initialised `num_labels`-way classification head.

    Only the classifier may be missing from the checkpoint: any other missing weight means the folder does not hold
    the encoder we meant to evaluate, and fine-tuning a randomly initialised encoder would report a misleading score.
    """
    check_model_dir(model_dir)
    try:
        with _quiet_transformers(), model_files(model_dir):
            from transformers import AutoModelForSequenceClassification

            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels, output_loading_info=True
            )
    except (OSError, ValueError) as e:
        raise DwmlError(f"{model_dir}: cannot load the model ({str(e).splitlines()[0]})") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("classifier."))
    more = "..." if len(missing) > 3 else ""
    require(not missing, f"{model_dir}: checkpoint lacks encoder weights {missing[:3]}{more}")
    return model


def max_input_length(model, requested: int) -> int:
    """`requested`, capped by what the position embeddings hold (RoBERTa positions start at padding_idx + 1)."""
    limit = model.config.max_position_embeddings
    if model.config.model_type == "roberta":
        limit -= POSITION_OFFSET
    return min(requested, limit)


def encode(tokenizer, examples: list[Example], max_length: int) -> list[list[int]]:
    """Token ids per example: `<s> A </s>` or `<s> A </s></s> B </s>`, truncated longest-first to `max_length`."""
    a = [e.text_a for e in examples]
    with _quiet_transformers():
        if examples and examples[0].text_b is not None:
            enc = tokenizer(a, [e.text_b for e in examples], truncation=True, max_length=max_length)
        else:
            enc = tokenizer(a, truncation=True, max_length=max_length)
    return enc["input_ids"]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding: (B, longest) input ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _autocast(device: torch.device):
    # bf16 autocast on CUDA only; CPU runs stay in fp32.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --------------------------------------------------------------------------------------------------------------
# Training and prediction


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then linear 1 -> 0 at `total` (BERT/RoBERTa fine-tuning)."""
    if step < warmup:
        return (step + 1) / warmup  # the first update already uses a non-zero rate
    return max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No weight decay on biases and LayerNorm gains (the 1-D parameters), as in BERT/RoBERTa fine-tuning.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train_classifier(
    model: torch.nn.Module,
    ids: list[list[int]],
    labels: Sequence[int],
    cfg: FinetuneConfig,
    epochs: int,
    device: torch.device,
    pad_id: int,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Plain fine-tuning loop (AdamW, linear warmup/decay, grad clipping). Returns the mean train loss per epoch."""
    n = len(ids)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_ratio * total))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, warmup, total))
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    # Shuffling uses its own generator so it is reproducible whatever else draws random numbers.
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    epoch_losses = []
    for epoch in range(epochs):
        t0, loss_sum = time.time(), 0.0
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, cfg.batch_size):
            batch = perm[start : start + cfg.batch_size]
            input_ids, mask = pad_batch([ids[i] for i in batch], pad_id)
            input_ids, mask = input_ids.to(device), mask.to(device)
            with _autocast(device):
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float(), labels_t[batch].to(device))  # loss in fp32
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch)
        epoch_losses.append(loss_sum / n)
        if log:
            log(f"epoch {epoch + 1}/{epochs} train loss {epoch_losses[-1]:.4f} ({time.time() - t0:.1f}s)")
    return epoch_losses


def predict(
    model: torch.nn.Module, ids: list[list[int]], batch_size: int, device: torch.device, pad_id: int
) -> np.ndarray:
    """Predicted class per example. Batches hold examples of similar length (sorted), so little padding is computed."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    preds = np.zeros(len(ids), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, mask = pad_batch([ids[i] for i in batch], pad_id)
            with _autocast(device):
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            preds[batch] = logits.float().argmax(-1).cpu().numpy()
    return preds


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (head init, dropout) without leaving the caller's global RNG state changed."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def majority_baseline(train: list[Example], evals: list[Example]) -> float:
    """Accuracy on eval of always predicting the most frequent train label (ties: the smallest label)."""
    counts = np.bincount([e.label for e in train])
    return accuracy(np.full(len(evals), int(counts.argmax())), np.array([e.label for e in evals]))


def _row(task: str, spec: TaskSpec, preds: np.ndarray, evals: list[Example], data: TaskData, eval_source: str,
         n_train: int, note: str, extra: dict[str, Any]) -> dict[str, Any]:
    labels = np.array([e.label for e in evals])
    metrics = compute_metrics(spec.metrics, preds, labels)
    return {
        "task": task,
        "metrics": metrics,
        "primary": spec.primary,
        "score": metrics[spec.primary],
        "majority": majority_baseline(data.train, evals),
        "n_train": n_train,
        "n_eval": len(evals),
        "train_source": data.train_source,
        "eval_source": eval_source,
        "carved": data.carved,
        "note": note,
        **extra,
    }


def finetune_task(
    model_dir: Path, tokenizer, data: TaskData, cfg: FinetuneConfig, device: torch.device
) -> list[dict[str, Any]]:
    """Fine-tune a fresh classifier on one task; one result row for the task (two for mnli: mnli and mnli-mm)."""
    spec = TASKS[data.task]
    epochs = cfg.epochs * spec.epoch_factor

    def log(msg: str) -> None:
        if cfg.progress:
            print(f"[{model_dir.name}] {data.task}: {msg}", file=sys.stderr, flush=True)

    t0 = time.time()
    with _seeded(cfg.seed, device):
        check_folder_memory(model_dir, device, batch=cfg.batch_size, seq_len=cfg.max_length)  # before any load
        model = load_classifier(model_dir, spec.num_labels).to(device)
        check_model_tokenizer(model_dir, tokenizer, model)  # a larger tokenizer would index past the embeddings
        max_length = max_input_length(model, cfg.max_length)
        log(f"{len(data.train)} train / {len(data.eval)} eval examples, {epochs} epochs"
            + (f" ({data.note})" if data.note else ""))
        train_ids = encode(tokenizer, data.train, max_length)
        losses = train_classifier(model, train_ids, [e.label for e in data.train], cfg, epochs, device,
                                  tokenizer.pad_token_id, log)
    extra = {"epochs": epochs, "max_length": max_length, "final_train_loss": losses[-1]}
    evals = [(data.task, data.eval, data.eval_source, data.note)]
    for name, (examples, source) in data.extra_evals.items():
        evals.append((name, examples, source, f"model fine-tuned on {data.task}, evaluated on {source}"))
    rows = []
    for name, examples, source, note in evals:
        preds = predict(model, encode(tokenizer, examples, max_length), cfg.eval_batch_size, device,
                        tokenizer.pad_token_id)
        rows.append(_row(name, spec, preds, examples, data, source, len(data.train), note,
                         {**extra, "seconds": round(time.time() - t0, 2)}))
    return rows


def finetune_model(model_dir: str | Path, cfg: FinetuneConfig | None = None) -> dict[str, Any]:
    """Fine-tune and score one saved model on every task of `cfg.tasks`.

    Returns {"model", "device", "data_dir", "config", "tasks": {task: row}, "average": mean of the rows' scores,
    "notes": [one per carved task]}; a row holds metrics, primary, score (= metrics[primary]), majority (accuracy of
    the majority train label), n_train, n_eval, train/eval sources, carved, note, epochs, max_length, seconds.
    """
    cfg = (cfg or FinetuneConfig()).validate()
    model_dir = Path(model_dir)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(model_dir)
    # Read every task first so that a bad file fails before any training time is spent.
    datas = [load_task(task, cfg) for task in cfg.tasks]
    rows: dict[str, dict[str, Any]] = {}
    for data in datas:
        for row in finetune_task(model_dir, tokenizer, data, cfg, device):
            rows[row["task"]] = row
    notes = [f"{r['task']}: {r['note']}" for r in rows.values() if r["carved"]]
    return {
        "model": str(model_dir),
        "device": str(device),
        "data_dir": str(Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR),
        "config": dataclasses.asdict(cfg),
        "tasks": rows,
        "average": float(np.mean([r["score"] for r in rows.values()])),
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------------------
# Run directories and output


def resolve_models(path: str | Path, peer: int | None = None) -> list[Path]:
    """MODEL may be a model folder, a run directory RUN/ (its RUN/final/peer*/) or RUN/final/ itself."""
    path = Path(path)
    require(path.exists(), f"{path}: model or run directory not found")
    if (path / "config.json").is_file():
        require(peer is None, f"--peer: {path} is a single model directory, not a run directory")
        return [path]
    final = path / "final" if (path / "final").is_dir() else path
    peers = [p for p in final.glob("peer*") if p.is_dir() and p.name[4:].isdigit()]
    peers.sort(key=lambda p: int(p.name[4:]))
    require(len(peers) > 0, f"{path}: neither a model directory (no config.json) nor a run directory (no final/peer*/)")
    if peer is not None:
        chosen = [p for p in peers if int(p.name[4:]) == peer]
        require(len(chosen) == 1, f"--peer: no peer{peer} in {final}; found {[p.name for p in peers]}")
        return chosen
    return peers


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of one model's results."""
    header = f"{'task':<8} {'metrics':<26} {'score':>7} {'majority':>8} {'n_train':>7} {'n_eval':>6}  note"
    lines = [f"model: {result['model']} (device {result['device']})", header, "-" * len(header)]
    for r in result["tasks"].values():
        metrics = " ".join(f"{k}={v:.3f}" for k, v in r["metrics"].items())
        note = "train carved from valid (details below)" if r["carved"] else r["note"]
        lines.append(f"{r['task']:<8} {metrics:<26} {r['score']:>7.3f} {r['majority']:>8.3f} "
                     f"{r['n_train']:>7} {r['n_eval']:>6}  {note}")
    lines.append(f"average of the {len(result['tasks'])} scores: {result['average']:.3f}  "
                 "(score = mcc for cola, f1 for mrpc/qqp, accuracy otherwise; "
                 "majority = accuracy of the majority class)")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return FinetuneConfig(
        tasks=tasks,
        data_dir=args.data_dir or "",
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        carve_fraction=args.carve_fraction,
        max_train_examples=args.max_train,
        max_eval_examples=args.max_eval,
        device=args.device,
        progress=not args.quiet,
    ).validate()


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_output_file(args.out, "finetune", overwrite=args.overwrite)  # before any work: refused now, not after
    models = resolve_models(args.model, args.peer)
    results = {}
    for model_dir in models:
        result = finetune_model(model_dir, cfg)
        print(format_table(result), flush=True)
        results[model_dir.name] = result
    if args.out:
        # A model folder gives its result; a run directory gives {"run": RUN, "peers": {"peer0": result, ...}}.
        is_run = not (Path(args.model) / "config.json").is_file()
        write_json(args.out, result_document("finetune", {"run": str(args.model), "peers": results} if is_run
                                             else results[models[0].name]))
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    d = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune and score a model on BabyLM's (Super)GLUE subsets",
        description="Fine-tune MODEL (a saved model folder, or a run directory: every RUN/final/peer*/, or --peer i) "
        "with a classification head on each task of BabyLM's glue_filtered data and report accuracy (MCC for cola, "
        "F1 for mrpc/qqp; mnli-mm is reported with mnli). Tasks without a train file (boolq, multirc, qnli, sst2) "
        "train on a stratified part of their valid file; the output says so.",
    )
    p.add_argument("model", metavar="MODEL", help="model folder, run directory RUN/ or RUN/final/")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (default: all ten)")
    p.add_argument("--peer", type=int, default=None, help="only this peer of a run directory")
    p.add_argument("--data-dir", default="", help=f"glue_filtered directory (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per task (wsc: x3) (default: {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default: {d.batch_size}")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"tokens per input, capped by the model's positions (default: {d.max_length})")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help=f"default: {d.warmup_ratio}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default: {d.weight_decay}")
    p.add_argument("--carve-fraction", type=float, default=d.carve_fraction,
                   help="share of valid used for training where the train file is missing "
                   f"(default: {d.carve_fraction})")
    p.add_argument("--max-train", type=int, default=0, help="at most N train examples per task (0 = all)")
    p.add_argument("--max-eval", type=int, default=0, help="at most N eval examples per task (0 = all)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default: {d.seed}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not a previous result of this command")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.set_defaults(func=run_cli)
