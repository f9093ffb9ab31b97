"""``+variant=NAME``: one named way to fine-tune, for sweeping how much *and* how far the weights move.

A freeze strategy says which parameters train (``freeze=NAME``); L2-SP, an EMA of the weights and
WiSE-FT are other knobs (``optim.l2sp``, ``ema.decay``, ``wise_ft``) that combine with any strategy.
A Hydra sweep is a product of its parameters, so putting both kinds in one side-by-side comparison
needs a single axis: each variant is a small global config that sets a strategy and at most one of
those knobs, stored in Hydra's ConfigStore as group ``variant``. ``+recipe=compare_all`` sweeps
:func:`compared_variants`; ``python -m finetune +variant=ema`` runs one of them alone.

The knobs' values are the documented examples (docs/strategies-peft.md, docs/weight-averaging.md); what
they measured side by side is in docs/strategies-compared.md.
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore

from finetune.strategies import STRATEGIES

__all__ = ["VARIANTS", "compared_variants", "register_variants"]

# name -> (freeze strategy, other settings). Order is the report's order.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "head_only": ("head_only", {}),
    "bitfit": ("bitfit", {}),
    "norm": ("norm", {}),
    "lora": ("lora", {}),
    "lp_ft": ("lp_ft", {}),
    # The documented example alpha; measured within 2 points of none (digits, Fashion 100/class).
    "l2sp": ("none", {"optim": {"l2sp": 0.01}}),
    # The and docs' example; with ModelEmaV3's warmup a short run is not averaged from its first steps.
    "ema": ("none", {"ema": {"decay": 0.999}}),
    "wise_ft": ("none", {"wise_ft": True}),
}


def _node(strategy: str, settings: dict[str, Any], name: str) -> dict[str, Any]:
    # "override /freeze" swaps the group's option as `freeze=NAME` would (Hydra's experiment pattern),
    # so the strategy's own typed fields come with it.
    return {"defaults": [{"override /freeze": strategy}, "_self_"], "variant": name, **settings}


def register_variants(cs: ConfigStore | None = None) -> None:
    """Store every variant whose strategy is registered (``lora`` needs peft) as ``variant/NAME``."""
    cs = cs or ConfigStore.instance()
    for name, (strategy, settings) in VARIANTS.items():
        if strategy in STRATEGIES:
            cs.store(group="variant", name=name, node=_node(strategy, settings, name), package="_global_")


def compared_variants() -> str:
    """The variants ``+recipe=compare_all`` sweeps: all of them, less those whose strategy is not compared here."""
    return ",".join(name for name, (strategy, _) in VARIANTS.items()
                    if strategy in STRATEGIES and STRATEGIES[strategy].compared)
