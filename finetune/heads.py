"""Classification heads: freshly initialized, dropout before the classifier."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from finetune.errors import FineTuneError

__all__ = ["HEADS", "build_head"]

HEADS = ("linear", "mlp")

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def build_head(
    num_features: int,
    num_classes: int,
    name: str = "linear",
    drop_rate: float = 0.0,
    hidden_dim: int = 512,
    act_layer: str = "gelu",
) -> nn.Sequential:
    """``linear``: dropout -> linear. ``mlp``: linear -> norm -> activation -> dropout -> linear.

    Args:
        num_features: width of the backbone's pooled features.
        num_classes: number of classes.
        name: ``linear`` or ``mlp``.
        drop_rate: dropout before the classifier (timm's name).
        hidden_dim: width of the MLP's hidden layer.
        act_layer: activation of the MLP (timm's name): gelu, relu, silu, tanh.
    """
    if name == "linear":
        return nn.Sequential(nn.Dropout(drop_rate), nn.Linear(num_features, num_classes))
    if name == "mlp":
        if act_layer not in _ACTIVATIONS:
            raise FineTuneError(f"unknown head.act_layer '{act_layer}'; choose one of {', '.join(_ACTIVATIONS)}")
        return nn.Sequential(
            nn.Linear(num_features, hidden_dim),
            nn.LayerNorm(hidden_dim),
            _ACTIVATIONS[act_layer](),
            nn.Dropout(drop_rate),
            nn.Linear(hidden_dim, num_classes),
        )
    raise FineTuneError(f"unknown head '{name}'; choose one of {', '.join(HEADS)}")


def head_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The build_head arguments of a head config (its other keys, e.g. label_smoothing, are the loss's)."""
    return {k: cfg[k] for k in ("name", "drop_rate", "hidden_dim", "act_layer") if k in cfg}
