"""The base of the strategies that train one *kind* of backbone parameter (``bitfit``, ``norm``, ``lora``).

They combine with the two stage schedules that make sense for a kind of parameter:

* ``freeze.n=N``: only in the top ``N`` stages (as ``top_stages``; null: every stage);
* ``freeze.unfreeze_at_epoch=K``: head only for ``K`` epochs, then the kind joins (as ``lp_ft``).

``gradual`` (one more stage per epoch) is not offered: its knob ``every_n_epochs`` is refused
by these strategies in one line, like any option a strategy does not take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

from torch import nn

from finetune.errors import FineTuneError
from finetune.stage_groups import Stage
from finetune.strategies.base import FreezeStrategy

__all__ = ["ParamSubset"]


@dataclass
class ParamSubset(FreezeStrategy):
    """Attributes:
    n: the kind trains only in the top ``n`` stages (``python -m finetune.stages`` shows them); null: all.
    unfreeze_at_epoch: head-only epochs before the kind trains (0: from the start).
    """

    n: Optional[int] = None
    unfreeze_at_epoch: int = 0
    # What the kind is called in messages ("biases").
    kind: ClassVar[str] = "parameters"
    # Knobs every label shows, default or not.
    shown: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        if self.n is not None and self.n < 1:
            raise FineTuneError(f"freeze.n must be >= 1 or null (every stage), got {self.n}")
        if self.unfreeze_at_epoch < 0:
            raise FineTuneError(f"freeze.unfreeze_at_epoch must be >= 0, got {self.unfreeze_at_epoch}")

    def selected(self, backbone: nn.Module) -> set[str]:
        """Names of the backbone parameters of this kind (every stage)."""
        raise NotImplementedError

    def param_starts(self, backbone: nn.Module, stages: Sequence[Stage]) -> dict[str, int | None]:
        top = stages[-self.n:] if self.n else stages
        chosen = self.selected(backbone) & {name for s in top for name in s.param_names}
        if not chosen:
            where = f"the top {self.n} stage(s) of the backbone" if self.n else "the backbone"
            raise FineTuneError(f"freeze={self.name}: {where} has no {self.kind}")
        return {name: self.unfreeze_at_epoch if name in chosen else None for s in stages for name in s.param_names}

    @property
    def is_dynamic(self) -> bool:
        return self.unfreeze_at_epoch > 0

    def label(self) -> str:
        """The name with the knobs in :attr:`shown` and those that differ from their defaults (``lora r=8 n=1``)."""
        knobs = [f for f in dataclasses.fields(self) if f.name not in ("name", "train_bn")]
        own = [f for f in knobs if f.name in self.shown or getattr(self, f.name) != getattr(type(self), f.name, None)]
        return " ".join([self.name, *(f"{f.name}={getattr(self, f.name)}" for f in own)])
