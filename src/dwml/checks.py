"""Input and result checks that turn silent wrong results into one-line `DwmlError`s.

* `NonFiniteGuard`: a NaN/inf loss or gradient norm stops training naming the step (or skips up to N steps), without
  a host sync per step: the flags stay on the device and are read on log/eval/save/outer steps and before the export.
* `check_finite_weights`: NaN weights are never exported or evaluated.
* Tokenizer identity: `tokenizer_fingerprint` (a hash of what decides the token ids), `check_prepared_tokenizer`
  (prepared data has its tokenizer, of the data's vocabulary and recorded hash), `check_model_tokenizer` (a model
  folder has tokenizer files that fit its embedding matrix).
* `check_peer_arch`: a searched peer made for another vocabulary or sequence length is refused, not resized.
* `check_checkpoint_matches`: a checkpoint of another architecture or number of students is refused before loading.
* OS errors (`os_error_message`: disk full, read-only file system, permissions) as one line.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import DwmlError, require

# --------------------------------------------------------------------------------------------------------------
# Non-finite training


class NonFiniteGuard:
    """Watches every step's losses and gradient norms for NaN/inf.

    `max_skips == 0` (default): nothing is read back per step. Each step ORs a device-side "bad" flag and remembers the
    first bad step on the device; `check()` (on the steps that write something - log, validation, checkpoint, outer
    step - and before the export) reads it once and raises. A run therefore stops at the first such step after the
    divergence, before writing it: no NaN metrics line, checkpoint or model is written (the last good checkpoint stays
    the newest).

    `max_skips > 0`: the decision to skip must be taken before the optimizer step, so `step_ok` reads the flag back
    every step (one host sync per step, the price of the option); a bad step's update is dropped (no optimizer step;
    the learning-rate schedule and the data move on) and the run stops once more than `max_skips` steps were skipped.
    """

    def __init__(self, max_skips: int = 0, device: torch.device | str = "cpu", check_every: Sequence[int] = (),
                 last_step: int = -1):
        self.max_skips = int(max_skips)
        self.check_every, self.last_step = tuple(k for k in check_every if k > 0), last_step
        self.device = torch.device(device)
        self.skipped: list[int] = []
        self._bad_now = torch.zeros((), dtype=torch.bool, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def observe(self, *values: torch.Tensor | float | Sequence) -> None:
        """Fold losses / gradient norms of the current step into its flag (tensors stay on the device)."""
        for v in values:
            if isinstance(v, (list, tuple)):
                self.observe(*v)
            elif isinstance(v, torch.Tensor):
                self._bad_now |= ~torch.isfinite(v.detach()).all().to(self.device)
            elif v is not None and not math.isfinite(float(v)):
                self._bad_now.fill_(True)

    def step_ok(self, step: int) -> bool:
        """Close step `step` (1-based): True if its optimizer update should be applied."""
        bad_now, self._bad_now = self._bad_now, torch.zeros((), dtype=torch.bool, device=self.device)
        if self.max_skips == 0:
            first_unset = self._first_bad < 0
            self._first_bad = torch.where(bad_now & first_unset, torch.full_like(self._first_bad, step),
                                          self._first_bad)
            return True
        _all_reduce_max(bad_now)  # every rank must take the same decision
        if not bool(bad_now):  # the per-step sync of the skip mode
            return True
        self.skipped.append(step)
        if len(self.skipped) > self.max_skips:
            raise DwmlError(f"training diverged: non-finite loss or gradient norm at step {step}, "
                            f"{len(self.skipped)} non-finite steps > train.max_nonfinite_skips={self.max_skips} "
                            f"(skipped steps {self.skipped}); lower train.lr or raise train.warmup_steps")
        return False

    def maybe_check(self, step: int) -> None:
        """`check()` on the steps given as `check_every` (log / eval / save cadences) and the last step."""
        if step == self.last_step or any(step % k == 0 for k in self.check_every):
            self.check()

    def check(self, modules: Iterable[torch.nn.Module] = (), omega: torch.Tensor | None = None) -> None:
        """Raise if any closed step was non-finite (one read-back), or if weights / omega are not finite."""
        _all_reduce_max(self._first_bad)  # ranks see different losses; they must stop together
        first = int(self._first_bad)
        if first >= 0:
            raise DwmlError(f"training diverged: non-finite loss or gradient norm at step {first}; nothing after "
                            f"the last checkpoint was kept; lower train.lr or raise train.warmup_steps "
                            f"(or allow skips with train.max_nonfinite_skips)")
        for i, m in enumerate(modules):
            check_finite_weights(m, f"student {i}")
        if omega is not None and not bool(torch.isfinite(omega).all()):
            raise DwmlError(f"training diverged: omega became non-finite ({omega.tolist()}); "
                            f"lower distill.eta or train.lr")


def _all_reduce_max(t: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        flag = t.to(torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        t.copy_(flag.to(t.dtype))


def check_finite_weights(module: torch.nn.Module, where: str) -> None:
    """Refuse a model with NaN/inf parameters (one fused reduction, one read-back)."""
    params = [p.detach() for p in module.parameters()]
    if not params:
        return
    flags = torch.stack([torch.isfinite(p).all() for p in params])
    if not bool(flags.all()):
        names = [n for (n, _), ok in zip(module.named_parameters(), flags.tolist()) if not ok]
        raise DwmlError(f"{where}: non-finite (NaN/inf) weights in {len(names)} tensor(s), e.g. {names[0]}; "
                        f"the training diverged, refusing to use this model")


def check_finite_scores(scores: Sequence[float], where: str) -> None:
    """Evaluation: a NaN/inf sentence score would silently count as wrong (NaN > x is False); refuse it."""
    bad = sum(1 for s in scores if not math.isfinite(s))
    require(bad == 0, f"{where}: {bad} of {len(scores)} sentence scores are NaN/inf "
                      f"(a diverged model or one with non-finite weights)")


# --------------------------------------------------------------------------------------------------------------
# Tokenizer identity

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 of what decides the token ids: the BPE model (vocab + merges), normaliser, pre-tokenizer and the added
    tokens' ids of `path/tokenizer.json`. Formatting differences between tokenizers/transformers versions (merges as
    "a b" or ["a", "b"], key order, the wrapper's config files) do not change it, so a tokenizer copied into a model
    folder by `save_pretrained` keeps the fingerprint of the one `dwml prepare` wrote."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    require(file.is_file(), f"{file}: tokenizer file not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DwmlError(f"{file}: unreadable tokenizer ({e})") from None
    model = dict(data.get("model") or {})
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    canonical = {
        "model": model,
        "normalizer": data.get("normalizer"),
        "pre_tokenizer": data.get("pre_tokenizer"),
        "added_tokens": sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or []),
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode("utf-8")).hexdigest()


def _tokenizer_vocab_size(file: Path) -> int:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises a bare Exception for malformed files
        raise DwmlError(f"{file}: unreadable tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def check_prepared_tokenizer(prepared: str | Path, meta: dict) -> str:
    """Before training: the prepared data's tokenizer exists, has the data's vocabulary size and (data prepared by a
    dwml that records it) the hash meta.json recorded. Returns its fingerprint (recorded in the run summary)."""
    prepared = Path(prepared)
    file = prepared / "tokenizer" / "tokenizer.json"
    require(file.is_file(), f"{prepared / 'tokenizer'}: tokenizer missing from the prepared data "
                            f"(expected the folder `dwml prepare` writes); re-run dwml prepare")
    n = _tokenizer_vocab_size(file)
    require(n == int(meta["vocab_size"]), f"{file}: tokenizer has {n} tokens, but {prepared / 'meta.json'} says "
                                          f"vocab_size {meta['vocab_size']} (the tokenizer was swapped?)")
    fingerprint = tokenizer_fingerprint(file)
    recorded = meta.get("tokenizer_sha256")
    require(recorded in (None, fingerprint),
            f"{file}: tokenizer differs from the one the data was prepared with "
            f"(sha256 {fingerprint[:12]}..., meta.json records {str(recorded)[:12]}...); re-run dwml prepare")
    return fingerprint


def _sha256_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def data_fingerprint(prepared: str | Path, meta: dict) -> str:
    """sha256 of what identifies a prepared directory's token stream: meta.json's vocabulary and per-split counts,
    the shard headers and the shard sizes (re-preparing in place with another corpus, tokenizer or split changes it;
    the shards themselves are not read, so this costs nothing at start-up)."""
    prepared = Path(prepared)
    parts = {"vocab_size": meta.get("vocab_size"), "dtype": meta.get("dtype"), "splits": meta.get("splits")}
    for split in ("train", "valid"):
        header, shard = prepared / f"{split}.json", prepared / f"{split}.bin"
        parts[split] = [header.read_text(encoding="utf-8") if header.is_file() else None,
                        shard.stat().st_size if shard.is_file() else None]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(folder: str | Path) -> str:
    """sha256 of a Hugging Face folder's config.json and weight files (a KD teacher replaced in place changes it)."""
    folder = Path(folder)
    files = [folder / "config.json"] + sorted(p for p in folder.iterdir()
                                              if p.suffix in (".safetensors", ".bin") and p.is_file())
    return _sha256_files(files)


# what a checkpoint's weights depend on besides the config: key -> what the user reads in the error
INPUTS = {"tokenizer_sha256": "tokenizer", "data_sha256": "prepared data", "teacher_sha256": "teacher model"}


def check_same_inputs(path: str | Path, state: dict, inputs: dict[str, str]) -> None:
    """Before resuming from checkpoint `path`: the tokenizer, the prepared data and a KD teacher are the ones the
    run started with (`inputs` as recorded by `Trainer`); checkpoints older than this check record none."""
    saved = state.get("inputs")
    if not isinstance(saved, dict):
        return
    for key, ours in inputs.items():
        theirs = saved.get(key)
        require(theirs in (None, ours),
                f"{path}: this run started with another {INPUTS[key]} (sha256 {str(theirs)[:12]}..., now "
                f"{ours[:12]}...; re-prepared or replaced in place?); restore it, or start over with --no-resume "
                f"(the old run is moved aside)")


def check_same_tokenizer(path: str | Path, expected: str | None, what: str) -> None:
    """Raise unless the tokenizer at `path` has fingerprint `expected` (None: nothing recorded, nothing to check)."""
    if expected is None:
        return
    found = tokenizer_fingerprint(path)
    require(found == expected, f"{path}: tokenizer differs from {what} (sha256 {found[:12]}..., "
                               f"expected {expected[:12]}...)")


def exported_tokenizer_sha(summary: dict) -> str | None:
    """The fingerprint of the tokenizer a run's model folders carry: the prepared one's, or (a run that exports it
    reading line breaks as </s>, `dwml.data.tokenizer.with_line_ends`) the one recorded at export."""
    return summary.get("export_tokenizer_sha256") or summary.get("tokenizer_sha256")


def check_model_tokenizer(path: str | Path, tokenizer: Any = None, model: Any = None) -> None:
    """A model folder must carry tokenizer files (else transformers builds an empty tokenizer that turns every
    sentence into unknown tokens and scores 0%), and its tokenizer must fit the model's embedding matrix."""
    path = Path(path)
    if tokenizer is None:
        require(any((path / f).is_file() for f in TOKENIZER_FILES),
                f"{path}: no tokenizer files (expected tokenizer.json; a folder written by `dwml export` or "
                f"`save_pretrained` has one)")
        return
    n_tok = len(tokenizer)
    require(n_tok > 0, f"{path}: the tokenizer is empty")
    if model is not None:
        n_model = int(model.get_input_embeddings().weight.shape[0])
        require(n_tok <= n_model, f"{path}: the tokenizer has {n_tok} tokens, more than the model's vocabulary "
                                  f"of {n_model} (tokenizer and model do not belong together)")


@contextlib.contextmanager
def model_files(path: str | Path) -> Iterator[None]:
    """Around `from_pretrained(path)`: a corrupt safetensors/config/tokenizer file becomes one line naming `path`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "ignore_mismatched_sizes" in reason:  # transformers points to a load report that dwml does not print
            reason = "a weight's shape differs from config.json's (e.g. vocab_size edited or from another model)"
        raise DwmlError(f"{path}: cannot load the model or tokenizer files ({reason})") from None


# --------------------------------------------------------------------------------------------------------------
# Architectures and checkpoints


def check_peer_arch(arch: dict, vocab_size: int, max_positions: int, where: str) -> None:
    """A peer searched for another vocabulary or number of positions has another parameter count: the N/(i+1) target
    of the search would be lost by silently resizing it, so any given value must match the data."""
    for key, want, hint in (("vocab_size", vocab_size, "the prepared data's vocabulary"),
                            ("max_positions", max_positions, "data.seq_len + 2")):
        got = arch.get(key)
        require(got is None or got == want,
                f"{where}.{key}: {got}, but this run needs {want} ({hint}); search the peers again with "
                f"--vocab-size {vocab_size} --max-positions {max_positions}")


def check_peers_file(path: str | Path, tables: Sequence[dict], vocab_size: int, max_positions: int) -> None:
    """`check_peer_arch` for every peer's 'arch' table of the `dwml search` JSON file `path` (as
    `search.read_peers_file` returns them), on the values the file gives (a missing vocab_size / max_positions
    takes the data's)."""
    for k, table in enumerate(tables):
        check_peer_arch(table, vocab_size, max_positions, f"{path}: peers[{k}].arch")


def check_checkpoint_matches(state: dict, students: Sequence[torch.nn.Module], path: str | Path) -> None:
    """Before loading: the checkpoint has as many students as the config and every tensor has the same name and
    shape (a checkpoint of another architecture, method or data would otherwise fail deep in load_state_dict)."""
    saved = state.get("students")
    require(isinstance(saved, list) and len(saved) == len(students),
            f"{path}: checkpoint has {len(saved) if isinstance(saved, list) else 'no'} student(s), the config has "
            f"{len(students)}; use another --out or --no-resume")
    for i, (sd, s) in enumerate(zip(saved, students)):
        require(isinstance(sd, dict), f"{path}: student {i}: not a state dict")
        ours = s.state_dict()
        missing, extra = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
        require(not missing and not extra, f"{path}: student {i} in the checkpoint has another architecture than "
                                           f"the configured one (missing {missing[:3]}, unexpected {extra[:3]}); "
                                           f"use another --out or --no-resume (the old run is moved aside)")
        for k, v in ours.items():
            theirs = sd[k]
            require(isinstance(theirs, torch.Tensor) and tuple(theirs.shape) == tuple(v.shape),
                    f"{path}: student {i} in the checkpoint has another architecture than the configured one ({k}: "
                    f"shape {tuple(getattr(theirs, 'shape', ()))} in the checkpoint, {tuple(v.shape)} in the config; "
                    f"another shape or vocabulary); use another --out or --no-resume (the old run is moved aside)")
    for key in ("optimizers", "schedulers"):
        require(isinstance(state.get(key), list) and len(state[key]) == len(students),
                f"{path}: checkpoint field {key!r} does not hold one entry per student")


# --------------------------------------------------------------------------------------------------------------
# OS errors

# errno -> what the user can do about it
_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space and run the command again",
    errno.EROFS: "read-only file system; choose an output on a writable file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EDQUOT: "disk quota exceeded; free some space and run the command again",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory",
}


def os_error_message(e: OSError) -> str | None:
    """One line for an environment error the user can fix (disk full, read-only, permissions); None otherwise."""
    hint = _OS_ERRORS.get(e.errno)
    if hint is None:
        return None
    if e.filename is None:  # e.g. a write through a file object
        return hint
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{where}: {hint}"
