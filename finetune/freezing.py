"""Which parameters train, and BatchNorm that stays frozen while the rest trains.

A frozen BatchNorm layer must not update its running statistics. Setting it to
eval mode once is not enough, because Lightning calls ``model.train()`` at the
start of every epoch (Lightning #2551); :class:`finetune.FineTuneModule` re-applies
:func:`set_frozen_norms_eval` from its ``train()`` override.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from finetune.errors import FineTuneError

__all__ = ["FREEZE_STRATEGIES", "FreezeSpec", "apply_freeze", "frozen_norms", "set_frozen_norms_eval"]

FREEZE_STRATEGIES = ("none", "head_only")

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class FreezeSpec:
    """How much of the backbone trains.

    Attributes:
        name: ``none`` (everything trains) or ``head_only`` (linear probe).
        train_bn: let the affine parameters of frozen BatchNorm layers train
            (their running statistics stay frozen either way).
    """

    name: str = "none"
    train_bn: bool = False

    @classmethod
    def parse(cls, spec: "str | FreezeSpec | Mapping[str, Any]") -> "FreezeSpec":
        """Accept a strategy name, a spec, or a config mapping with ``name``."""
        if isinstance(spec, FreezeSpec):
            out = spec
        elif isinstance(spec, str):
            out = cls(name=spec)
        else:
            known = {"name", "train_bn"}
            extra = set(spec) - known
            if extra:
                raise FineTuneError(f"unknown freeze option(s) {sorted(extra)}; known: {sorted(known)}")
            out = cls(**dict(spec))
        if out.name not in FREEZE_STRATEGIES:
            raise FineTuneError(f"unknown freeze strategy '{out.name}'; choose one of {', '.join(FREEZE_STRATEGIES)}")
        return out


def apply_freeze(backbone: nn.Module, head: nn.Module, spec: FreezeSpec) -> None:
    """Set ``requires_grad`` on every parameter of ``backbone`` and ``head``."""
    for p in head.parameters():
        p.requires_grad_(True)
    train_backbone = spec.name == "none"
    for p in backbone.parameters():
        p.requires_grad_(train_backbone)
    if spec.train_bn and not train_backbone:
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)


def frozen_norms(backbone: nn.Module, spec: FreezeSpec) -> list[nn.Module]:
    """BatchNorm layers whose running statistics must stay as pretrained."""
    if spec.name == "none":
        return []
    return [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_frozen_norms_eval(norms: list[nn.Module]) -> None:
    """Put frozen BatchNorm layers back in eval mode (normalize with running stats)."""
    for m in norms:
        m.eval()
