"""`dwml` console script: each subcommand is registered by its module and maps to a plain function."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import DwmlError

# Modules that contribute a subcommand through `register(subparsers)`, in help order.
SUBCOMMAND_MODULES = (
    "dwml.experiments.demo",
    "dwml.data.prepare",
    "dwml.models.search",
    "dwml.training.cli",
    "dwml.evaluation.evaluate",
    "dwml.evaluation.finetune",
    "dwml.experiments.export",
    "dwml.experiments.experiment",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwml",
        description="Teacher-less distillation (deep weighted mutual learning) for small masked LMs on BabyLM data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except DwmlError as e:
        print(f"dwml: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, read-only file system, permissions: the environment, not a bug
        from .checks import os_error_message

        message = os_error_message(e)
        if message is None:
            raise
        print(f"dwml: error: {message}", file=sys.stderr)
        return DwmlError.exit_code
    except KeyboardInterrupt:
        print("dwml: interrupted (the last checkpoint is kept; run the same command again to resume)", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
