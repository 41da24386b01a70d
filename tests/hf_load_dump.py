"""Run by tests/test_transformers4.py under two transformers versions (this interpreter's and a 4.51.3 venv's):
load folders the way BabyLM's pipeline does and print what came out, as JSON on stdout.

stdin: {"texts": [...], "tokenizers": [folder, ...], "models": [folder, ...], "logit_texts": [...]}
stdout: {"transformers": version,
         "tokenizers": {folder: {"AutoTokenizer": {"class", "normalizer", "specials", "digests"},
                                 "AutoProcessor": {...}}},
         "models": {folder: {"class", "shape", "logits" (float32 bytes, base64), "mask"}}}
Texts travel through pipes only: EWoK's texts come from a password zip and must not be written to disk. The ids of
~170,000 texts x 10 loads would be ~100 MB of JSON, so each text's ids travel as an 8-byte digest (`ids_digests`,
which the test applies to the tokenizers library's ids too).
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys

import torch
import transformers
from transformers import AutoModelForMaskedLM, AutoProcessor, AutoTokenizer


def ids_digests(ids: list[list[int]]) -> str:
    """base64 of the concatenated 8-byte blake2b digests of each text's ids."""
    return base64.b64encode(b"".join(
        hashlib.blake2b(",".join(map(str, x)).encode("ascii"), digest_size=8).digest() for x in ids)).decode("ascii")


def tokenizer_report(loader, folder: str, texts: list[str]) -> dict:
    tok = loader.from_pretrained(folder)
    return {
        "class": type(tok).__name__,
        "normalizer": json.loads(tok.backend_tokenizer.to_str()).get("normalizer"),
        "specials": [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id],
        "digests": ids_digests(tok(texts)["input_ids"]),
    }


def model_report(folder: str, texts: list[str]) -> dict:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return {
        "class": type(model).__name__,
        "shape": list(logits.shape),
        "logits": base64.b64encode(logits.numpy().tobytes()).decode("ascii"),
        "mask": batch["attention_mask"].tolist(),
    }


def main() -> None:
    job = json.load(sys.stdin)
    out = {
        "transformers": transformers.__version__,
        "tokenizers": {
            f: {loader.__name__: tokenizer_report(loader, f, job["texts"]) for loader in (AutoTokenizer, AutoProcessor)}
            for f in job["tokenizers"]
        },
        "models": {f: model_report(f, job["logit_texts"]) for f in job["models"]},
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
