"""User-facing errors.

Anything the user can fix (a wrong path, an unknown name, a broken file, a value of the
wrong type) raises :class:`FineTuneError`, or is one of Hydra's or OmegaConf's own errors.
Every command prints such an error as one line ``error: ...`` and exits with code 2
instead of showing a traceback (:func:`run_hydra`, :func:`run_command`).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

__all__ = ["FineTuneError", "error_line", "run_command", "run_hydra"]


class FineTuneError(Exception):
    """A problem with the user's input, explained in one line."""


# OmegaConf's names for the types of typed config fields, as a Python user writes them.
_TYPE_NAMES = {"Integer": "an int", "Float": "a float", "Boolean": "a bool", "String": "a string"}
_CONVERT = re.compile(r"Value '(.*?)' (?:of type '[^']*' )?could not be converted to (\w+)", re.S)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_line(e: BaseException) -> str:
    """The one line that explains ``e``: ours as it is, Hydra's and OmegaConf's without their boilerplate.

    ``freeze.n=two`` against an ``int`` field reads ``freeze.n: expected an int, got 'two'``.
    """
    from omegaconf.errors import OmegaConfBaseException

    ours: BaseException | None = e
    while ours is not None and not isinstance(ours, FineTuneError):  # ours, raised inside Hydra or a resolver
        ours = ours.__cause__ or ours.__context__
    if isinstance(ours, FineTuneError):
        return _one_line(str(ours)) or type(ours).__name__
    # Hydra wraps OmegaConf's error (which knows the key) in its own: use the innermost that says more.
    inner: BaseException | None = e
    while inner is not None and not isinstance(inner, OmegaConfBaseException):
        inner = inner.__cause__ or inner.__context__
    if isinstance(inner, OmegaConfBaseException):
        key = getattr(inner, "full_key", None)
        msg = str(getattr(inner, "msg", "") or inner).strip().splitlines()[0]
        m = _CONVERT.match(msg)
        if m:
            msg = f"expected {_TYPE_NAMES.get(m.group(2), m.group(2))}, got '{m.group(1)}'"
        elif "Invalid value" in msg and "expected one of" in msg:  # an Enum field
            msg = msg.replace("Invalid value ", "got ")
        return _one_line(f"{key}: {msg}" if key and not msg.startswith(str(key)) else msg)
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip() and not ln.startswith("Set the environment")]
    return _one_line(lines[0] if len(lines) == 1 else "; ".join(lines[:2])) or type(e).__name__


def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return FineTuneError, HydraException, OmegaConfBaseException


def run_hydra(app: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function; bad input (ours, Hydra's, OmegaConf's) is one ``error:`` line, exit 2.

    Hydra prints its own errors over several lines and exits 1 unless ``HYDRA_FULL_ERROR`` is set,
    in which case it re-raises them: set it, and turn them into one line here.
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return app()
    except _user_error_types() as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)


def run_command(command: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a ``python -m finetune.NAME key=value ...`` command: bad input is one ``error:`` line and exit 2."""
    from finetune.argv import expand_home

    try:
        return command(expand_home(sys.argv[1:] if argv is None else argv))
    except _user_error_types() as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
