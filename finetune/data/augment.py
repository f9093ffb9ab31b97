"""Train-time augmentation: :class:`AugmentConfig` and its presets (``augment=none|light|medium|heavy``).

``ops`` maps op name -> albumentations transform (``_target_`` plus its arguments), applied
after the data's random resized crop and flip (``data.scale``, ``data.ratio``, ``data.hflip``).
Override one op from the command line (``augment.ops.affine.p=0.3``) or drop it
(``~augment.ops.affine``). ``no_aug`` (timm's name, ``create_transform(no_aug=True)``)
trains on the deterministic eval pipeline instead, which is what lets a frozen backbone's
features be cached.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

import albumentations as A
from omegaconf import OmegaConf

from finetune.errors import FineTuneError

__all__ = ["AUGMENT_PRESETS", "AugmentConfig", "build_ops", "resolve_augment"]


@dataclass
class AugmentConfig:
    """Attributes:
    name: a label for reports and metrics.json; behaviour comes from the other fields.
    no_aug: train on the eval pipeline (resize, center crop): the same image every epoch.
    ops: albumentations transforms by op name, applied in order after the crop and flip;
        a null entry is skipped.
    """

    name: str = "light"
    no_aug: bool = False
    ops: Dict[str, Any] = field(default_factory=dict)


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    # No train-time augmentation: train images go through the deterministic eval pipeline
    # (resize, center crop). With a frozen backbone (freeze=head_only) its features are then
    # computed once and cached (cache_features).
    "none": AugmentConfig(name="none", no_aug=True),
    # The data's own random resized crop and flip (data.scale, data.ratio, data.hflip), nothing more:
    # timm's default fine-tuning augmentation.
    "light": AugmentConfig(name="light"),
    # light + photometric jitter and a small affine warp: for a few thousand images of a new domain.
    "medium": AugmentConfig(name="medium", ops={
        "color_jitter": {"_target_": "albumentations.ColorJitter", "brightness": 0.2, "contrast": 0.2,
                         "saturation": 0.2, "hue": 0.0, "p": 0.8},
        "affine": {"_target_": "albumentations.Affine", "rotate": [-10, 10], "translate_percent": [-0.05, 0.05],
                   "scale": [0.95, 1.05], "p": 0.5},
    }),
    # medium, stronger, plus blur and cutout: for few examples of a new domain trained long,
    # where overfitting is the risk.
    "heavy": AugmentConfig(name="heavy", ops={
        "color_jitter": {"_target_": "albumentations.ColorJitter", "brightness": 0.4, "contrast": 0.4,
                         "saturation": 0.4, "hue": 0.05, "p": 0.8},
        "affine": {"_target_": "albumentations.Affine", "rotate": [-20, 20], "translate_percent": [-0.1, 0.1],
                   "scale": [0.9, 1.1], "shear": [-8, 8], "p": 0.7},
        "blur": {"_target_": "albumentations.GaussianBlur", "blur_limit": [3, 5], "p": 0.2},
        "coarse_dropout": {"_target_": "albumentations.CoarseDropout", "num_holes_range": [1, 4],
                           "hole_height_range": [0.1, 0.25], "hole_width_range": [0.1, 0.25], "p": 0.5},
    }),
}  # fmt: skip


def resolve_augment(augment: str | AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
    """A preset name, an :class:`AugmentConfig`, or a mapping of its fields, as an :class:`AugmentConfig`.

    A mapping without ``no_aug`` augments (``{"ops": {...}}`` alone is light plus those ops).
    """
    if augment is None:
        augment = "light"
    if isinstance(augment, str):
        if augment not in AUGMENT_PRESETS:
            raise FineTuneError(f"unknown augment preset '{augment}'; choose one of {', '.join(AUGMENT_PRESETS)}")
        spec = dataclasses.replace(AUGMENT_PRESETS[augment])
        spec.ops = dict(spec.ops)  # the caller may change its copy; the preset stays as it is
    elif isinstance(augment, AugmentConfig):
        spec = augment
    else:
        values = OmegaConf.to_container(augment, resolve=True) if OmegaConf.is_config(augment) else dict(augment)
        known = {f.name for f in dataclasses.fields(AugmentConfig)}
        extra = sorted(set(values) - known)  # type: ignore[arg-type]
        if extra:
            raise FineTuneError(f"augment has no option(s) {', '.join(extra)}; it takes {', '.join(sorted(known))}")
        values = {"name": "custom", **values}  # type: ignore[dict-item]
        spec = AugmentConfig(name=str(values["name"]), no_aug=bool(values.get("no_aug", False)),
                             ops=dict(values.get("ops") or {}))
    if spec.no_aug and any(op is not None for op in spec.ops.values()):
        raise FineTuneError(f"augment={spec.name} takes no ops (no_aug: it trains on the eval pipeline)")
    return spec


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
