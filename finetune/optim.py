"""Parameter groups and learning-rate schedules.

Groups: the head at ``lr``; each backbone stage at ``lr * backbone_lr_mult *
layer_decay ** (distance from the top stage)``; norms, biases, other 1-d tensors and what the
timm model itself names in ``no_weight_decay()`` (ViT's ``pos_embed``, ``cls_token``) without
weight decay. The optimizer is any ``torch.optim`` class (``optim.optimizer._target_``) given
these groups; the schedule is :func:`build_scheduler`, or any factory with its arguments. Every parameter is in the optimizer from the first step; a group
whose parameters are still frozen has a learning-rate multiplier of 0 until its unfreeze
epoch, then its own warmup and ``sched`` over the remaining steps (see
:mod:`finetune.freezing` for why). The multipliers are a pure function of the step,
so a resumed run recomputes them.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from finetune.errors import FineTuneError
from finetune.freezing import FreezePlan

__all__ = ["SCHEDULES", "build_scheduler", "lr_lambda", "model_no_weight_decay", "param_groups"]

SCHEDULES = ("cosine", "constant", "linear")


def model_no_weight_decay(model: nn.Module) -> set[str]:
    """Parameter names (fnmatch patterns) the timm model says must not be decayed (empty if it says none)."""
    own = getattr(model, "no_weight_decay", None)
    return set(own()) if callable(own) else set()


def _no_decay(name: str, p: nn.Parameter, skip: Iterable[str] = ()) -> bool:
    # Norm weights, biases and other 1-d tensors: decaying them toward zero hurts (timm's rule);
    # position embeddings and class tokens are what the model's no_weight_decay() adds.
    return p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatchcase(name, s) for s in skip)


def param_groups(
    backbone: nn.Module,
    head: nn.Module,
    plan: FreezePlan,
    lr: float,
    backbone_lr_mult: float,
    weight_decay: float,
    layer_decay: float | None = None,
    backbone_weight_decay: float | None = None,
) -> list[dict]:
    """Optimizer groups, each with ``name``, ``lr``, ``weight_decay`` and ``start_epoch`` (None: never trains).

    ``backbone_weight_decay`` replaces ``weight_decay`` for the backbone (0 under L2-SP, :mod:`finetune.l2sp`).
    """
    groups: dict[tuple, dict] = {}

    def add(key: tuple, name: str, p: nn.Parameter, lr_: float, wd: float, start: int | None) -> None:
        g = groups.setdefault(key, {"name": name, "params": [], "lr": lr_, "weight_decay": wd, "start_epoch": start})
        g["params"].append(p)

    for n, p in head.named_parameters():
        nd = _no_decay(n, p)
        add(("head", nd), "head" + ("_no_decay" if nd else ""), p, lr, 0.0 if nd else weight_decay, 0)

    num = len(plan.stages)
    skip = model_no_weight_decay(backbone)
    backbone_wd = weight_decay if backbone_weight_decay is None else backbone_weight_decay
    stage_of = {name: s.index for s in plan.stages for name in s.param_names}
    for n, p in backbone.named_parameters():
        i = stage_of[n]
        scale = backbone_lr_mult * (layer_decay ** (num - 1 - i) if layer_decay else 1.0)
        nd = _no_decay(n, p, skip)
        start = plan.group_start_epoch(n)
        suffix = ("_no_decay" if nd else "") + (f"_from{start}" if start not in (0, None) else "")
        suffix += "_frozen" if start is None else ""
        key = ("stage", i, nd, start)
        add(key, f"stage{i}{suffix}", p, lr * scale, 0.0 if nd else backbone_wd, start)
    return list(groups.values())


def lr_lambda(sched: str, total_steps: int, warmup_steps: int, start_step: int | None = 0) -> Callable[[int], float]:
    """LR multiplier at a step: 0 before ``start_step``, then linear warmup, then ``sched`` to the end."""
    if sched not in SCHEDULES:
        raise FineTuneError(f"unknown optim.sched '{sched}'; choose one of {', '.join(SCHEDULES)}")
    if start_step is None:
        return lambda step: 0.0
    span = max(1, total_steps - start_step)
    warmup = min(max(0, warmup_steps), span - 1) if span > 1 else 0

    def f(step: int) -> float:
        s = step - start_step
        if s < 0:
            return 0.0
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if sched == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, span - warmup))
        if sched == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    sched: str = "cosine",
    warmup_epochs: float = 1.0,
) -> LambdaLR:
    """A per-step LambdaLR with one multiplier per group, each from its group's ``start_epoch``.

    Args:
        optimizer: its groups may carry ``start_epoch`` (None: never trains), as :func:`param_groups` makes them.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (unfreeze epochs become steps).
        sched: ``cosine``, ``linear`` or ``constant`` after the warmup (timm's ``--sched``).
        warmup_epochs: linear warmup of each group from its first step (fractions allowed; timm's ``--warmup-epochs``).
    """
    warmup = int(round(warmup_epochs * steps_per_epoch))
    lambdas = []
    for g in optimizer.param_groups:
        start = g.get("start_epoch", 0)
        lambdas.append(lr_lambda(sched, total_steps, warmup, None if start is None else start * steps_per_epoch))
    return LambdaLR(optimizer, lambdas)
