"""Where labelled images come from, split into train/val(/test).

A source returns :class:`DataSplits`: class names plus, per split, items (decoded
uint8 RGB arrays, or image file paths read lazily) and integer labels. Splits are
stratified and seeded, so every run of a sweep sees the same images.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from finetune.data.images import is_image_file
from finetune.data.photos import photo_crops
from finetune.errors import FineTuneError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "SOURCES",
    "DataSplits",
    "Split",
    "build_source",
    "digits",
    "fashion_mnist",
    "folder",
    "photos",
    "read_idx",
    "stratified_split",
]


@dataclass
class Split:
    """Items (arrays or paths) and their integer labels."""

    items: list[Any]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split([self.items[i] for i in idx], self.labels[idx])

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class DataSplits:
    """Class names, splits by name (``train``, ``val``, optional ``test``) and notes for the summary."""

    name: str
    classes: list[str]
    splits: dict[str, Split]
    notes: list[str] = field(default_factory=list)


def stratified_split(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, split off) with ``fraction`` of each class split off."""
    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        raise FineTuneError(f"cannot split off a {what} set: some class has only 1 image (need at least 2 per class)")
    try:
        kept, split = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as e:
        raise FineTuneError(f"cannot split off a {what} set of fraction {fraction}: {e}") from None
    return np.sort(kept), np.sort(split)


def digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are 0..16 ink intensity; scale to 8-bit and repeat into RGB.
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    splits = _train_val_test(Split(list(images), labels), val_fraction, test_fraction, seed)
    return DataSplits("digits", [str(i) for i in range(10)], splits)


def _train_val_test(everything: Split, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Split]:
    """Stratified test, then val, split off one pool; fractions are of the whole pool."""
    rest, test = stratified_split(everything.labels, test_fraction, seed, "test")
    rest_split = everything.subset(rest)
    train, val = stratified_split(rest_split.labels, val_fraction / (1 - test_fraction), seed, "validation")
    splits = {"train": rest_split.subset(train), "val": rest_split.subset(val)}
    if len(test):
        splits["test"] = everything.subset(test)
    return splits


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not, as a uint8 array.

    The header is two zero bytes, the type code ``0x08`` (unsigned byte), the number of
    dimensions, then each dimension as a big-endian int32.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise FineTuneError(f"cannot read IDX file '{path}': {e}") from None
    magic = raw[:4]
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise FineTuneError(
            f"'{path}' is not an IDX file of {ndim}-d unsigned bytes (magic {magic.hex() or 'missing'}, "
            f"expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FineTuneError(f"IDX file '{path}' is truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if len(raw) - header != int(np.prod(shape)):
        raise FineTuneError(
            f"IDX file '{path}' holds {len(raw) - header} bytes of data; its header {shape} says {int(np.prod(shape))}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FineTuneError(f"Fashion-MNIST file '{name}.gz' (or '{name}') is missing from '{root}'")


def _fashion_part(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"), 3)
    labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    labels = read_idx(labels_path, 1)
    if len(labels) != len(images):
        raise FineTuneError(f"'{labels_path}' has {len(labels)} labels for {len(images)} images")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise FineTuneError(f"'{labels_path}' has label {labels.max()}; Fashion-MNIST labels are 0..9")
    return images, labels.astype(np.int64)


def _rgb_split(gray: np.ndarray, labels: np.ndarray) -> Split:
    # One contiguous block, items are views into it: 70k separate arrays would be slower to build.
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    return Split(list(rgb), labels)


def fashion_mnist(
    path: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_per_class: int | None = None,
) -> DataSplits:
    """Zalando's Fashion-MNIST (28x28 grayscale clothes, 10 classes) from its IDX files.

    ``test`` is the official 10,000-image test set; ``val`` is a stratified, seeded
    ``val_fraction`` of the 60,000 training images. ``train_per_class`` then keeps a seeded
    random ``N`` of each class in ``train`` (val and test stay whole, so runs with different
    ``N`` are scored on the same images; a smaller ``N`` picks a subset of a larger one).
    """
    root = Path(path).expanduser() if path not in (None, "") else FASHION_MNIST_DIR
    if not root.is_dir():
        if root == FASHION_MNIST_DIR:
            raise FineTuneError(
                f"Fashion-MNIST folder '{root}' does not exist; install it with "
                "`apt-get install dataset-fashion-mnist` or pass data.path=DIR"
            )
        raise FineTuneError(f"Fashion-MNIST folder '{root}' does not exist (data.path)")
    if train_per_class is not None and train_per_class < 1:
        raise FineTuneError(f"train_per_class must be at least 1 (or null for all), got {train_per_class}")
    train_gray, train_labels = _fashion_part(root, "train")
    test_gray, test_labels = _fashion_part(root, "t10k")

    kept, val = stratified_split(train_labels, val_fraction, seed, "validation")
    notes: list[str] = []
    if train_per_class is not None:
        order = kept[np.random.default_rng(seed).permutation(len(kept))]
        per_class = [order[train_labels[order] == c][:train_per_class] for c in range(len(FASHION_MNIST_CLASSES))]
        kept = np.sort(np.concatenate(per_class))
        notes.append(f"train: {train_per_class} image(s) per class kept (train_per_class)")
    splits = {
        "train": _rgb_split(train_gray[kept], train_labels[kept]),
        "val": _rgb_split(train_gray[val], train_labels[val]),
        "test": _rgb_split(test_gray, test_labels),
    }
    return DataSplits(f"fashion_mnist:{root}", list(FASHION_MNIST_CLASSES), splits, notes)


def photos(
    per_class: int = 60,
    size: int = 224,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
    photos: Sequence[str] | None = None,
) -> DataSplits:
    """Seeded random crops of scikit-image's bundled colour photographs, one class per photo.

    See :func:`finetune.data.photos.photo_crops` for how crops are drawn.
    """
    names, items, labels = photo_crops(per_class=per_class, size=size, seed=seed, photos=photos)
    splits = _train_val_test(Split(items, labels), val_fraction, test_fraction, seed)
    return DataSplits("photos", names, splits)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, classes: list[str], notes: list[str], what: str) -> Split:
    items: list[Path] = []
    labels: list[int] = []
    index = {c: i for i, c in enumerate(classes)}
    ignored = 0
    for d in _class_dirs(root):
        if d.name not in index:
            raise FineTuneError(f"class folder '{d}' in {what} is not among the training classes {classes}")
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if is_image_file(p)]
        ignored += len(files) - len(images)
        if not images:
            raise FineTuneError(f"class folder '{d}' holds no images")
        items += images
        labels += [index[d.name]] * len(images)
    if ignored:
        notes.append(f"{what}: ignored {ignored} file(s) without an image extension")
    return Split(items, np.asarray(labels, dtype=np.int64))


def folder(root: str | Path | None, val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """An image folder: ``root/<class>/*`` or ``root/train/<class>``, ``root/val/<class>``, ``root/test/<class>``.

    In the first layout a stratified, seeded ``val_fraction`` of each class is held out.
    """
    if root is None or str(root) == "":
        raise FineTuneError("data.root is not set; pass data.root=DIR")
    root = Path(root).expanduser()
    if not root.exists():
        raise FineTuneError(f"data root '{root}' does not exist")
    if not root.is_dir():
        raise FineTuneError(f"data root '{root}' is not a directory")
    notes: list[str] = []
    split_layout = (root / "train").is_dir()
    train_root = root / "train" if split_layout else root
    classes = [d.name for d in _class_dirs(train_root)]
    if len(classes) < 2:
        raise FineTuneError(
            f"data root '{train_root}' has {len(classes)} class folder(s); need at least 2 (one folder per class)"
        )
    train = _scan(train_root, classes, notes, "train")
    splits: dict[str, Split] = {}
    if split_layout and (root / "val").is_dir():
        splits = {"train": train, "val": _scan(root / "val", classes, notes, "val")}
    else:
        kept, held = stratified_split(train.labels, val_fraction, seed, "validation")
        splits = {"train": train.subset(kept), "val": train.subset(held)}
    if split_layout and (root / "test").is_dir():
        splits["test"] = _scan(root / "test", classes, notes, "test")
    return DataSplits(f"folder:{root}", classes, splits, notes)


SOURCES: dict[str, Callable[..., DataSplits]] = {
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "folder": folder,
    "photos": photos,
}


def build_source(name: str, **kwargs: Any) -> DataSplits:
    """Build a source by name with its own keyword arguments."""
    if name not in SOURCES:
        raise FineTuneError(f"unknown data source '{name}'; choose one of {', '.join(SOURCES)}")
    return SOURCES[name](**kwargs)
