"""Freeze strategies, one per module, found by name in :data:`STRATEGIES` (``freeze=NAME``)."""

from finetune.strategies import bottom_stages, gradual, head_only, lp_ft, none, patterns, top_stages  # noqa: F401  (register)
from finetune.strategies.base import STRATEGIES, FreezeStrategy, get_strategy, register

__all__ = ["STRATEGIES", "FreezeStrategy", "get_strategy", "register"]
