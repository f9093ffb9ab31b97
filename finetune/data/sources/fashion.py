"""``data=fashion_mnist``: Zalando's Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from finetune.data.sources.base import DataSplits, Source, Split, hold_out, per_class_subset, register, rgb_split
from finetune.data.sources.idx import read_idx
from finetune.errors import FineTuneError

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FashionMNIST", "fashion_mnist"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _idx_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FineTuneError(f"Fashion-MNIST file '{name}.gz' (or '{name}') is missing from '{root}'")


def _part(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"), 3)
    labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    labels = read_idx(labels_path, 1)
    if len(labels) != len(images):
        raise FineTuneError(f"'{labels_path}' has {len(labels)} labels for {len(images)} images")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise FineTuneError(f"'{labels_path}' has label {labels.max()}; Fashion-MNIST labels are 0..9")
    return images, labels.astype(np.int64)


def _rgb(gray: Split) -> Split:
    return rgb_split(np.stack(gray.items) if len(gray) else np.zeros((0, 28, 28), np.uint8), gray.labels)


@register("fashion_mnist")
@dataclass
class FashionMNIST(Source):
    """70,000 28x28 grayscale clothes, 10 classes; ``test`` is the official 10,000-image test set.

    Attributes:
        path: a folder with the four IDX files (gzipped or not); None: ``FASHION_MNIST_DIR``.
        val_fraction: of the 60,000 training images, stratified and seeded.
        train_per_class: N: train on a seeded random N images per class (val and test stay whole,
            so runs with different N are scored on the same images; a smaller N picks a subset of
            a larger one); None: all.
    """

    source: str = "fashion_mnist"
    path: Optional[str] = None
    # 28 px originals: 32 keeps every pixel and suits a CNN's 32x stride; more is only compute.
    image_size: Optional[int] = 32
    # Garments fill the frame: a crop must keep sleeves, collar and hem, which tell the classes apart.
    scale: List[float] = field(default_factory=lambda: [0.8, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.9, 1.1])
    hflip: float = 0.5  # a mirrored garment or bag keeps its class (shoes all face left: harmless extra invariance)
    batch_size: int = 128
    # In-memory 28 px arrays: transforms cost far less than a step; workers would compete for cores.
    num_workers: int = 0
    val_fraction: float = 0.1
    train_per_class: Optional[int] = None

    def load(self, seed: int) -> DataSplits:
        root = Path(self.path).expanduser() if self.path not in (None, "") else FASHION_MNIST_DIR
        if not root.is_dir():
            if root == FASHION_MNIST_DIR:
                raise FineTuneError(
                    f"Fashion-MNIST folder '{root}' does not exist; install it with "
                    "`apt-get install dataset-fashion-mnist` or pass data.path=DIR"
                )
            raise FineTuneError(f"Fashion-MNIST folder '{root}' does not exist (data.path)")
        train_gray, train_labels = _part(root, "train")
        test_gray, test_labels = _part(root, "t10k")

        train, val = hold_out(Split(list(train_gray), train_labels), self.val_fraction, seed)
        train, notes = per_class_subset(train, self.train_per_class, seed, len(FASHION_MNIST_CLASSES))
        splits = {"train": _rgb(train), "val": _rgb(val), "test": rgb_split(test_gray, test_labels)}
        return DataSplits(f"fashion_mnist:{root}", list(FASHION_MNIST_CLASSES), splits, notes)


def fashion_mnist(path: str | Path | None = None, *, seed: int = 0, **fields: Any) -> DataSplits:
    """``FashionMNIST(path=path, **fields).load(seed)``."""
    return FashionMNIST(path=path, **fields).load(seed)  # type: ignore[arg-type]
