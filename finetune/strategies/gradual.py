"""``freeze=gradual``: start head-only; unfreeze one more stage from the top every ``every_n_epochs`` (ULMFiT)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import FineTuneError
from finetune.strategies.base import FreezeStrategy, register


@register("gradual")
@dataclass
class Gradual(FreezeStrategy):
    name: str = "gradual"
    every_n_epochs: int = 1

    def validate(self) -> None:
        if self.every_n_epochs < 1:
            raise FineTuneError(f"freeze.every_n_epochs must be >= 1, got {self.every_n_epochs}")

    def stage_start(self, index: int, num_stages: int) -> int | None:
        return (num_stages - index) * self.every_n_epochs

    @property
    def is_dynamic(self) -> bool:
        return True
