"""Errors that are the user's to fix.

A `UserError` is printed as its message alone (no traceback) and makes the CLI exit with code 2.
Anything else that escapes is a bug in lmforge and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, data or environment, with a message that says how to fix it."""


class ConfigError(UserError):
    """One or more problems in a config; `problems` holds one line each."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        from lmforge.secrets import redact_text

        problems = [redact_text(p) for p in problems]  # a key typed where a name belongs is not echoed
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"config{where}: {count}\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(UserError):
    """Input data that cannot be read as configured; the message names file and line."""


class RecordError(DataError):
    """One record that does not fit its format (data.on_invalid=error); the message names its file
    and line. Whether to suggest dropping such records depends on how many there are, which the
    caller finds out (lmforge.data.prepare)."""
