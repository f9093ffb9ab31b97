"""``freeze=bottom_stages``: the first ``n`` stages (stem = stage 0) train, plus the head.

Surgical fine-tuning for input-level shift (Lee et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from finetune.errors import FineTuneError
from finetune.strategies.base import FreezeStrategy, register


@register("bottom_stages")
@dataclass
class BottomStages(FreezeStrategy):
    name: str = "bottom_stages"
    compared: ClassVar[bool] = False  # surgical fine-tuning for input-level shift: a deliberate choice, not a standard to compare
    n: int = 2

    def validate(self) -> None:
        if self.n < 0:
            raise FineTuneError(f"freeze.n must be >= 0, got {self.n}")

    def stage_start(self, index: int, num_stages: int) -> int | None:
        return 0 if index < self.n else None
