"""``freeze=head_only``: a linear probe; only the new head trains, BatchNorm keeps ImageNet statistics."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.strategies.base import FreezeStrategy, register


@register("head_only")
@dataclass
class HeadOnly(FreezeStrategy):
    name: str = "head_only"

    def stage_start(self, index: int, num_stages: int) -> int | None:
        return None
