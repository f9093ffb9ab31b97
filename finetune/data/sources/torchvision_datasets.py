"""``data=torchvision``: any ``torchvision.datasets`` class whose files are already on disk."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from finetune.data.sources.base import DataSplits, Source, Split, hold_out, register
from finetune.errors import FineTuneError

__all__ = ["TorchvisionDataset", "torchvision_source"]


def _dataset_class(name: str | None) -> type:
    import torchvision.datasets

    if not name:
        raise FineTuneError("data.name is not set; pass a torchvision.datasets class, e.g. data.name=CIFAR10")
    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torchvision.datasets.VisionDataset)):
        import difflib

        names = [n for n in dir(torchvision.datasets) if isinstance(getattr(torchvision.datasets, n), type)]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FineTuneError(f"torchvision.datasets has no dataset class '{name}' (data.name){hint}")
    return cls


def _open(cls: type, root: Path, part: str, download: bool) -> Any:
    """``cls``'s train or test part, for both constructor conventions (``train=bool``, ``split=str``)."""
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        kwargs: dict[str, Any] = {"train": part == "train"}
    elif "split" in params:
        kwargs = {"split": part}
    else:
        raise FineTuneError(
            f"torchvision dataset {cls.__name__} takes neither train= nor split=; use data=folder or data=csv instead"
        )
    try:
        return cls(root=str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError) as e:
        if download:
            raise FineTuneError(
                f"torchvision dataset {cls.__name__} ({part}) could not be downloaded into '{root}': {e}"
            ) from None
        raise FineTuneError(
            f"torchvision dataset {cls.__name__} ({part}): its files are not under '{root}' (data.root); "
            f"data.download=true fetches them"
        ) from None
    except ValueError as e:  # e.g. a split name the class does not know
        raise FineTuneError(f"torchvision dataset {cls.__name__} has no {part} split: {e}") from None


def _as_rgb(images: np.ndarray) -> np.ndarray | None:
    """A uint8 ``(N, H, W, 3)`` block from gray ``(N, H, W)``, HWC or CHW arrays; None for other layouts."""
    if images.dtype != np.uint8:
        return None
    if images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4:
        return None
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):  # SVHN, STL10 store CHW
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images if images.shape[-1] == 3 else None


def _split(dataset: Any) -> Split:
    import torch

    data = getattr(dataset, "data", None)
    targets = getattr(dataset, "targets", getattr(dataset, "labels", None))
    if isinstance(data, torch.Tensor):  # MNIST and its kin keep tensors
        data = data.numpy()
    if isinstance(targets, torch.Tensor):
        targets = targets.numpy()
    rgb = _as_rgb(data) if isinstance(data, np.ndarray) else None
    if rgb is not None and targets is not None and len(rgb) == len(targets) == len(dataset):
        # One contiguous block (views, as for Fashion-MNIST): no per-image PIL round trip.
        return Split(list(np.ascontiguousarray(rgb)), np.asarray(targets, dtype=np.int64))
    items: list[np.ndarray] = []
    labels: list[int] = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        items.append(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8))
        labels.append(int(label))
    return Split(items, np.asarray(labels, dtype=np.int64))


@register("torchvision")
@dataclass
class TorchvisionDataset(Source):
    """A ``torchvision.datasets`` class by name (CIFAR10, MNIST, SVHN, STL10, ...) from files under ``root``.

    ``test`` is the dataset's own test part; ``val`` is held out of its train part.

    Attributes:
        name: the class; it must take ``train=`` or ``split=`` (required).
        root: the ``root=`` the dataset class expects its files under (required).
        download: let torchvision fetch missing files (off: a run never reaches the network unless asked).
        val_fraction: of the train part, stratified and seeded.
    """

    source: str = "torchvision"
    name: Optional[str] = None
    root: Optional[str] = None
    download: bool = False
    batch_size: int = 64
    num_workers: int = 0  # images are decoded into memory up front: workers would only copy them
    val_fraction: float = 0.1

    def load(self, seed: int) -> DataSplits:
        cls = _dataset_class(self.name)
        if self.root is None or str(self.root) == "":
            raise FineTuneError("data.root is not set; pass data.root=DIR (where the dataset's files are)")
        root = Path(self.root).expanduser()
        if self.download:
            root.mkdir(parents=True, exist_ok=True)
        train_set = _open(cls, root, "train", self.download)
        test_set = _open(cls, root, "test", self.download)
        train_all, test = _split(train_set), _split(test_set)
        for part, split in (("train", train_all), ("test", test)):
            if len(split) and split.labels.min() < 0:
                raise FineTuneError(f"torchvision dataset {cls.__name__} ({part}) has unlabelled images (label < 0)")
        num_classes = int(max(train_all.labels.max(initial=-1), test.labels.max(initial=-1))) + 1
        names = getattr(train_set, "classes", None)
        numbered = [str(i) for i in range(num_classes)]
        classes = [str(c) for c in names] if names and len(names) >= num_classes else numbered
        train, val = hold_out(train_all, self.val_fraction, seed)
        return DataSplits(f"torchvision:{cls.__name__}:{root}", classes, {"train": train, "val": val, "test": test})


def torchvision_source(
    name: str | None = None, root: str | os.PathLike[str] | None = None, *, seed: int = 0, **fields: Any
) -> DataSplits:
    """``TorchvisionDataset(name=name, root=root, **fields).load(seed)``."""
    return TorchvisionDataset(name=name, root=root, **fields).load(seed)  # type: ignore[arg-type]
