"""``optim.l2sp=ALPHA``: pull the backbone toward its pretrained weights instead of toward zero (L2-SP).

Li, Grandvalet and Davoine (2018), "Explicit inductive bias for transfer learning": the penalty
``alpha / 2 * sum ||w - w0||^2`` over the backbone's parameters, ``w0`` their values at the
start of fine-tuning. Plain weight decay on the backbone would pull the same weights toward
zero, against the prior the pretrained point is, so :func:`finetune.optim.param_groups` turns it
off for the backbone when ``alpha > 0``; the new head has no pretrained point and keeps its
weight decay (the paper's ``beta`` term).

``w0`` is a copy of the backbone's parameters that will ever train, taken when the module is
built (pretrained weights loaded, before any checkpoint is restored into it, so a resumed run
pulls toward the same point). The copies are non-persistent buffers: they follow the module
to its device and stay out of checkpoints.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn

from finetune.errors import FineTuneError
from finetune.freezing import FreezePlan

__all__ = ["L2SP", "check_alpha"]


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or a one-line error if it is negative or not finite."""
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise FineTuneError(f"optim.l2sp must be a finite number >= 0 (0: off), got {alpha}")
    return alpha


class L2SP(nn.Module):
    """The L2-SP penalty of one backbone; with ``alpha == 0`` it holds nothing and adds nothing.

    Args:
        backbone: the backbone, at its starting point.
        plan: its freeze plan: only parameters that ever train are copied (the others never move).
        alpha: the penalty's weight (Li et al.'s ``alpha``); 0: off.
        start_known: False when the backbone holds no pretrained weights yet (a module being
            rebuilt by ``load_from_checkpoint``): then training with ``alpha > 0`` is refused.
    """

    def __init__(self, backbone: nn.Module, plan: FreezePlan, alpha: float, start_known: bool = True) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.start_known = start_known
        self.names = [n for n, _ in backbone.named_parameters() if plan.group_start_epoch(n) is not None]
        if self.alpha and start_known:
            for i, n in enumerate(self.names):
                self.register_buffer(f"w0_{i}", backbone.get_parameter(n).detach().clone(), persistent=False)

    def forward(self, backbone: nn.Module) -> torch.Tensor:
        """``alpha / 2 * sum ||w - w0||^2`` over the parameters that train now (0 when off)."""
        if not self.alpha:
            return torch.zeros(())
        if not self.start_known:
            raise FineTuneError(
                "optim.l2sp: this module was rebuilt from a checkpoint, so its pretrained starting point is "
                "unknown; continue the run with resume=RUN_DIR instead"
            )
        terms = [
            (p - getattr(self, f"w0_{i}")).pow(2).sum()
            for i, p in enumerate(backbone.get_parameter(n) for n in self.names)
            if p.requires_grad
        ]
        if not terms:  # nothing trains yet (a linear-probe epoch): no pull, no graph
            return torch.zeros((), device=next(backbone.parameters()).device)
        return 0.5 * self.alpha * torch.stack(terms).sum()

    def add_to(self, loss: torch.Tensor, module: pl.LightningModule, batch_size: int) -> torch.Tensor:
        """``loss`` plus the penalty of ``module.backbone``, which is logged as ``train/l2sp`` when on."""
        if not self.alpha:
            return loss
        penalty = self(module.backbone)
        module.log("train/l2sp", penalty, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss + penalty
