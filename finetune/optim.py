"""Parameter groups and learning-rate schedules.

Every parameter is in the optimizer from the first step, frozen or not: AdamW
skips parameters without gradients, so frozen ones cost nothing, and a strategy
that unfreezes later never adds a group the scheduler or a resumed checkpoint
does not know (Lightning #8720, #6891; PyTorch #79888).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from finetune.errors import FineTuneError

__all__ = ["SCHEDULES", "lr_lambda", "param_groups"]

SCHEDULES = ("cosine", "constant", "linear")


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Norm weights, biases and other 1-d tensors: decaying them toward zero hurts (timm's rule).
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(
    backbone: nn.Module,
    head: nn.Module,
    lr: float,
    backbone_lr_mult: float,
    weight_decay: float,
) -> list[dict]:
    """Head at ``lr``, backbone at ``lr * backbone_lr_mult``; no weight decay on norms and biases."""
    groups: list[dict] = []
    for part, module, part_lr in (("head", head, lr), ("backbone", backbone, lr * backbone_lr_mult)):
        decay, no_decay = [], []
        for n, p in module.named_parameters():
            (no_decay if _no_decay(n, p) else decay).append(p)
        for suffix, params, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": part + suffix, "params": params, "lr": part_lr, "weight_decay": wd})
    return groups


def lr_lambda(sched: str, total_steps: int, warmup_steps: int):
    """Multiplier of each group's base LR at a step: linear warmup, then ``sched``."""
    if sched not in SCHEDULES:
        raise FineTuneError(f"unknown optim.sched '{sched}'; choose one of {', '.join(SCHEDULES)}")
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if sched == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if sched == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, sched: str, total_steps: int, warmup_steps: int) -> LambdaLR:
    """A per-step LambdaLR: one multiplier for every group, so relative LRs are kept."""
    return LambdaLR(optimizer, lr_lambda(sched, total_steps, warmup_steps))
