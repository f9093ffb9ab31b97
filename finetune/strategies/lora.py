"""``freeze=lora``: low-rank adapters (Hu et al. 2022) on the backbone, with Hugging Face ``peft``; the head trains.

The adapters are injected in place with ``peft.inject_adapter_in_model`` (no ``PeftModel``
wrapper), so parameter names keep the timm model's prefixes: its ``group_matcher`` stages,
``no_weight_decay()`` and the head stay where they were, and the head is in every checkpoint
(the peers' lost-head bug, peft #310/#577/#1894, cannot happen). The strategy's options are
in the checkpoint's hyperparameters, so ``FineTuneModule.load_from_checkpoint`` injects the
same adapters before loading the weights: no peft code in the user's hands.
:func:`finetune.lora.merge_adapters` folds them into the weights for predict and export.

Default targets: every ``nn.Linear`` (timm ViT's fused ``qkv``, ``proj``, MLP ``fc1``/``fc2``,
peft #691) and every dense 1x1 ``nn.Conv2d`` (EfficientNet's ``conv_pw``/``conv_pwl``/``conv_head``,
ResNet's bottleneck and downsample 1x1s). ``freeze.target_modules=[qkv,proj]`` picks by peft's
rule: a module whose name is, or ends with ``.`` plus, one of them.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import ClassVar, List, Optional

from torch import nn

from finetune.errors import FineTuneError
from finetune.stage_groups import backbone_stages
from finetune.strategies.base import register
from finetune.strategies.subset import ParamSubset

__all__ = ["LoRA", "lora_targets"]


def _fits_by_default(m: nn.Module) -> bool:
    # Depthwise and 3x3 convolutions are left alone: pointwise convs and linears hold most weights.
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def lora_targets(backbone: nn.Module, target_modules: Optional[List[str]] = None, n: Optional[int] = None) -> list[str]:
    """Full names of the modules that get adapters.

    Args:
        backbone: the timm backbone, before adapters.
        target_modules: peft-style names (a module matches when its name is one, or ends with ``.`` plus one);
            None: every linear and dense 1x1 convolution.
        n: only modules in the top ``n`` stages; None: every stage.
    """
    modules = dict(backbone.named_modules())
    fitting = [name for name, m in modules.items() if name and _fits_by_default(m)]
    if target_modules is None:
        chosen = fitting
    else:
        chosen = []
        for t in target_modules:
            hits = [name for name in modules if name and (name == t or name.endswith(f".{t}"))]
            if not hits:
                known = sorted({name.rpartition(".")[2] for name in fitting})[:8]
                raise FineTuneError(
                    f"freeze.target_modules: '{t}' names no module of the backbone; it has e.g. {', '.join(known)}"
                )
            chosen += [h for h in hits if h not in chosen]
    if n is not None:
        top = {p for s in backbone_stages(backbone)[-n:] for p in s.param_names}
        chosen = [c for c in chosen if any(f"{c}.{p}" in top for p, _ in modules[c].named_parameters())]
    if not chosen:
        where = f" in the top {n} stage(s)" if n is not None else ""
        raise FineTuneError(f"freeze=lora: no module to adapt{where}; name some with freeze.target_modules")
    return chosen


@register("lora")
@dataclass
class LoRA(ParamSubset):
    """Attributes (peft's ``LoraConfig`` names and defaults):
    r: rank of the adapters.
    lora_alpha: scaling numerator: the update is ``lora_alpha / r * B @ A``.
    lora_dropout: dropout on the adapters' input.
    target_modules: module names to adapt (peft's suffix rule); null: every linear and dense 1x1 conv.
    """

    name: str = "lora"
    kind: ClassVar[str] = "LoRA adapters"
    shown: ClassVar[tuple[str, ...]] = ("r",)
    # In +recipe=compare where the optional peft is installed (pip install 'finetune[lora]'): without it
    # the sweep would carry a run that can only fail. The README and docs say so.
    compared: ClassVar[bool] = importlib.util.find_spec("peft") is not None
    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: Optional[List[str]] = None

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise FineTuneError(f"freeze.r must be >= 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise FineTuneError(f"freeze.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FineTuneError(f"freeze.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.target_modules is not None:
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise FineTuneError("freeze.target_modules is empty; null adapts every linear and 1x1 conv")

    def adapt(self, backbone: nn.Module) -> nn.Module:
        targets = lora_targets(backbone, self.target_modules, self.n)
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise FineTuneError("freeze=lora needs the peft package: pip install 'finetune[lora]'") from None
        config = LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            # Exact full names (peft full-matches a string as a regex), so the stage filter above holds.
            target_modules="^(?:" + "|".join(re.escape(t) for t in targets) + ")$",
        )
        try:
            return inject_adapter_in_model(config, backbone)
        except ValueError as e:  # e.g. a target of a type LoRA does not support (a norm layer)
            raise FineTuneError(f"freeze=lora: {(str(e).strip().splitlines() or ['peft refused'])[0]}") from None

    def selected(self, backbone: nn.Module) -> set[str]:
        return {name for name, _ in backbone.named_parameters() if ".lora_" in name}
