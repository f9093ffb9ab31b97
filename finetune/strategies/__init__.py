"""Freeze strategies, one per module, found by name in :data:`STRATEGIES` (``freeze=NAME``)."""

# Imported for their registration, in the order listings show them: from training everything to training least.
from finetune.strategies import none  # noqa: I001, F401
from finetune.strategies import head_only, top_stages, bottom_stages, gradual, lp_ft, patterns  # noqa: F401
from finetune.strategies import bitfit, norm, lora  # noqa: F401  (parameter-efficient: a kind of parameter trains)
from finetune.strategies.base import STRATEGIES, FreezeStrategy, compared_strategies, get_strategy, register

__all__ = ["STRATEGIES", "FreezeStrategy", "compared_strategies", "get_strategy", "register"]
