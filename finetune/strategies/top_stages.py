"""``freeze=top_stages``: the last ``n`` backbone stages train, plus the head."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import FineTuneError
from finetune.strategies.base import FreezeStrategy, register


@register("top_stages")
@dataclass
class TopStages(FreezeStrategy):
    """Attributes:
    n: stages that train, counted from the top (``python -m finetune.stages`` shows what each n trains).
    """

    name: str = "top_stages"
    n: int = 2

    def validate(self) -> None:
        if self.n < 0:
            raise FineTuneError(f"freeze.n must be >= 0, got {self.n}")

    def stage_start(self, index: int, num_stages: int) -> int | None:
        return 0 if num_stages - 1 - index < self.n else None
