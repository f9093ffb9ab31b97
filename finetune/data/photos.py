"""A small natural-image dataset from scikit-image's bundled colour photographs.

One class per photograph; each item is a seeded random crop of it, resized to a square.
The photographs ship inside the scikit-image wheel, so nothing is downloaded: this gives
tests and benchmarks real photographic statistics (unlike generated noise images) offline.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from finetune.errors import FineTuneError

__all__ = ["DEFAULT_PHOTOS", "PHOTOS", "load_photo", "photo_crops", "write_photo_folder"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle_left() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


# Natural RGB photographs whose files are in the scikit-image distribution itself
# (skimage.data fetches others, e.g. eagle or lily, from the network or a pooch cache).
# Left out: grayscale images, microscopy/medical ones (retina, immunohistochemistry), the
# Hubble field, and motorcycle_right (nearly the same picture as motorcycle_left).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "motorcycle_left": _motorcycle_left,
    "rocket": _skimage("rocket"),
}
DEFAULT_PHOTOS: tuple[str, ...] = tuple(PHOTOS)


def load_photo(name: str) -> np.ndarray:
    """The full photograph ``name`` as a uint8 RGB array."""
    if name not in PHOTOS:
        raise FineTuneError(f"unknown photo '{name}'; choose from {', '.join(PHOTOS)}")
    try:
        image = np.asarray(PHOTOS[name]())
    except Exception as e:  # a stripped scikit-image install would try to download
        raise FineTuneError(f"cannot load scikit-image photo '{name}': {e}") from None
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _check(per_class: int, size: int, min_scale: float, max_scale: float, flip: float) -> None:
    if per_class < 1:
        raise FineTuneError(f"per_class must be at least 1, got {per_class}")
    if size < 1:
        raise FineTuneError(f"crop size must be at least 1 px, got {size}")
    if not 0 < min_scale <= max_scale <= 1:
        raise FineTuneError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale} and {max_scale}")
    if not 0 <= flip <= 1:
        raise FineTuneError(f"flip is a probability in [0, 1], got {flip}")


def _crops_of(
    image: np.ndarray, rng: np.random.Generator, n: int, size: int, min_scale: float, max_scale: float, flip: float
) -> list[np.ndarray]:
    h, w = image.shape[:2]
    short = min(h, w)
    sides = np.maximum(1, np.round(rng.uniform(min_scale, max_scale, n) * short)).astype(int)
    # Top-left corners uniform over every position where the box fits.
    ys = np.floor(rng.random(n) * (h - sides + 1)).astype(int)
    xs = np.floor(rng.random(n) * (w - sides + 1)).astype(int)
    flips = rng.random(n) < flip
    pil = Image.fromarray(image)
    crops = []
    for side, y, x, f in zip(sides, ys, xs, flips):
        crop = pil.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + side, y + side))
        if f:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(np.asarray(crop))
    return crops


def photo_crops(
    per_class: int = 60,
    size: int = 224,
    seed: int = 0,
    photos: Sequence[str] | None = None,
    min_scale: float = 0.3,
    max_scale: float = 0.7,
    flip: float = 0.5,
) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """Class names, ``per_class`` crops of each photo (uint8 RGB, ``size`` x ``size``) and labels.

    A crop is a square box with side ``min_scale``..``max_scale`` of the photo's shorter side,
    at a uniform position, resized with PIL bicubic and mirrored with probability ``flip``.
    Each photo draws from its own generator seeded by ``seed`` and the photo's name, so its
    crops do not change when other photos are added or reordered, and crop ``k`` is the same
    for any ``per_class`` above ``k``.
    """
    names = list(DEFAULT_PHOTOS if photos is None else photos)
    if len(names) < 2:
        raise FineTuneError(f"photos needs at least 2 photos (one class each), got {names}")
    if len(set(names)) != len(names):
        raise FineTuneError(f"photos lists a photo twice: {names}")
    _check(per_class, size, min_scale, max_scale, flip)
    items: list[np.ndarray] = []
    for name in names:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        items += _crops_of(load_photo(name), rng, per_class, size, min_scale, max_scale, flip)
    labels = np.repeat(np.arange(len(names), dtype=np.int64), per_class)
    return names, items, labels


def write_photo_folder(
    root: str | Path,
    per_class: int = 60,
    size: int = 224,
    seed: int = 0,
    photos: Sequence[str] | None = None,
) -> Path:
    """Write :func:`photo_crops` as ``root/<photo>/<index>.png`` (the ``folder`` source's layout)."""
    root = Path(root)
    names, items, labels = photo_crops(per_class=per_class, size=size, seed=seed, photos=photos)
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (item, label) in enumerate(zip(items, labels)):
        Image.fromarray(item).save(root / names[label] / f"{i % per_class:04d}.png")
    return root
