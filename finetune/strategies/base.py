"""The freeze-strategy registry and the base class every strategy extends.

A strategy says, for each backbone parameter, the epoch from which it trains (``None``:
never); the new head always trains from epoch 0. Most strategies decide per stage (timm's
``group_matcher`` stages, :mod:`finetune.stage_groups`) and only implement
:meth:`FreezeStrategy.stage_start`. A strategy is a dataclass: its fields are its knobs
and their defaults, and the class is stored in Hydra's ConfigStore as option ``freeze=NAME``
(see :mod:`finetune.config`), so the same values serve the CLI and the Python API.

Adding one is one file::

    @register("my_strategy")
    @dataclass
    class MyStrategy(FreezeStrategy):
        name: str = "my_strategy"
        k: int = 1

        def stage_start(self, index, num_stages):
            return 0 if index >= k else None

Nothing here imports a strategy module; ``finetune.strategies`` imports them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from torch import nn

from finetune.errors import FineTuneError
from finetune.registry import registrar
from finetune.stage_groups import Stage

__all__ = ["STRATEGIES", "FreezeStrategy", "compared_strategies", "get_strategy", "register"]


@dataclass
class FreezeStrategy:
    """How much of the backbone trains, and from which epoch.

    Attributes:
        name: the registered name (``freeze=NAME``).
        train_bn: let the affine parameters of frozen BatchNorm layers train (their running
            statistics stay frozen either way).
    """

    name: str = ""
    train_bn: bool = False
    # Whether +recipe=compare sweeps it with its defaults (not a config field: ClassVar).
    compared: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`FineTuneError` for values that make no sense (called on construction)."""

    def adapt(self, backbone: nn.Module) -> nn.Module:
        """The backbone this strategy trains: itself by default; ``lora`` adds adapters in place.

        Called on every construction, before the plan and the checkpoint's weights: a checkpoint
        of an adapted backbone loads into the same adapted shape.
        """
        return backbone

    def stage_start(self, index: int, num_stages: int) -> int | None:
        """Epoch from which stage ``index`` (0 = stem, ``num_stages - 1`` = top) trains; None: never."""
        raise NotImplementedError

    def param_starts(self, backbone: nn.Module, stages: Sequence[Stage]) -> dict[str, int | None]:
        """Backbone parameter name -> first epoch it trains (None: never). Per stage by default."""
        return {name: self.stage_start(s.index, len(stages)) for s in stages for name in s.param_names}

    @property
    def is_dynamic(self) -> bool:
        """Whether the trainable set changes during training (an unfreezing schedule)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """The name with the knobs that differ from the base class, e.g. ``top_stages n=2``."""
        own = [f for f in dataclasses.fields(self) if f.name not in ("name", "train_bn")]
        return " ".join([self.name, *(f"{f.name}={getattr(self, f.name)}" for f in own)])


STRATEGIES: dict[str, type[FreezeStrategy]] = {}

# Class decorator: make a FreezeStrategy subclass available as freeze=NAME.
register = registrar(STRATEGIES, "name")


def get_strategy(spec: "str | FreezeStrategy | Mapping[str, Any]") -> FreezeStrategy:
    """A strategy from its name, itself, or a config mapping with ``name`` and its knobs."""
    if isinstance(spec, FreezeStrategy):
        return spec
    values = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = values.get("name")
    if name not in STRATEGIES:
        raise FineTuneError(f"unknown freeze strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(values) - known)
    if extra:
        raise FineTuneError(f"freeze={name} has no option(s) {extra}; it takes {sorted(known - {'name'})}")
    return cls(**values)


def compared_strategies() -> str:
    """The strategies ``+recipe=compare`` sweeps, as a Hydra sweep value (``none,head_only,...``)."""
    return ",".join(name for name, cls in STRATEGIES.items() if cls.compared)
