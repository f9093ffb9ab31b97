"""albumentations pipelines, normalized with the backbone's pretrained mean/std."""

from __future__ import annotations

import math
from typing import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from finetune.errors import FineTuneError

__all__ = ["CROP_MODES", "INTERPOLATIONS", "eval_transform", "train_transform"]

# timm's interpolation names -> OpenCV flags.
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _interp(name: str) -> int:
    return INTERPOLATIONS.get(name, cv2.INTER_CUBIC)


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    extra: Sequence[A.BasicTransform] = (),
) -> A.Compose:
    """Random resized crop and horizontal flip (timm's names for the knobs), then ``extra`` ops."""
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(image_size, image_size),
            scale=tuple(scale),
            ratio=tuple(ratio),
            interpolation=_interp(interpolation),
        )
    ]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    ops += list(extra)
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


CROP_MODES = ("center", "squash", "border")


def eval_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    crop_mode: str = "center",
) -> A.Compose:
    """Resize to ``image_size / crop_pct``, then crop to ``image_size`` (deterministic).

    ``crop_mode`` is the pretrained config's, with the semantics of timm's
    ``transforms_imagenet_eval``:

    - ``center``: resize the short side, keep the aspect ratio, center crop (the long side's
      edges are lost);
    - ``squash``: resize both sides (the aspect ratio is not kept), center crop; with
      ``crop_pct=1`` no pixel is lost;
    - ``border``: resize the long side, keep the aspect ratio, pad the short side with the
      mean color, center crop; with ``crop_pct=1`` no pixel is lost.
    """
    resize = int(math.floor(image_size / crop_pct))
    interp = _interp(interpolation)
    if crop_mode == "center":
        ops: list[A.BasicTransform] = [A.SmallestMaxSize(max_size=resize, interpolation=interp)]
    elif crop_mode == "squash":
        ops = [A.Resize(height=resize, width=resize, interpolation=interp)]
    elif crop_mode == "border":
        # timm pads with the mean color (in 0..255), so padding normalizes to zero.
        fill = tuple(float(round(255 * m)) for m in mean)
        ops = [
            A.LongestMaxSize(max_size=resize, interpolation=interp),
            A.PadIfNeeded(min_height=image_size, min_width=image_size, border_mode=cv2.BORDER_CONSTANT, fill=fill),
        ]
    else:
        raise FineTuneError(f"unknown crop_mode '{crop_mode}'; choose one of {', '.join(CROP_MODES)}")
    return A.Compose(
        [
            *ops,
            A.CenterCrop(height=image_size, width=image_size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
