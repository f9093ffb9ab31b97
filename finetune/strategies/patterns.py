"""``freeze=patterns``: full control by backbone parameter names (fnmatch patterns)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar, List, Sequence

from torch import nn

from finetune.errors import FineTuneError
from finetune.stage_groups import Stage
from finetune.strategies.base import FreezeStrategy, register


@register("patterns")
@dataclass
class Patterns(FreezeStrategy):
    """Attributes:
    trainable: patterns of backbone parameters that train, e.g. ``["blocks.6.*", "conv_head.*"]``;
        empty: every parameter not matched by ``frozen``.
    frozen: patterns of backbone parameters that stay frozen, e.g. ``["conv_stem.*", "blocks.0.*"]``.
    """

    name: str = "patterns"
    compared: ClassVar[bool] = False  # needs patterns of the user's own: nothing to sweep with its defaults
    trainable: List[str] = field(default_factory=list)
    frozen: List[str] = field(default_factory=list)

    def validate(self) -> None:
        self.trainable, self.frozen = list(self.trainable or ()), list(self.frozen or ())
        if not (self.trainable or self.frozen):
            raise FineTuneError("freeze=patterns needs freeze.trainable and/or freeze.frozen patterns")

    def param_starts(self, backbone: nn.Module, stages: Sequence[Stage]) -> dict[str, int | None]:
        start: dict[str, int | None] = {}
        for name, _ in backbone.named_parameters():
            on = not self.trainable or any(fnmatch.fnmatchcase(name, p) for p in self.trainable)
            off = any(fnmatch.fnmatchcase(name, p) for p in self.frozen)
            start[name] = 0 if on and not off else None
        if self.trainable and not any(v == 0 for v in start.values()):
            raise FineTuneError(f"freeze.trainable patterns {self.trainable} match no backbone parameter")
        return start
