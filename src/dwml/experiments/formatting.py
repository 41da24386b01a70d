"""Markdown cells and tables for the experiment report: numbers, parameter counts, FLOPs, config values."""
from __future__ import annotations

import math
from typing import Any, Sequence


# Column labels of the zero-shot tasks.
TASK_LABELS = {
    "blimp_filtered": "BLiMP", "blimp_fast": "BLiMP (fast)", "blimp_original": "BLiMP (orig.)",
    "blimp_supplement": "Supplement", "supplement_fast": "Suppl. (fast)",
    "ewok": "EWoK", "ewok_fast": "EWoK (fast)", "entity_tracking": "Entity tracking",
    "wug_adj": "WUG adj (ρ×100)", "wug_past": "WUG past (ρ×100)",
    "reading_eye_tracking": "Reading ET (ΔR² %)", "reading_self_paced": "Reading SPR (ΔR² %)",
}


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v: Any, spec: str = ".1f", none: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def fmt_flops(f: float | None) -> str:
    return "–" if f is None else f"{f:.2e}"


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
