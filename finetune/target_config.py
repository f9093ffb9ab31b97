"""Typed config classes read off a callable's signature, so its defaults live there only."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import field
from typing import Any, Callable, Sequence

from finetune.heads import HEADS
from finetune.optim import build_scheduler

__all__ = ["LinearHeadConfig", "MLPHeadConfig", "SchedulerConfig", "target_config"]

_SIMPLE = (int, float, bool, str)


def target_config(fn: Callable[..., Any], *, exclude: Sequence[str] = (), partial: bool = False) -> type:
    """A dataclass config for ``fn`` (``_target_`` plus its defaulted arguments), read off its signature.

    So a head's or a scheduler's defaults live in its own signature only, and are still typed
    config fields. Arguments without a default, or named in ``exclude``, are what the caller supplies.
    """
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"{fn.__module__}.{fn.__qualname__}"))]
    if partial:
        fields.append(("_partial_", bool, field(default=True)))
    for p in inspect.signature(fn).parameters.values():
        if p.name in exclude or p.default is inspect.Parameter.empty or p.kind is p.VAR_KEYWORD:
            continue
        hint = hints.get(p.name, Any)
        fields.append((p.name, hint if hint in _SIMPLE else Any, field(default=p.default)))
    return dataclasses.make_dataclass(f"{fn.__name__}_config", fields)


LinearHeadConfig = target_config(HEADS["linear"], exclude=("num_features", "num_classes"))
MLPHeadConfig = target_config(HEADS["mlp"], exclude=("num_features", "num_classes"))
SchedulerConfig = target_config(build_scheduler, exclude=("optimizer", "total_steps", "steps_per_epoch"), partial=True)
