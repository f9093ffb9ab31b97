"""Turning FineTuneModule's constructor arguments into objects: plain hparams, instantiated leaves, loss weights."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from finetune.errors import FineTuneError
from finetune.strategies import FreezeStrategy

__all__ = ["plain", "instantiate_leaf", "class_weight_tensor", "compile_kwargs"]


def plain(value: Any) -> Any:
    """Hyperparameters as plain Python data, so checkpoints load with weights_only."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, FreezeStrategy):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def instantiate_leaf(cfg: Mapping[str, Any], what: str) -> Any:
    """``hydra.utils.instantiate`` with the error's first line as a FineTuneError (a bad _target_ is user input)."""
    from hydra.utils import instantiate

    try:
        return instantiate(dict(cfg), _convert_="all")
    except Exception as e:  # noqa: BLE001 - hydra wraps the real error
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise FineTuneError(f"{what}: {first}") from None


def class_weight_tensor(class_weights: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        raise FineTuneError(
            f"class_weights '{class_weights}' needs the training data; pass one float per class "
            "(the config's loss.class_weights=balanced is computed in finetune.builders.build_module)"
        )
    weights = [float(w) for w in class_weights]
    if len(weights) != num_classes:
        raise FineTuneError(f"class_weights has {len(weights)} value(s) for {num_classes} classes")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise FineTuneError(f"class_weights must all be positive and finite, got {weights}")
    return torch.tensor(weights, dtype=torch.float32)


def compile_kwargs(value: bool | str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``compile`` as ``torch.compile`` keyword arguments, or None for no compilation."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, str) and value:
        return {"backend": value}  # timm's --torchcompile BACKEND
    if isinstance(value, Mapping):
        return dict(plain(value))
    raise FineTuneError(
        f"compile must be false, true, a backend name or a mapping of torch.compile arguments, got '{value}'"
    )
