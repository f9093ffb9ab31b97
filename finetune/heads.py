"""Classification heads: freshly initialized, dropout before the classifier.

Each head is a class built from config with ``hydra.utils.instantiate`` (``head._target_``),
called with the backbone's feature width and the number of classes. Any ``nn.Module``
class with ``num_features`` and ``num_classes`` arguments can stand in for them.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import nn

from finetune.errors import FineTuneError

__all__ = ["HEADS", "LinearHead", "MLPHead", "build_head", "head_config"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class LinearHead(nn.Sequential):
    """Dropout, then a linear classifier (timm's ``drop_rate``)."""

    def __init__(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__(nn.Dropout(drop_rate), nn.Linear(num_features, num_classes))


class MLPHead(nn.Sequential):
    """Linear -> LayerNorm -> activation -> dropout -> linear.

    Args:
        hidden_dim: width of the hidden layer.
        act_layer: activation (timm's name): gelu, relu, silu, tanh.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self, num_features: int, num_classes: int, hidden_dim: int = 512, act_layer: str = "gelu", drop_rate: float = 0.1
    ) -> None:
        if act_layer not in _ACTIVATIONS:
            raise FineTuneError(f"unknown head.act_layer '{act_layer}'; choose one of {', '.join(_ACTIVATIONS)}")
        super().__init__(
            nn.Linear(num_features, hidden_dim),
            nn.LayerNorm(hidden_dim),
            _ACTIVATIONS[act_layer](),
            nn.Dropout(drop_rate),
            nn.Linear(hidden_dim, num_classes),
        )


# Short names for the Python API: FineTuneModule(head="mlp").
HEADS: dict[str, type[nn.Module]] = {"linear": LinearHead, "mlp": MLPHead}


def head_config(head: str | Mapping[str, Any]) -> dict[str, Any]:
    """A head as a ``_target_`` mapping: ``"mlp"`` -> ``{"_target_": "finetune.heads.MLPHead", "hidden_dim": 512, ...}``.

    A short name gets the class's own defaults written out, as the ``head=NAME`` config option has them.
    """
    if isinstance(head, str):
        if head not in HEADS:
            raise FineTuneError(f"unknown head '{head}'; choose one of {', '.join(HEADS)} or give a _target_")
        cls = HEADS[head]
        own = inspect.signature(cls).parameters.values()
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}",
                **{p.name: p.default for p in own if p.default is not inspect.Parameter.empty}}
    cfg = dict(head)
    if "_target_" not in cfg:
        raise FineTuneError(f"a head config needs a _target_ (a module class), got {sorted(cfg)}")
    return cfg


def build_head(head: str | Mapping[str, Any], num_features: int, num_classes: int) -> nn.Module:
    """Instantiate ``head`` for ``num_features`` inputs and ``num_classes`` outputs."""
    from hydra.utils import instantiate

    cfg = head_config(head)
    try:
        return instantiate(cfg, num_features=num_features, num_classes=num_classes, _convert_="all")
    except FineTuneError:
        raise
    except Exception as e:  # noqa: BLE001 - hydra wraps the real error; the user needs its first line
        cause = e.__cause__ or e
        if isinstance(cause, FineTuneError):
            raise cause from None
        raise FineTuneError(f"head {cfg['_target_']}: {str(cause).strip().splitlines()[0]}") from None
