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


def quiet_libraries() -> None:
    """transformers' own progress bars ("Loading weights", "Writing model shards") and load reports are not dwml's
    output: a command prints its results and, on error, exactly one `dwml: error:` line. Set before transformers is
    imported (the environment) and, where it already is (tests, notebooks), through its logging API; a user who sets
    TRANSFORMERS_VERBOSITY (e.g. to debug a load) keeps it. dwml's own tqdm bars are not affected."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
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
