"""albumentations pipelines, normalized with the backbone's pretrained mean/std."""

from __future__ import annotations

import math
from typing import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

__all__ = ["INTERPOLATIONS", "eval_transform", "train_transform"]

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


def eval_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> A.Compose:
    """Resize the short side to ``image_size / crop_pct``, then center crop (deterministic)."""
    resize = int(math.floor(image_size / crop_pct))
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=resize, interpolation=_interp(interpolation)),
            A.CenterCrop(height=image_size, width=image_size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
