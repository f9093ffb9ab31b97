"""``freeze=norm``: only the affine parameters of normalization layers train, plus the head.

BatchNorm, LayerNorm, GroupNorm and timm's own norm layers (RmsNorm, EvoNorm, ...: not all
subclass torch's, so a class named ``*Norm*`` with parameters of its own counts too). A
BatchNorm layer whose parameters train also updates its running statistics, as in full
fine-tuning (see :mod:`finetune.freezing`). Combines with ``freeze.n`` and
``freeze.unfreeze_at_epoch`` (:mod:`finetune.strategies.subset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from finetune.strategies.base import register
from finetune.strategies.subset import ParamSubset

_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (torch's, or a timm class named ``*Norm*``)."""
    return isinstance(module, _TORCH_NORMS) or "Norm" in type(module).__name__


@register("norm")
@dataclass
class NormOnly(ParamSubset):
    name: str = "norm"
    kind: ClassVar[str] = "normalization parameters"

    def selected(self, backbone: nn.Module) -> set[str]:
        return {
            f"{mname}.{pname}" if mname else pname
            for mname, m in backbone.named_modules() if is_norm(m)
            for pname, _ in m.named_parameters(recurse=False)
        }
