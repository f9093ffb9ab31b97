"""Which parameters train at each epoch, and BatchNorm that stays frozen while the rest trains.

A strategy (:class:`FreezeSpec`) gives every backbone parameter the epoch from which it
trains, or ``None`` for never; the new head always trains from epoch 0. Stages come from the
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

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from torch import nn

from finetune.errors import FineTuneError
from finetune.stage_groups import Stage, backbone_stages

__all__ = ["FREEZE_STRATEGIES", "FreezePlan", "FreezeSpec", "bn_param_names", "set_frozen_norms_eval"]

FREEZE_STRATEGIES = ("none", "head_only", "top_stages", "bottom_stages", "gradual", "lp_ft", "patterns")

_BN = nn.modules.batchnorm._BatchNorm


def bn_param_names(backbone: nn.Module) -> set[str]:
    """Names of the affine parameters of every BatchNorm layer (what ``train_bn`` unfreezes)."""
    return {
        f"{mn}.{pn}" for mn, m in backbone.named_modules() if isinstance(m, _BN) for pn, _ in m.named_parameters(recurse=False)
    }


@dataclass(frozen=True)
class FreezeSpec:
    """How much of the backbone trains, and when.

    Attributes:
        name: ``none`` (everything trains), ``head_only`` (linear probe), ``top_stages``
            (the last ``n`` stages train), ``bottom_stages`` (the first ``n`` stages train:
            surgical fine-tuning for input-level shift), ``gradual`` (start head-only and
            unfreeze one more stage from the top every ``every_n_epochs``), ``lp_ft``
            (head-only for ``unfreeze_at_epoch`` epochs, then everything), or ``patterns``
            (parameter names matching ``trainable`` train, unless they match ``frozen``).
        n: stages for ``top_stages`` / ``bottom_stages``.
        every_n_epochs: epochs between unfreezing steps of ``gradual``.
        unfreeze_at_epoch: epoch at which ``lp_ft`` unfreezes the backbone.
        trainable: fnmatch patterns of backbone parameter names that train (``patterns``).
        frozen: fnmatch patterns of backbone parameter names that stay frozen (``patterns``).
        train_bn: let the affine parameters of frozen BatchNorm layers train (their
            running statistics stay frozen either way).
    """

    name: str = "none"
    n: int = 2
    every_n_epochs: int = 1
    unfreeze_at_epoch: int = 1
    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    train_bn: bool = False

    @classmethod
    def parse(cls, spec: "str | FreezeSpec | Mapping[str, Any]") -> "FreezeSpec":
        """Accept a strategy name, a spec, or a config mapping with ``name``."""
        if isinstance(spec, FreezeSpec):
            out = spec
        elif isinstance(spec, str):
            out = cls(name=spec)
        else:
            known = set(cls.__dataclass_fields__)
            extra = set(spec) - known
            if extra:
                raise FineTuneError(f"unknown freeze option(s) {sorted(extra)}; known: {sorted(known)}")
            values = dict(spec)
            for key in ("trainable", "frozen"):
                if key in values:
                    values[key] = tuple(values[key] or ())
            out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        if self.name not in FREEZE_STRATEGIES:
            raise FineTuneError(
                f"unknown freeze strategy '{self.name}'; choose one of {', '.join(FREEZE_STRATEGIES)}"
            )
        if self.name in ("top_stages", "bottom_stages") and self.n < 0:
            raise FineTuneError(f"freeze.n must be >= 0, got {self.n}")
        if self.name == "gradual" and self.every_n_epochs < 1:
            raise FineTuneError(f"freeze.every_n_epochs must be >= 1, got {self.every_n_epochs}")
        if self.name == "lp_ft" and self.unfreeze_at_epoch < 0:
            raise FineTuneError(f"freeze.unfreeze_at_epoch must be >= 0, got {self.unfreeze_at_epoch}")
        if self.name == "patterns" and not (self.trainable or self.frozen):
            raise FineTuneError("freeze=patterns needs freeze.trainable and/or freeze.frozen patterns")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trainable"], d["frozen"] = list(self.trainable), list(self.frozen)
        return d

    @property
    def is_dynamic(self) -> bool:
        """Whether the trainable set changes during training."""
        return self.name in ("gradual", "lp_ft")


def _stage_start(spec: FreezeSpec, index: int, num_stages: int) -> int | None:
    """Epoch from which stage ``index`` (0 = stem) trains; None: never."""
    from_top = num_stages - 1 - index
    if spec.name == "none":
        return 0
    if spec.name == "head_only":
        return None
    if spec.name == "top_stages":
        return 0 if from_top < spec.n else None
    if spec.name == "bottom_stages":
        return 0 if index < spec.n else None
    if spec.name == "gradual":
        return (from_top + 1) * spec.every_n_epochs
    if spec.name == "lp_ft":
        return spec.unfreeze_at_epoch
    raise AssertionError(spec.name)


@dataclass
class FreezePlan:
    """A :class:`FreezeSpec` applied to one backbone: when each parameter starts training.

    Attributes:
        spec: the strategy.
        stages: the backbone's stages.
        start_epoch: backbone parameter name -> first epoch it trains (None: never).
        bn_start_epoch: BatchNorm module name -> first epoch its running statistics update.
        bn_params: names of BatchNorm affine parameters (they train throughout with ``train_bn``).
    """

    spec: FreezeSpec
    stages: list[Stage]
    start_epoch: dict[str, int | None] = field(default_factory=dict)
    bn_start_epoch: dict[str, int | None] = field(default_factory=dict)
    bn_params: frozenset[str] = frozenset()

    @classmethod
    def build(cls, backbone: nn.Module, spec: FreezeSpec) -> "FreezePlan":
        stages = backbone_stages(backbone)
        start: dict[str, int | None] = {}
        if spec.name == "patterns":
            for name, _ in backbone.named_parameters():
                on = not spec.trainable or any(fnmatch.fnmatchcase(name, p) for p in spec.trainable)
                off = any(fnmatch.fnmatchcase(name, p) for p in spec.frozen)
                start[name] = 0 if on and not off else None
            if not any(v == 0 for v in start.values()) and spec.trainable:
                raise FineTuneError(f"freeze.trainable patterns {list(spec.trainable)} match no backbone parameter")
        else:
            for stage in stages:
                s = _stage_start(spec, stage.index, len(stages))
                for name in stage.param_names:
                    start[name] = s
        bn_start: dict[str, int | None] = {}
        for mname, m in backbone.named_modules():
            if isinstance(m, _BN):
                own = [f"{mname}.{p}" for p, _ in m.named_parameters(recurse=False)]
                starts = [start.get(n) for n in own]
                bn_start[mname] = None if not own or any(s is None for s in starts) else max(starts)  # type: ignore[type-var]
        return cls(spec, stages, start, bn_start, frozenset(bn_param_names(backbone)))

    def group_start_epoch(self, name: str) -> int | None:
        """Epoch from which parameter ``name`` trains (and its group's LR is non-zero); None: never."""
        if self.spec.train_bn and name in self.bn_params:
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
