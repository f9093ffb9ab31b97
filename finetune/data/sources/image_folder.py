"""``data=folder``: an image folder, ``ROOT/<class>/*`` or ``ROOT/train|val|test/<class>/*``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from finetune.data.images import is_image_file
from finetune.data.sources.base import DataSplits, Source, Split, hold_out, register
from finetune.errors import FineTuneError

__all__ = ["Folder", "folder"]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _hidden(path: Path, root: Path) -> bool:
    """Whether any part of ``path`` below ``root`` is hidden (``.DS_Store``, ``.ipynb_checkpoints/x.png``)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _scan(root: Path, classes: list[str], notes: list[str], what: str) -> Split:
    items: list[Path] = []
    labels: list[int] = []
    index = {c: i for i, c in enumerate(classes)}
    hidden = not_images = 0
    for d in _class_dirs(root):
        if d.name not in index:
            raise FineTuneError(f"class folder '{d}' in {what} is not among the training classes {classes}")
        files = sorted(p for p in d.rglob("*") if p.is_file())
        # Hidden folders hold editor and notebook copies (.ipynb_checkpoints) of images that are
        # already there: training on them would count an image twice, or leak it into val.
        visible = [p for p in files if not _hidden(p, d)]
        images = [p for p in visible if is_image_file(p)]
        hidden += len(files) - len(visible)
        not_images += len(visible) - len(images)
        if not images:
            raise FineTuneError(f"class folder '{d}' holds no images")
        items += images
        labels += [index[d.name]] * len(images)
    if not_images:
        notes.append(f"{what}: ignored {not_images} file(s) without an image extension")
    if hidden:
        notes.append(f"{what}: ignored {hidden} hidden file(s) or file(s) in hidden folders")
    return Split(items, np.asarray(labels, dtype=np.int64))


@register("folder")
@dataclass
class Folder(Source):
    """An image folder: ``root/<class>/*`` or ``root/train/<class>``, ``root/val/<class>``, ``root/test/<class>``.

    Files and folders whose names start with ``.`` are skipped (and counted in the notes).

    Attributes:
        root: the folder (required).
        val_fraction: in the first layout (or without ``root/val``), the stratified, seeded
            fraction of each class held out as val.
    """

    source: str = "folder"
    root: Optional[str] = None
    val_fraction: float = 0.2

    def load(self, seed: int) -> DataSplits:
        if self.root is None or str(self.root) == "":
            raise FineTuneError("data.root is not set; pass data.root=DIR")
        root = Path(self.root).expanduser()
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
        if split_layout and (root / "val").is_dir():
            splits = {"train": train, "val": _scan(root / "val", classes, notes, "val")}
        else:
            kept, held = hold_out(train, self.val_fraction, seed)
            splits = {"train": kept, "val": held}
        if split_layout and (root / "test").is_dir():
            splits["test"] = _scan(root / "test", classes, notes, "test")
        return DataSplits(f"folder:{root}", classes, splits, notes)


def folder(root: str | os.PathLike[str] | None = None, *, seed: int = 0, **fields: Any) -> DataSplits:
    """``Folder(root=root, **fields).load(seed)``."""
    return Folder(root=root, **fields).load(seed)  # type: ignore[arg-type]
