"""Which parameters train at each epoch, and BatchNorm that stays frozen while the rest trains.

A strategy (:mod:`finetune.strategies`) gives every backbone parameter the epoch from which it
trains, or ``None`` for never; the new head always trains from epoch 0; :class:`FreezePlan` is
that applied to one backbone, and the :class:`finetune.callbacks.FreezeSchedule` callback applies
it at the start of every epoch. Stages come from the
model itself (:mod:`finetune.stage_groups`), so one strategy fits every timm family.

Design choices that avoid the peers' bugs:

* Every parameter is in the optimizer from the first step; a stage that is still frozen
  has ``requires_grad=False`` (no activations kept for backward, no gradients computed)
  and a learning rate of 0. Unfreezing changes neither the number of parameter groups nor
  the scheduler, so schedulers see every group and resume restores them
  (Lightning #8720, #12141, #6891, #8502; PyTorch #79888).
* Which parameters train is a pure function of the epoch, re-applied at the start of each
  epoch: a resumed run re-derives it instead of restoring fragile callback state.
* A frozen BatchNorm layer keeps its running statistics. Eval mode is not enough by
  itself, because Lightning calls ``model.train()`` every epoch (Lightning #2551), so
  :class:`finetune.FineTuneModule` re-applies it from its ``train()`` override.
* Under DDP, gradient sync needs the same trainable set on every rank at every step
  (Lightning #20340): there, parameters that will ever train keep ``requires_grad=True``
  from the start and are gated by their learning rate alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from finetune.stage_groups import Stage, backbone_stages
from finetune.strategies import FreezeStrategy

__all__ = ["FreezePlan", "bn_param_names", "set_frozen_norms_eval"]

_BN = nn.modules.batchnorm._BatchNorm


def bn_param_names(backbone: nn.Module) -> set[str]:
    """Names of the affine parameters of every BatchNorm layer (what ``train_bn`` unfreezes)."""
    return {
        f"{mn}.{pn}" for mn, m in backbone.named_modules() if isinstance(m, _BN) for pn, _ in m.named_parameters(recurse=False)
    }


@dataclass
class FreezePlan:
    """A freeze strategy applied to one backbone: when each parameter starts training.

    Attributes:
        strategy: the strategy.
        stages: the backbone's stages.
        start_epoch: backbone parameter name -> first epoch it trains (None: never).
        bn_start_epoch: BatchNorm module name -> first epoch its running statistics update.
        bn_params: names of BatchNorm affine parameters (they train throughout with ``train_bn``).
    """

    strategy: FreezeStrategy
    stages: list[Stage]
    start_epoch: dict[str, int | None] = field(default_factory=dict)
    bn_start_epoch: dict[str, int | None] = field(default_factory=dict)
    bn_params: frozenset[str] = frozenset()

    @classmethod
    def build(cls, backbone: nn.Module, strategy: FreezeStrategy) -> "FreezePlan":
        stages = backbone_stages(backbone)
        start = strategy.param_starts(backbone, stages)
        bn_start: dict[str, int | None] = {}
        for mname, m in backbone.named_modules():
            if isinstance(m, _BN):
                own = [f"{mname}.{p}" for p, _ in m.named_parameters(recurse=False)]
                starts = [start.get(n) for n in own]
                bn_start[mname] = None if not own or any(s is None for s in starts) else max(starts)  # type: ignore[type-var]
        return cls(strategy, stages, start, bn_start, frozenset(bn_param_names(backbone)))

    def group_start_epoch(self, name: str) -> int | None:
        """Epoch from which parameter ``name`` trains (and its group's LR is non-zero); None: never."""
        if self.strategy.train_bn and name in self.bn_params:
            return 0
        return self.start_epoch.get(name)

    def trains(self, name: str, epoch: int) -> bool:
        s = self.group_start_epoch(name)
        return s is not None and epoch >= s

    def backbone_frozen_at(self, epoch: int) -> bool:
        """Whether no backbone parameter trains at ``epoch`` (the backbone is a fixed feature extractor)."""
        return not any(self.trains(name, epoch) for name in self.start_epoch)

    @property
    def backbone_frozen_throughout(self) -> bool:
        """Whether no backbone parameter ever trains, so its features can be computed once."""
        return all(self.group_start_epoch(name) is None for name in self.start_epoch)

    def apply(self, backbone: nn.Module, head: nn.Module, epoch: int, gate_requires_grad: bool = True) -> list[nn.Module]:
        """Set ``requires_grad`` for ``epoch``; return the modules that must stay in eval mode.

        Those are the frozen BatchNorm layers, or the whole backbone when none of it trains:
        a fixed feature extractor gives the same features every epoch (no dropout, no
        stochastic depth), which is also what makes caching them exact.

        Args:
            gate_requires_grad: ``False`` under DDP: every parameter that will ever train
                keeps ``requires_grad=True`` and is gated by its learning rate alone.
        """
        for p in head.parameters():
            p.requires_grad_(True)
        for name, p in backbone.named_parameters():
            if gate_requires_grad:
                p.requires_grad_(self.trains(name, epoch))
            else:
                p.requires_grad_(self.group_start_epoch(name) is not None)
        if self.backbone_frozen_at(epoch):
            return [backbone]
        frozen = []
        for mname, m in backbone.named_modules():
            s = self.bn_start_epoch.get(mname)
            if isinstance(m, _BN) and (s is None or epoch < s):
                frozen.append(m)
        return frozen

    def trainable_count(self, backbone: nn.Module, head: nn.Module, epoch: int) -> int:
        """Parameters that train at ``epoch`` (head included)."""
        n = sum(p.numel() for p in head.parameters())
        return n + sum(p.numel() for name, p in backbone.named_parameters() if self.trains(name, epoch))


def set_frozen_norms_eval(norms: list[nn.Module]) -> None:
    """Put frozen BatchNorm layers (or a frozen backbone) back in eval mode (normalize with running stats)."""
    for m in norms:
        m.eval()
