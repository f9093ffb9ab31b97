"""Fold a ``freeze=lora`` module's adapters into its backbone's weights, for predict and export.

Each peft LoRA layer is merged with peft's own ``merge()`` (``W += lora_alpha / r * B @ A``)
and replaced by its base layer, as peft's ``merge_and_unload`` does for a ``PeftModel``: the
backbone becomes the plain timm model with its original parameter names, one matmul per layer
again, with the same outputs to float tolerance. The adapters are injected by
:meth:`finetune.strategies.lora.LoRA.adapt`; nothing here imports peft.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from finetune.freezing import FreezePlan
from finetune.strategies import get_strategy

if TYPE_CHECKING:
    from finetune.module import FineTuneModule

__all__ = ["merge_adapters", "merge_lora_layers"]


def _is_peft_layer(m: nn.Module) -> bool:
    # By the class's module, so a model without adapters never pays for importing peft.
    return type(m).__module__.startswith("peft.") and hasattr(m, "get_base_layer")


def merge_lora_layers(model: nn.Module) -> int:
    """Merge every peft adapter layer of ``model`` into its base layer, in place; the number merged."""
    layers = [(name, m) for name, m in model.named_modules() if _is_peft_layer(m)]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if layers and hasattr(model, "peft_config"):  # what inject_adapter_in_model left on the model
        del model.peft_config
    return len(layers)


def merge_adapters(module: "FineTuneModule") -> bool:
    """Fold ``module``'s LoRA adapters into its backbone; False (and nothing changed) when it has none.

    The module becomes a plain ``freeze=none`` one (its hyperparameters say so, and
    ``lora_merged`` keeps the LoRA options), so a checkpoint saved afterwards loads without adapters.
    """
    if not merge_lora_layers(module.backbone):
        return False
    module.hparams["lora_merged"] = module.strategy.to_dict()
    module.strategy = get_strategy("none")
    module.hparams["freeze"] = module.strategy.to_dict()
    module.freeze_plan = FreezePlan.build(module.backbone, module.strategy)
    module.apply_freeze(0)
    return True
