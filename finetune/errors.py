"""User-facing errors.

Anything the user can fix (a wrong path, an unknown name, a broken file) raises
:class:`FineTuneError`. The command line prints its message as one line and exits
non-zero instead of showing a traceback.
"""

from __future__ import annotations

__all__ = ["FineTuneError"]


class FineTuneError(Exception):
    """A problem with the user's input, explained in one line."""
