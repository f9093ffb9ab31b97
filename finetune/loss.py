"""The training loss: cross-entropy on the labels, or on Mixup/CutMix's soft targets.

:func:`build_criterion` is the hard-label cross-entropy (class weights, label smoothing) that
validation and test always report, and that training minimizes when nothing mixes.
:class:`TrainingLoss` adds the mixing (``augment.mixup``, ``augment.cutmix``): timm's ``Mixup``
mixes each training batch on its device and returns soft targets with the label smoothing folded
in, and the loss becomes timm's ``SoftTargetCrossEntropy`` (per-class weighted when class weights
are set, see :func:`soft_target_cross_entropy`).

timm's ``Mixup`` pairs element ``i`` with element ``B-1-i`` and asserts an even batch; an odd
batch (the last of an epoch without ``drop_last``) mixes all but its last image, which keeps its
own (smoothed) label.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.augment import mixing_options
from finetune.errors import FineTuneError
from finetune.module_args import class_weight_tensor

__all__ = ["TrainingLoss", "build_criterion", "soft_target_cross_entropy"]


def build_criterion(num_classes: int, label_smoothing: float, class_weights: Sequence[float] | None) -> nn.CrossEntropyLoss:
    """Cross-entropy on hard labels (PyTorch's, with its ``weight`` and ``label_smoothing``)."""
    return nn.CrossEntropyLoss(weight=class_weight_tensor(class_weights, num_classes), label_smoothing=label_smoothing)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """timm's ``SoftTargetCrossEntropy``; with ``weight``, each class's term weighted by it.

    The weighted mean divides by the batch's total target weight ``sum_i sum_c w_c t_ic``, so on
    one-hot targets it equals ``nn.CrossEntropyLoss(weight=w)`` on the labels (which divides by
    ``sum_i w_{y_i}``).
    """
    if weight is None:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()(logits, target)
    weighted = target * weight
    return torch.sum(-weighted * F.log_softmax(logits, dim=-1)) / weighted.sum()


class TrainingLoss:
    """What ``training_step`` minimizes, and the batch mixing that goes with it.

    A plain object, not an ``nn.Module``: it holds the module's ``criterion`` (whose class weights
    move with the module to its device) without registering it twice in the state dict.

    Args:
        criterion: the hard-label cross-entropy (:func:`build_criterion`).
        num_classes: classes of the soft targets.
        mixup: the mixing options (:data:`finetune.data.augment.MIXING_FIELDS`), or None: no mixing.
    """

    def __init__(self, criterion: nn.CrossEntropyLoss, num_classes: int, mixup: Mapping[str, Any] | None) -> None:
        self.criterion = criterion
        self.options = mixing_options(mixup)
        self.mixup = None
        if self.options is not None:
            from timm.data import Mixup

            o = self.options
            self.mixup = Mixup(
                mixup_alpha=o["mixup"], cutmix_alpha=o["cutmix"], cutmix_minmax=o["cutmix_minmax"],
                prob=o["mixup_prob"], switch_prob=o["mixup_switch_prob"], mode=o["mixup_mode"],
                label_smoothing=criterion.label_smoothing, num_classes=num_classes,
            )

    @property
    def mixing(self) -> bool:
        return self.mixup is not None

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch to train on and its targets: ``(x, y)`` unchanged without mixing, else mixed images
        and soft targets ``(B, num_classes)`` whose rows sum to 1."""
        if self.mixup is None:
            return x, y
        if x.ndim != 4:
            raise FineTuneError(f"Mixup/CutMix mix images (B, C, H, W), not inputs of shape {tuple(x.shape)}")
        even = len(x) - len(x) % 2
        if even == len(x):
            return self.mixup(x, y)
        # timm asserts an even batch: mix all but the last image, which keeps its own smoothed label.
        from timm.data.mixup import mixup_target

        last = mixup_target(y[even:], self.mixup.num_classes, 1.0, self.mixup.label_smoothing)
        if even == 0:
            return x, last
        mixed, target = self.mixup(x[:even], y[:even])
        return torch.cat([mixed, x[even:]]), torch.cat([target, last])

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            return self.criterion(logits, target)
        return soft_target_cross_entropy(logits, target, self.criterion.weight)

    @staticmethod
    def labels(target: torch.Tensor) -> torch.Tensor:
        """Hard labels for train/acc: the labels themselves, or a mixed target's dominant label (its argmax)."""
        return target if target.ndim == 1 else target.argmax(-1)
