"""Test-time augmentation (``tta=none|hflip|five_crop``): each image as several views, softmax averaged.

A view transform turns one image into a ``(V, C, H, W)`` tensor, so batches are ``(B, V, C, H, W)``
and ``FineTuneModule.predict_step`` averages the ``V`` views' (calibrated) probabilities: the
views go through the one inference path (:func:`finetune.inference.probabilities`) as any image.

- ``hflip``: the eval crop and its mirror image (fastai's and MMPretrain's flip TTA). Refused for a
  run trained with ``data.hflip=0``: that data declared that a mirrored image is another class
  (a mirrored digit is not the digit).
- ``five_crop``: torchvision's ``FiveCrop``: the four corner crops and the center crop of the eval
  pipeline's resize (``image_size / crop_pct``, larger than the crop), as the classic ImageNet
  ten-crop evaluation without its flips. Needs ``crop_pct < 1``: otherwise the crops are one image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finetune.checkpoints import Preprocessing, run_dir_of
from finetune.errors import FineTuneError

__all__ = [
    "TTA_MODES", "check_tta", "check_tta_allowed", "format_tta", "trained_hflip", "tta_transform", "view_summary",
]

TTA_MODES = ("none", "hflip", "five_crop")


def check_tta(mode: str) -> str:
    """``mode`` if it is one of :data:`TTA_MODES`, else a one-line :class:`FineTuneError`."""
    if mode not in TTA_MODES:
        raise FineTuneError(f"tta must be one of {', '.join(TTA_MODES)}, got '{mode}'")
    return mode


def trained_hflip(raw: dict[str, Any], ckpt: str | os.PathLike[str]) -> float | None:
    """The run's ``data.hflip``: from the checkpoint's ``data_config`` if it has one, else the run's config.yaml.

    None when neither says (a checkpoint copied away from its run directory).
    """
    saved = ((raw.get("hyper_parameters") or {}).get("data_config") or {}).get("hflip")
    if saved is not None:
        return float(saved)
    run_dir = run_dir_of(ckpt)
    config = run_dir / "config.yaml" if run_dir else None
    if config is None or not config.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.load(config), "data.hflip")
    except Exception:  # noqa: BLE001 - an unreadable config.yaml says nothing about flips
        return None
    return None if value is None else float(value)


def check_tta_allowed(mode: str, raw: dict[str, Any], ckpt: str | os.PathLike[str], prep: Preprocessing) -> None:
    """Refuse, in one line, a ``mode`` the run's own training says is unsafe or pointless."""
    if mode == "hflip":
        hflip = trained_hflip(raw, ckpt)
        if hflip is None:
            raise FineTuneError(f"tta=hflip: cannot tell whether mirrored images keep their class: checkpoint "
                                f"'{Path(ckpt)}' has no run config.yaml beside it with data.hflip")
        if hflip <= 0:
            raise FineTuneError("tta=hflip: the run trained with data.hflip=0 (its images change class when "
                                "mirrored, as digits do); use tta=none or tta=five_crop")
    if mode == "five_crop" and _resize(prep) <= prep.image_size:
        raise FineTuneError(f"tta=five_crop needs crop_pct below 1 (the eval resize larger than the crop); "
                            f"this run's is {prep.crop_pct}, so all five crops would be the same image")


def _resize(prep: Preprocessing) -> int:
    return int(math.floor(prep.image_size / prep.crop_pct))  # eval_transform's resize


class _Views:
    """An albumentations-style callable (``t(image=array)["image"]``) giving a ``(V, C, H, W)`` tensor."""

    def __init__(self, base: Callable[..., dict[str, Any]], views: Callable[[torch.Tensor], list[torch.Tensor]]
                 ) -> None:
        self.base = base
        self.views = views

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": torch.stack(self.views(self.base(image=image)["image"]))}


def tta_transform(prep: Preprocessing, mode: str) -> Any:
    """The eval transform of ``prep`` for ``mode``: the plain one for ``none``, else a view transform."""
    check_tta(mode)
    plain = prep.transform()
    if mode == "none":
        return plain
    if mode == "hflip":
        return _Views(plain, lambda x: [x, x.flip(-1)])
    import albumentations as A  # seconds to import: not for --help
    from torchvision.transforms.functional import five_crop

    # The eval pipeline up to its center crop (resize, or resize and pad): five_crop takes its place.
    uncropped = A.Compose([t for t in plain.transforms if not isinstance(t, A.CenterCrop)])
    size = prep.image_size
    return _Views(uncropped, lambda x: list(five_crop(x, [size, size])))


def view_summary(probs: torch.Tensor, labels: torch.Tensor, seconds: float) -> dict[str, Any]:
    """One pass's top-1, NLL, ECE and time, for ``evaluation.json``'s ``tta`` block."""
    from finetune.calibration import calibration_metrics

    probs, labels = torch.as_tensor(probs).float(), torch.as_tensor(labels).long()
    top1 = float((probs.argmax(1) == labels).float().mean()) if len(labels) else None
    measured = calibration_metrics(probs, labels)
    return {"top1": top1, "nll": measured["nll"], "ece": measured["ece"], "seconds": round(seconds, 3),
            "images_per_s": round(len(labels) / seconds, 1) if seconds > 0 else None}


def format_tta(block: dict[str, Any]) -> str:
    """``tta hflip     top-1 97.50% in 2.31 s   (none: top-1 97.22% in 1.10 s)``, or the plain pass alone."""

    def one(s: dict[str, Any]) -> str:
        top1 = "-" if s["top1"] is None else f"{100 * s['top1']:.2f}%"
        return f"top-1 {top1} in {s['seconds']:.2f} s"

    mode = block["mode"]
    line = f"tta {mode:<10} {one(block[mode])}"
    return line if mode == "none" else f"{line}   (none: {one(block['none'])})"
