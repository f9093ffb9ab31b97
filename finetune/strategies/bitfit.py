"""``freeze=bitfit``: only the backbone's bias terms train, plus the head (BitFit, Ben Zaken et al. 2022).

Every parameter named ``*.bias`` counts, normalization biases included (as in the paper).
BatchNorm layers whose weight stays frozen keep their running statistics (see
:mod:`finetune.freezing`). Combines with ``freeze.n`` and ``freeze.unfreeze_at_epoch``
(:mod:`finetune.strategies.subset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from finetune.strategies.base import register
from finetune.strategies.subset import ParamSubset


@register("bitfit")
@dataclass
class BitFit(ParamSubset):
    name: str = "bitfit"
    kind: ClassVar[str] = "biases"

    def selected(self, backbone: nn.Module) -> set[str]:
        return {name for name, _ in backbone.named_parameters() if name.endswith(".bias")}
