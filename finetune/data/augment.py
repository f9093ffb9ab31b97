"""Train-time augmentation presets (``augment=none|light|medium|heavy``).

A preset is plain data: a ``name`` and ``ops``, a mapping of op name -> albumentations
transform (``_target_`` plus its arguments), applied after the data's random resized
crop and flip. ``none`` trains on the deterministic eval pipeline instead, which is what
lets a frozen backbone's features be cached.
"""

from __future__ import annotations

from typing import Any, Mapping

import albumentations as A
from omegaconf import OmegaConf

from finetune.errors import FineTuneError

__all__ = ["AUGMENT_PRESETS", "build_ops", "resolve_augment"]

AUGMENT_PRESETS = ("none", "light", "medium", "heavy")


def resolve_augment(augment: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A preset name, or a mapping with ``name`` and ``ops``, as ``{"name": ..., "ops": {...}}``."""
    if augment is None:
        augment = "light"
    if isinstance(augment, str):
        if augment not in AUGMENT_PRESETS:
            raise FineTuneError(f"unknown augment preset '{augment}'; choose one of {', '.join(AUGMENT_PRESETS)}")
        from finetune.config import CONF_DIR

        augment = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "augment" / f"{augment}.yaml"))  # type: ignore[assignment]
    spec = OmegaConf.to_container(augment, resolve=True) if OmegaConf.is_config(augment) else dict(augment)  # type: ignore[arg-type]
    name = spec.get("name", "custom")
    ops = dict(spec.get("ops") or {})
    if name == "none" and ops:
        raise FineTuneError("augment=none takes no ops (it trains on the eval pipeline)")
    return {"name": name, "ops": ops}


def build_ops(ops: Mapping[str, Any]) -> list[A.BasicTransform]:
    """Instantiate each op (a null entry is skipped) in the order given."""
    from hydra.utils import instantiate

    built = []
    for key, op in ops.items():
        if op is None:
            continue
        if not isinstance(op, Mapping) or "_target_" not in op:
            raise FineTuneError(f"augment.ops.{key} needs a _target_ (an albumentations transform class)")
        try:
            built.append(instantiate(dict(op), _convert_="all"))
        except Exception as e:  # noqa: BLE001 - hydra wraps the real error; show its first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FineTuneError(f"augment.ops.{key}: {first}") from None
    return built
