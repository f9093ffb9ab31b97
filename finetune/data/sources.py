"""Where labelled images come from, split into train/val(/test).

A source returns :class:`DataSplits`: class names plus, per split, items (decoded
uint8 RGB arrays, or image file paths read lazily) and integer labels. Splits are
stratified and seeded, so every run of a sweep sees the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.model_selection import train_test_split

from finetune.data.images import is_image_file
from finetune.errors import FineTuneError

__all__ = ["SOURCES", "DataSplits", "Split", "build_source", "digits", "folder", "stratified_split"]


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
    everything = Split(list(images), labels)
    rest, test = stratified_split(labels, test_fraction, seed, "test")
    rest_split = everything.subset(rest)
    train, val = stratified_split(rest_split.labels, val_fraction / (1 - test_fraction), seed, "validation")
    splits = {"train": rest_split.subset(train), "val": rest_split.subset(val)}
    if len(test):
        splits["test"] = everything.subset(test)
    return DataSplits("digits", [str(i) for i in range(10)], splits)


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


SOURCES: dict[str, Callable[..., DataSplits]] = {"digits": digits, "folder": folder}


def build_source(name: str, **kwargs: Any) -> DataSplits:
    """Build a source by name with its own keyword arguments."""
    if name not in SOURCES:
        raise FineTuneError(f"unknown data source '{name}'; choose one of {', '.join(SOURCES)}")
    return SOURCES[name](**kwargs)
