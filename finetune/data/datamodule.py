"""ImageDataModule: labelled images -> albumentations -> (images, labels) batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from finetune.data.augment import build_ops, resolve_augment
from finetune.data.images import load_image
from finetune.data.scan import check_on_bad_image
from finetune.data.sources import DataSplits, Split, build_source
from finetune.data.transforms import eval_transform, train_transform
from finetune.errors import FineTuneError

__all__ = ["ImageDataModule", "ImageDataset", "SplitLoaders", "backbone_data_config"]


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


def _seed_worker_transform(worker_id: int) -> None:
    # Each worker holds a copy of the transform's generator: without a reseed, workers would repeat
    # each other's crops. torch gives every worker of every epoch its own seed, derived from the run's.
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


def backbone_data_config(backbone: str) -> dict[str, Any]:
    """Preprocessing from a timm model's pretrained config, without building the model."""
    import timm

    from finetune.backbones import check_backbone_name

    check_backbone_name(backbone)
    model = timm.create_model(backbone, pretrained=False, num_classes=0)
    return timm.data.resolve_model_data_config(model)


class SplitLoaders:
    """Lightning's four loader hooks from one ``_loader(split, shuffle)``; predictions use test, else val."""

    has_test: bool

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if self.has_test else "val", shuffle=False)


# SplitLoaders first: its hooks replace LightningDataModule's placeholders.
class ImageDataModule(SplitLoaders, pl.LightningDataModule):
    """Labelled images for fine-tuning, preprocessed the way the backbone was pretrained.

    Args:
        source: ``csv``, ``digits``, ``fashion_mnist``, ``folder``, ``photos``, ``torchvision``,
            or ready :class:`DataSplits`.
        root: the folder, for ``source="folder"``; where the dataset's files are, for
            ``source="torchvision"``.
        path: the folder of the IDX files, for ``source="fashion_mnist"`` (None: where Debian's
            ``dataset-fashion-mnist`` installs them); the CSV file, for ``source="csv"``.
        name: for ``torchvision``, the ``torchvision.datasets`` class (``CIFAR10``, ``MNIST``, ...).
        download: for ``torchvision``, let the dataset class fetch missing files (off by default:
            a run never reaches the network unless asked to).
        train_per_class: for ``fashion_mnist``, keep a seeded random N training images per class
            (None: all); val and test stay whole.
        per_class: for ``photos``, crops per photograph (before splitting); crops are made at
            ``image_size``.
        photos: for ``photos``, the scikit-image photograph names (None: all natural ones).
        backbone: timm model name whose pretrained config gives ``image_size``, ``mean``,
            ``std``, ``interpolation`` and ``crop_pct`` where they are not given.
        image_size: input size in pixels (square).
        mean, std: normalization, in 0..1 units.
        interpolation: ``bicubic``, ``bilinear``, ...
        crop_pct: eval resize is ``image_size / crop_pct`` before the center crop.
        scale, ratio, hflip: train augmentation (random resized crop, horizontal flip).
        augment: preset ``none``, ``light`` (scale/ratio/hflip only), ``medium``, ``heavy``, or
            a mapping ``{"name": ..., "ops": {op: {"_target_": "albumentations.X", ...}}}``;
            ``none`` trains on the deterministic eval pipeline.
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes.
        val_fraction, test_fraction: held-out fractions where the source splits itself
            (``fashion_mnist`` has an official test set and uses only ``val_fraction``).
        seed: seed of the splits (and of the weighted sampler).
        on_bad_image: ``error`` (default): an unreadable image file stops the run before training,
            named; ``skip``: such files are left out, counted in the notes and listed in
            :attr:`bad_images`.
        sampler: None (shuffle), or ``weighted``: draw train images with replacement, each with
            weight 1 / (images of its class), so every class is drawn about equally often
            (``len(train)`` draws per epoch).
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
        augment: str | Mapping[str, Any] | None = "light",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        path: str | os.PathLike[str] | None = None,
        train_per_class: int | None = None,
        per_class: int = 60,
        photos: Sequence[str] | None = None,
        name: str | None = None,
        download: bool = False,
        sampler: str | None = None,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__()
        defaults = backbone_data_config(backbone) if backbone else {}
        self.image_size = int(image_size or defaults.get("input_size", (3, 224, 224))[-1])
        self.mean = tuple(mean or defaults.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std or defaults.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = interpolation or defaults.get("interpolation", "bicubic")
        self.crop_pct = float(crop_pct or defaults.get("crop_pct", 0.875))
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.augment = resolve_augment(augment)
        build_ops(self.augment["ops"])  # bad ops fail here, not in the first training step
        self.batch_size, self.num_workers = batch_size, num_workers
        self._source = source
        self.seed = seed
        self._source_kwargs: dict[str, Any] = {"seed": seed}
        if source == "digits":
            self._source_kwargs.update(val_fraction=val_fraction, test_fraction=test_fraction)
        elif source == "folder":
            self._source_kwargs.update(root=Path(root) if root is not None else None, val_fraction=val_fraction)
        elif source == "fashion_mnist":
            self._source_kwargs.update(path=path, val_fraction=val_fraction, train_per_class=train_per_class)
        elif source == "csv":
            self._source_kwargs.update(path=path, val_fraction=val_fraction)
        elif source == "torchvision":
            self._source_kwargs.update(name=name, root=root, download=download, val_fraction=val_fraction)
        elif source == "photos":
            self._source_kwargs.update(
                per_class=per_class,
                size=self.image_size,
                photos=list(photos) if photos is not None else None,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
            )
        if sampler not in (None, "weighted"):
            raise FineTuneError(f"unknown sampler '{sampler}'; choose null or weighted (data.sampler)")
        self.sampler = sampler
        self.on_bad_image = check_on_bad_image(on_bad_image)  # now, not when the data is first read
        self.bad_images: list[tuple[Path, str]] = []
        self._data: DataSplits | None = source if isinstance(source, DataSplits) else None
        self.datasets: dict[str, ImageDataset] = {}

    # Scanning is cheap and deterministic, so it happens on first use in any process.
    @property
    def data(self) -> DataSplits:
        if self._data is None:
            from finetune.data.scan import check_split_images

            # A fast scan of every image file, so a corrupt file stops the run before training, not mid-epoch.
            built = build_source(str(self._source), **self._source_kwargs)
            self._data, self.bad_images = check_split_images(built, self.on_bad_image)
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

    @property
    def data_config(self) -> dict[str, Any]:
        """The eval preprocessing, in timm's ``data_config`` names (saved in checkpoints for predict)."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    @property
    def train_is_deterministic(self) -> bool:
        """Whether train images are preprocessed the same way every epoch (``augment=none``)."""
        return self.augment["name"] == "none"

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        eval_t = self._eval_transform()
        train_t = eval_t if self.train_is_deterministic else train_transform(
            self.image_size, self.mean, self.std, self.scale, self.ratio, self.hflip, self.interpolation,
            extra=build_ops(self.augment["ops"]),
        )
        # albumentations draws from each Compose's own generator, which seed_everything does not reach;
        # unseeded it takes OS entropy, and two runs of one config crop differently and end differently.
        train_t.set_random_seed(self.seed)
        for name, split in self.data.splits.items():
            self.datasets[name] = ImageDataset(split, train_t if name == "train" else eval_t)

    def _eval_transform(self) -> Any:
        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation)

    def eval_dataset(self, name: str) -> ImageDataset:
        """Split ``name`` through the deterministic eval pipeline (for measuring, not training)."""
        return ImageDataset(self.data.splits[name], self._eval_transform())

    def train_sampler(self) -> WeightedRandomSampler | None:
        """The train split's sampler for ``sampler="weighted"`` (None: plain shuffling)."""
        if self.sampler != "weighted":
            return None
        labels = self.data.splits["train"].labels
        per_sample = 1.0 / np.bincount(labels)[labels]
        generator = torch.Generator().manual_seed(self.seed)
        return WeightedRandomSampler(per_sample.tolist(), len(labels), replacement=True, generator=generator)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        sampler = self.train_sampler() if name == "train" else None
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_seed_worker_transform,
        )

