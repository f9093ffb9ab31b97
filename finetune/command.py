"""What the one-command Hydra entries (``finetune.predict``, ``finetune.evaluate``) share.

Each command is a ``@hydra.main`` app whose primary config is a dataclass deriving from
:class:`CommandConfig`, stored in Hydra's ConfigStore: Hydra parses and type-checks the
arguments (``batch_size=two`` is ``error: batch_size: expected an int, got 'two'``), and
writes nothing into the working directory (no ``outputs/``, ``.hydra/`` or ``*.log``).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, List, Sequence, TypeVar

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from finetune.argv import expand_home, hydra_quote
from finetune.errors import FineTuneError, run_hydra
from finetune.help import app_help, asked_for_help, hydra_template, register_help

register_help()  # the ${finetune_help:NAME} resolver of the commands' --help (hydra.help.template)

__all__ = ["CommandConfig", "check_positive", "command_hydra", "hold_errors", "literal", "run_app"]

T = TypeVar("T")

# A task's user error, held until Hydra has returned (see hold_errors).
_held: list[BaseException] = []


def _quiet_defaults() -> list[Any]:
    return ["_self_", {"override hydra/job_logging": "none"}, {"override hydra/hydra_logging": "none"}]


def _quiet_hydra() -> dict[str, Any]:
    # The run dir is the cwd (Hydra creates it: it exists), and without output_subdir no .hydra/ goes there.
    return {"run": {"dir": "."}, "output_subdir": None}


def command_hydra(name: str) -> dict[str, Any]:
    """A command's ``hydra`` node: quiet (see CommandConfig), and ``--help`` is ``finetune.help``'s text of ``name``."""
    return {**_quiet_hydra(), "help": {"template": hydra_template(name)}}


@dataclass
class CommandConfig:
    """A command's config: Hydra logs nothing to files and writes no outputs of its own."""

    defaults: List[Any] = field(default_factory=_quiet_defaults)
    hydra: Any = field(default_factory=_quiet_hydra)


def literal(arg: str, keys: Sequence[str]) -> str:
    """``key=value`` with ``value`` quoted for Hydra where ``key`` is one of ``keys`` (paths).

    Hydra's grammar reads ``images=a.png,b.png`` as a sweep, and ``ckpt=.../epoch=3-step=9.ckpt``
    as a syntax error; a path is taken as typed. Values the user quoted already are left alone.
    """
    key, sep, value = arg.partition("=")
    if not sep or key not in keys or (len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
        return arg
    return f"{key}={hydra_quote(value)}"


def check_positive(cfg: Any, *keys: str) -> None:
    """Raise unless each of ``cfg``'s ``keys`` is unset or at least 1."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise FineTuneError(f"{key} must be at least 1, got {value}")


def hold_errors(task: Callable[[Any], T]) -> Callable[[Any], T | None]:
    """Wrap a Hydra task so that its user errors reach :func:`run_app` without Hydra's banner.

    Hydra writes ``Error executing job with overrides: [...]`` to stderr before re-raising a
    task's exception, a second line beside ours: the error is held here instead, and
    :func:`run_app` raises it once Hydra has returned.
    """

    @functools.wraps(task)
    def wrapper(cfg: Any) -> T | None:
        try:
            return task(cfg)
        except (FineTuneError, HydraException, OmegaConfBaseException) as e:
            _held.append(e)
            return None

    return wrapper


def run_app(
    app: Callable[[], Any], argv: Sequence[str] | None = None, literal_keys: Sequence[str] = (),
    help_command: str | None = None,
) -> None:
    """Run ``@hydra.main`` ``app`` on ``argv`` (default: the command line); bad input is one ``error:`` line, exit 2.

    ``app``'s task should be wrapped in :func:`hold_errors`. With ``help_command``, ``--help``/``-h``
    prints :func:`finetune.help.app_help` (the text Hydra's template would give) without starting
    Hydra: Hydra's help lists the config groups in seconds (see :func:`finetune.help.config_groups`).
    """
    if help_command and asked_for_help(argv):
        print(app_help(help_command))
        return
    args = sys.argv[1:] if argv is None else list(argv)

    def call() -> None:
        _held.clear()
        app()
        if _held:
            raise _held.pop()

    saved = sys.argv
    sys.argv = [saved[0] if saved else "finetune", *(literal(a, literal_keys) for a in expand_home(args))]
    try:
        run_hydra(call)
    finally:
        sys.argv = saved
