"""User-facing errors.

Anything the user can fix (a wrong path, an unknown name, a broken file) raises
:class:`FineTuneError`. The command line prints its message as one line and exits
non-zero instead of showing a traceback.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["FineTuneError", "run_command"]


class FineTuneError(Exception):
    """A problem with the user's input, explained in one line."""


def run_command(command: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a ``python -m finetune.NAME key=value ...`` command: bad input is one ``error:`` line and exit 2."""
    import sys

    try:
        return command(sys.argv[1:] if argv is None else argv)
    except FineTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
