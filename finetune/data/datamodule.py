"""ImageDataModule: labelled images -> albumentations -> (images, labels) batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data.images import load_image
from finetune.data.sources import DataSplits, Split, build_source
from finetune.data.transforms import eval_transform, train_transform

__all__ = ["ImageDataModule", "ImageDataset", "backbone_data_config"]


class ImageDataset(Dataset):
    """Items that are uint8 RGB arrays or image paths, with integer labels."""

    def __init__(self, split: Split, transform: Any) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.split.items[i]
        image = item if isinstance(item, np.ndarray) else load_image(item)
        return self.transform(image=image)["image"], int(self.split.labels[i])


def backbone_data_config(backbone: str) -> dict[str, Any]:
    """Preprocessing from a timm model's pretrained config, without building the model."""
    import timm

    from finetune.backbones import check_backbone_name

    check_backbone_name(backbone)
    model = timm.create_model(backbone, pretrained=False, num_classes=0)
    return timm.data.resolve_model_data_config(model)


class ImageDataModule(pl.LightningDataModule):
    """Labelled images for fine-tuning, preprocessed the way the backbone was pretrained.

    Args:
        source: ``digits``, ``folder``, or ready :class:`DataSplits`.
        root: the folder, for ``source="folder"``.
        backbone: timm model name whose pretrained config gives ``image_size``, ``mean``,
            ``std``, ``interpolation`` and ``crop_pct`` where they are not given.
        image_size: input size in pixels (square).
        mean, std: normalization, in 0..1 units.
        interpolation: ``bicubic``, ``bilinear``, ...
        crop_pct: eval resize is ``image_size / crop_pct`` before the center crop.
        scale, ratio, hflip: train augmentation (random resized crop, horizontal flip).
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes.
        val_fraction, test_fraction: held-out fractions where the source splits itself.
        seed: seed of the splits.
    """

    def __init__(
        self,
        source: str | DataSplits = "digits",
        root: str | os.PathLike[str] | None = None,
        *,
        backbone: str | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        defaults = backbone_data_config(backbone) if backbone else {}
        self.image_size = int(image_size or defaults.get("input_size", (3, 224, 224))[-1])
        self.mean = tuple(mean or defaults.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std or defaults.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = interpolation or defaults.get("interpolation", "bicubic")
        self.crop_pct = float(crop_pct or defaults.get("crop_pct", 0.875))
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.batch_size, self.num_workers = batch_size, num_workers
        self._source = source
        self._source_kwargs: dict[str, Any] = {"seed": seed}
        if source == "digits":
            self._source_kwargs.update(val_fraction=val_fraction, test_fraction=test_fraction)
        elif source == "folder":
            self._source_kwargs.update(root=Path(root) if root is not None else None, val_fraction=val_fraction)
        self._data: DataSplits | None = source if isinstance(source, DataSplits) else None
        self.datasets: dict[str, ImageDataset] = {}

    # Scanning is cheap and deterministic, so it happens on first use in any process.
    @property
    def data(self) -> DataSplits:
        if self._data is None:
            self._data = build_source(str(self._source), **self._source_kwargs)
        return self._data

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_test(self) -> bool:
        return "test" in self.data.splits

    def class_counts(self) -> dict[str, list[int]]:
        return {name: s.class_counts(self.num_classes) for name, s in self.data.splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train_t = train_transform(
            self.image_size, self.mean, self.std, self.scale, self.ratio, self.hflip, self.interpolation
        )
        eval_t = eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation)
        for name, split in self.data.splits.items():
            self.datasets[name] = ImageDataset(split, train_t if name == "train" else eval_t)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if self.has_test else "val", shuffle=False)
