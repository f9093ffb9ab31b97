"""``freeze=lp_ft``: linear probe, then fine-tune everything (Kumar et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import FineTuneError
from finetune.strategies.base import FreezeStrategy, register


@register("lp_ft")
@dataclass
class LinearProbeThenFinetune(FreezeStrategy):
    """Attributes:
    unfreeze_at_epoch: head-only epochs before the backbone joins (with its own warmup).
    """

    name: str = "lp_ft"
    unfreeze_at_epoch: int = 2

    def validate(self) -> None:
        if self.unfreeze_at_epoch < 0:
            raise FineTuneError(f"freeze.unfreeze_at_epoch must be >= 0, got {self.unfreeze_at_epoch}")

    def stage_start(self, index: int, num_stages: int) -> int | None:
        return self.unfreeze_at_epoch

    @property
    def is_dynamic(self) -> bool:
        return True
