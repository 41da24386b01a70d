"""Peak memory of tokenizer training and encoding for one very long line: in pieces (dwml) vs whole, in one run.

    python benchmarks/bench_long_line_memory.py [--mb 6]

The line is real corpus text (the shared corpus's files joined with spaces, repeated to --mb megabytes). Each
variant runs in its own process (peak RSS = ru_maxrss of that process): tokenizer training (vocab 2000) on the
line, then encoding it. "whole" replaces `text_pieces` by the identity, which is how dwml behaved before it cut long
documents into pieces. Also checks that both give the same token ids.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def child(mb: float, whole: bool) -> None:
    import dwml.data.shards
    import dwml.data.tokenizer
    from dwml.data.shards import encode_documents
    from dwml.data.tokenizer import train_tokenizer

    text = ""
    files = sorted(CORPUS.rglob("*.test")) + sorted(CORPUS.rglob("*.train"))
    for f in files:
        text += " " + f.read_text(encoding="utf-8", errors="replace").replace("\n", " ")
        if len(text) >= mb * 1e6:
            break
    text = (text * int(1 + mb * 1e6 / len(text)))[: int(mb * 1e6)]
    if whole:  # the behaviour before: the whole line is one input of the tokenizers library
        dwml.data.tokenizer.text_pieces = dwml.data.shards.text_pieces = lambda t, max_chars=None: [t]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tok = train_tokenizer([text], vocab_size=2000)
    after_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids, _ = encode_documents(tok, [text])
    after_encode = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chars": len(text), "base_mb": base / 1024, "train_mb": after_train / 1024,
                      "encode_mb": after_encode / 1024, "tokens": int(ids.size),
                      "ids_sha": hashlib.sha256(ids.tobytes()).hexdigest()[:16]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=6.0, help="length of the line in millions of characters")
    ap.add_argument("--child", choices=("pieces", "whole"))
    args = ap.parse_args()
    if args.child:
        child(args.mb, args.child == "whole")
        return
    res = {}
    for variant in ("pieces", "whole"):
        out = subprocess.run([sys.executable, __file__, "--mb", str(args.mb), "--child", variant],
                             capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    p, w = res["pieces"], res["whole"]
    print(f"one line of {p['chars']:,} characters, {p['tokens']:,} tokens; peak RSS (MB, process baseline "
          f"{p['base_mb']:.0f})")
    print(f"{'':10}{'train':>10}{'encode':>10}")
    for name, r in res.items():
        print(f"{name:10}{r['train_mb']:>10.0f}{r['encode_mb']:>10.0f}")
    print(f"peak after encode: whole / pieces = {w['encode_mb'] / p['encode_mb']:.1f}x; "
          f"same ids: {p['ids_sha'] == w['ids_sha']}")


if __name__ == "__main__":
    main()
