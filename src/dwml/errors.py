"""User-facing errors.

Anything the user can fix (a missing file, a bad config value, a corrupt checkpoint) raises `DwmlError` with a
one-line message that names the file or field and what was expected. The CLI prints it as `dwml: error: ...` and
exits with status 2; programming errors keep their traceback.
"""
from __future__ import annotations


class DwmlError(Exception):
    """A one-line, user-fixable error (bad input, bad config, missing file)."""

    exit_code = 2


def require(cond: bool, message: str) -> None:
    """Raise `DwmlError(message)` unless `cond` holds."""
    if not cond:
        raise DwmlError(message)
