"""Reading image files into 3-channel uint8 RGB arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from finetune.errors import FineTuneError

__all__ = ["IMG_EXTENSIONS", "UnreadableImage", "is_image_file", "load_image", "to_rgb"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, 16-bit and RGBA images as 8-bit RGB.

    Transparent pixels are composited over white: RGB values under alpha=0 are
    arbitrary (often black), and dropping alpha would expose them.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path: str | Path) -> np.ndarray:
    """Open ``path``, apply its EXIF orientation, and return an HxWx3 uint8 array."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return np.asarray(to_rgb(img), dtype=np.uint8)


class UnreadableImage(FineTuneError):
    """An image file that fails to decode while it is read for a batch, named in one line.

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``UnreadableImage("Caught UnreadableImage in DataLoader worker process 0. Original Traceback...")``:
    the traceback's last line holds the original message, which is kept instead.
    """

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            marker = f"{type(self).__name__}: "
            lines = [ln for ln in message.splitlines() if marker in ln]
            message = lines[-1].split(marker, 1)[1] if lines else message
        super().__init__(message)
