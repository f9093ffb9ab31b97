"""Train-time augmentation: :class:`AugmentConfig` and its presets (``augment=none|light|medium|heavy``).

``ops`` maps op name -> albumentations transform (``_target_`` plus its arguments), applied
after the data's random resized crop and flip (``data.scale``, ``data.ratio``, ``data.hflip``).
Override one op from the command line (``augment.ops.affine.p=0.3``) or drop it
(``~augment.ops.affine``). ``no_aug`` (timm's name, ``create_transform(no_aug=True)``)
trains on the deterministic eval pipeline instead, which is what lets a frozen backbone's
features be cached.

Mixup and CutMix (``mixup``, ``cutmix`` and the other fields named after timm's ``train.py`` flags)
mix whole batches, so they are not albumentations ops: :mod:`finetune.loss` applies them with
timm's ``Mixup`` in the training step; off by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

from omegaconf import OmegaConf

from finetune.errors import FineTuneError

if TYPE_CHECKING:  # albumentations takes seconds to import; the presets do not need it
    import albumentations as A

__all__ = ["AUGMENT_PRESETS", "MIXING_FIELDS", "AugmentConfig", "build_ops", "mixing_options", "resolve_augment"]


@dataclass
class AugmentConfig:
    """Attributes:
    name: a label for reports and metrics.json; behaviour comes from the other fields.
    no_aug: train on the eval pipeline (resize, center crop): the same image every epoch.
    ops: albumentations transforms by op name, applied in order after the crop and flip;
        a null entry is skipped.
    mixup: Mixup's alpha (timm ``--mixup``; Beta(alpha, alpha) mixing weights); 0: off.
    cutmix: CutMix's alpha (timm ``--cutmix``); 0: off.
    cutmix_minmax: CutMix box size as [min, max] fractions of the image (timm ``--cutmix-minmax``);
        set, it replaces ``cutmix``'s alpha (timm then uses alpha 1).
    mixup_prob: probability of mixing a batch (or an element, ``mixup_mode=elem``).
    mixup_switch_prob: with both on, the probability of CutMix instead of Mixup.
    mixup_mode: ``batch`` (one weight per batch), ``pair`` or ``elem`` (timm's ``--mixup-mode``).
    """

    name: str = "light"
    no_aug: bool = False
    ops: Dict[str, Any] = field(default_factory=dict)
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"


MIXING_FIELDS = ("mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob", "mixup_mode")


def mixing_options(values: AugmentConfig | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The mixing fields of an :class:`AugmentConfig` (or a mapping of them), checked, as plain values.

    None when neither Mixup nor CutMix is on. A mapping may leave fields out (their defaults apply)
    and may hold the other fields (a whole ``augment`` node).
    """
    if values is None:
        return None
    if isinstance(values, AugmentConfig):
        opts = {k: getattr(values, k) for k in MIXING_FIELDS}
    else:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(AugmentConfig)})
        if unknown:
            raise FineTuneError(f"mixing has no option(s) {', '.join(unknown)}; it takes {', '.join(MIXING_FIELDS)}")
        opts = {k: values.get(k, getattr(AugmentConfig, k)) for k in MIXING_FIELDS}
    for k in ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob"):
        opts[k] = float(opts[k])
        if not opts[k] >= 0 or (k.endswith("prob") and opts[k] > 1):  # NaN fails too
            want = "a probability in [0, 1]" if k.endswith("prob") else "an alpha >= 0 (0: off)"
            raise FineTuneError(f"augment.{k} must be {want}, got {opts[k]}")
    if opts["mixup_mode"] not in ("batch", "pair", "elem"):
        raise FineTuneError(f"augment.mixup_mode must be batch, pair or elem, got '{opts['mixup_mode']}'")
    if opts["cutmix_minmax"] is not None:
        minmax = opts["cutmix_minmax"] = [float(v) for v in opts["cutmix_minmax"]]
        if len(minmax) != 2 or not 0 < minmax[0] <= minmax[1] <= 1:
            raise FineTuneError(f"augment.cutmix_minmax must be [min, max] with 0 < min <= max <= 1, got {minmax}")
    on = opts["mixup"] > 0 or opts["cutmix"] > 0 or opts["cutmix_minmax"] is not None
    return opts if on else None


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
                             ops=dict(values.get("ops") or {}),
                             **{k: values[k] for k in MIXING_FIELDS if k in values})  # type: ignore[arg-type]
    if spec.no_aug and any(op is not None for op in spec.ops.values()):
        raise FineTuneError(f"augment={spec.name} takes no ops (no_aug: it trains on the eval pipeline)")
    mixing_options(spec)  # bad mixing values fail before anything slow
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
