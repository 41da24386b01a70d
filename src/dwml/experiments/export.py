"""`dwml export RUN --peer i`: a self-contained Hugging Face model folder with a model card.

The folder holds config.json, model.safetensors, the tokenizer files and README.md (architecture, method, training
data, validation loss and any zero-shot / GLUE scores found next to the run), and nothing that needs dwml to load.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..checks import check_finite_weights, check_model_tokenizer, check_same_tokenizer, exported_tokenizer_sha
from ..data.tokenizer import copy_tokenizer
from ..errors import DwmlError
from ..io import atomic_dir, check_output_dir, read_json, write_text

# How the model card names each model family (`dwml.models.model`).
FAMILY_STYLE = {"roberta": "RoBERTa-style", "modernbert": "ModernBERT (pre-norm, rotary positions, GeGLU)"}


def find_scores(run_dir: Path, peer: int) -> dict:
    """Scores of this peer from eval/finetune JSON files in the run directory (written by experiment/eval)."""
    found: dict = {}
    for f in sorted(run_dir.glob("eval*.json")) + sorted(run_dir.glob("finetune*.json")):
        data = read_json(f)
        models = data.get("models", {}) if isinstance(data, dict) else {}
        entry = models.get(f"peer{peer}")
        if isinstance(entry, dict):
            found[f.stem] = entry.get("summary", entry)
    return found


def model_card(summary: dict, peer: int, scores: dict, run_dir: Path) -> str:
    p = summary["peers"][peer]
    a = p["arch"]
    family = a.get("family", "roberta")
    style = FAMILY_STYLE.get(family, family)
    omega = summary.get("omega") or []
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        f"tags: [babylm, masked-lm, {family}, knowledge-distillation, dwml]",
        "---",
        f"# {run_dir.name} / peer {peer} ({p['name']})",
        "",
        f"{style} masked language model trained with "
        f"**{summary['method']}** by [dwml](https://arxiv.org/abs/2411.16487)-style teacher-less distillation.",
        "",
        "## Architecture",
        f"- family {family}, layers {a['layers']}, attention heads {a['heads']}, hidden {a['hidden']}, "
        f"intermediate {a['intermediate']}, vocabulary {a['vocab_size']}, positions {a['max_positions']}",
        f"- parameters: {p['params']:,}",
        "",
        "## Training",
        f"- method: {summary['method']}, steps: {summary.get('steps')}",
    ]
    exposure = summary.get("exposure")
    if exposure:  # BabyLM's rules count whitespace words seen, repeated passes and a teacher's data included
        teacher = exposure.get("teacher_words")
        lines.append(f"- words seen: {exposure['words_seen']:,} ({exposure['epochs']:.2f} epochs of "
                     f"{exposure['train_words']:,} train words)"
                     + (f"; with the teacher's {teacher:,}: {exposure['total_words']:,}" if teacher else "")
                     + (f"; BabyLM track {exposure['track']}" if exposure.get("track", "none") != "none" else ""))
    if len(omega) > 1:
        lines.append(f"- peer weight omega: {omega[peer]:.4f} (all peers: "
                     + ", ".join(f"{w:.4f}" for w in omega) + ")")
    data = summary.get("data")
    if data:
        lines.append(f"- data: {data}")
    lines += ["", "## Scores", f"- validation MLM loss: {p['valid_loss']:.4f}"]
    for name, s in scores.items():
        lines.append(f"- {name}: `{json.dumps(s, sort_keys=True)}`")
    lines += [
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        'model = AutoModelForMaskedLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_peer(run_dir: str | Path, peer: int, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write peer `peer` of a finished run to `out_dir`: new, empty or an earlier export (else `overwrite`); never
    the run itself or a folder holding it; inside the run only under RUN/export/."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    summary = read_summary(run_dir, peer)
    check_output_dir(out_dir, "export", inputs=[run_dir], overwrite=overwrite, allowed_inside=[run_dir / "export"])
    with atomic_dir(out_dir, command="export") as tmp:
        write_peer(run_dir, peer, summary, tmp)
    return out_dir


def read_summary(run_dir: Path, peer: int) -> dict:
    summary_path = run_dir / "final" / "summary.json"
    if not summary_path.is_file():
        raise DwmlError(f"{run_dir}: not a finished dwml run (no final/summary.json)")
    summary = read_json(summary_path, "run summary")
    n = len(summary.get("peers", []))
    if not 0 <= peer < n:
        raise DwmlError(f"--peer: {run_dir} has peers 0..{n - 1}, got {peer}")
    return summary


def write_peer(run_dir: Path, peer: int, summary: dict, folder: Path) -> None:
    """The checked peer's Hugging Face folder (weights, tokenizer, model card) into `folder`."""
    from ..evaluation.evaluate import load_masked_lm

    src = run_dir / "final" / f"peer{peer}"
    check_model_tokenizer(src)
    # The tokenizer must be the one the run was trained with (its hash is in the summary since dwml records it).
    check_same_tokenizer(src, exported_tokenizer_sha(summary), f"the one {run_dir} was trained with")
    model, _ = load_masked_lm(src)
    check_finite_weights(model, str(src))
    model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(src, folder)  # the tokenizer files in the format transformers 4.x and 5.x both load
    write_text(folder / "README.md", model_card(summary, peer, find_scores(run_dir, peer), run_dir))


UPLOAD_SCRIPT = """\
# Upload this export to the Hugging Face Hub: the final model as `main`, every milestone as its own branch
# (chck_1M ... - the revisions BabyLM's evaluation pipeline loops over). Usage: python upload.py USER/MODEL
# (needs `pip install huggingface_hub` and `huggingface-cli login`; dwml itself never uploads anything).
import sys
from pathlib import Path

from huggingface_hub import HfApi

HERE = Path(__file__).resolve().parent
REVISIONS = {revisions!r}
repo = sys.argv[1] if len(sys.argv) > 1 else {repo!r}
api = HfApi()
api.create_repo(repo, exist_ok=True)
api.upload_folder(repo_id=repo, folder_path=HERE / "final", commit_message="final model")
for rev in REVISIONS:
    api.create_branch(repo, branch=rev, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=HERE / rev, revision=rev, commit_message=rev)
"""


def export_checkpoints(run_dir: str | Path, peer: int, out_dir: str | Path, repo: str,
                       overwrite: bool = False) -> list[str]:
    """OUT/final/ (`export_peer`), OUT/chck_<n>M/ for every milestone of the run (the peer's folder, with
    milestone.json: its step and exact words seen) and OUT/upload.py; returns the revision names in order."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    milestones = sorted((d for d in (run_dir / "chck").glob("chck_*M") if (d / "milestone.json").is_file()),
                        key=lambda d: int(d.name[5:-1])) if (run_dir / "chck").is_dir() else []
    if not milestones:
        raise DwmlError(f"{run_dir}: no milestone checkpoints (RUN/chck/chck_*M/): train with train.babylm_track "
                        f"set to write them")
    summary = read_summary(run_dir, peer)
    check_output_dir(out_dir, "export", inputs=[run_dir], overwrite=overwrite, allowed_inside=[run_dir / "export"])
    with atomic_dir(out_dir, command="export") as tmp:
        write_peer(run_dir, peer, summary, tmp / "final")
        for d in milestones:
            record = read_json(d / "milestone.json", "milestone record")
            src = d if record.get("students", 1) == 1 else d / f"peer{peer}"
            if not (src / "config.json").is_file():
                raise DwmlError(f"{src}: milestone folder of peer {peer} missing")
            shutil.copytree(src, tmp / d.name, ignore=shutil.ignore_patterns("peer*"))
            write_text(tmp / d.name / "milestone.json", json.dumps({**record, "peer": peer}, indent=2) + "\n")
        names = [d.name for d in milestones]
        write_text(tmp / "upload.py", UPLOAD_SCRIPT.format(revisions=names, repo=repo))
    return names


def register(sub) -> None:
    p = sub.add_parser("export", help="write one peer of a run as a self-contained Hugging Face model folder")
    p.add_argument("run", help="run directory (with final/summary.json)")
    p.add_argument("--peer", type=int, default=0, help="peer index (default 0)")
    p.add_argument("--out", help="output folder (default RUN/export/peerI); must be new, empty or an earlier export")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is an existing folder that dwml export did not write")
    p.add_argument("--checkpoints", action="store_true",
                   help="also gather the BabyLM milestone checkpoints (RUN/chck/chck_1M ...) and write upload.py, "
                        "which pushes each as its Hub branch (default --out RUN/export/babylm-peerI)")
    p.add_argument("--repo", default="USER/MODEL", help="with --checkpoints: the Hub repository named in upload.py")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    if args.checkpoints:
        out = Path(args.out) if args.out else Path(args.run) / "export" / f"babylm-peer{args.peer}"
        names = export_checkpoints(args.run, args.peer, out, args.repo, overwrite=args.overwrite)
        print(f"exported peer {args.peer} of {args.run} -> {out}/final and {len(names)} milestones "
              f"({names[0]} ... {names[-1]})")
        print(f"upload (not run here): python {out / 'upload.py'} {args.repo}")
        print("  = huggingface_hub: create_repo, upload_folder(final) to main, then for each milestone "
              "create_branch(chck_...) + upload_folder(revision=chck_...)")
        return 0
    out = Path(args.out) if args.out else Path(args.run) / "export" / f"peer{args.peer}"
    export_peer(args.run, args.peer, out, overwrite=args.overwrite)
    print(f"exported peer {args.peer} of {args.run} -> {out}")
    return 0
