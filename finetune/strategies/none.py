"""``freeze=none``: everything trains."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.strategies.base import FreezeStrategy, register


@register("none")
@dataclass
class NoFreeze(FreezeStrategy):
    name: str = "none"

    def stage_start(self, index: int, num_stages: int) -> int | None:
        return 0
