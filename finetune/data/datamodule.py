"""ImageDataModule: labelled images -> albumentations -> (images, labels) batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from finetune.data.augment import AugmentConfig, build_ops, resolve_augment
from finetune.data.images import load_image
from finetune.data.scan import check_on_bad_image
from finetune.data.sources import DataSplits, Source, Split, build_source
from finetune.data.sources.base import check_fields
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
    """Preprocessing from a timm model's pretrained config (``name`` or ``name.tag``), without building it.

    The same dict as ``timm.data.resolve_model_data_config(timm.create_model(backbone))``: a
    model without a registered pretrained config gets timm's defaults, as its model would.
    """
    import timm
    from timm.models import PretrainedCfg

    from finetune.backbones import check_backbone_name

    check_backbone_name(backbone)
    try:
        cfg = timm.get_pretrained_cfg(backbone)
    except RuntimeError as e:  # a tag the architecture does not have
        raise FineTuneError(f"backbone '{backbone}': {e}") from None
    return timm.data.resolve_data_config(pretrained_cfg=(cfg or PretrainedCfg()).to_dict())


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


@dataclass
class _Given(Source):
    """Ready :class:`DataSplits` take the fields every source shares; not a ``data=`` option (not registered)."""

    source: str = "given"
    num_workers: int = 0  # the caller built the splits in this process, usually as arrays: workers would copy them


def _resolve_source(source: str | Source | DataSplits, kwargs: dict[str, Any]) -> tuple[Source, DataSplits | None]:
    """The source config with ``kwargs`` applied, and the splits when they are given ready."""
    if isinstance(source, DataSplits):
        check_fields(_Given, kwargs, what="ready DataSplits")
        return _Given(**kwargs), source
    if isinstance(source, Source):
        check_fields(type(source), kwargs)
        return dataclasses.replace(source, **kwargs), None
    return build_source(str(source), **kwargs), None


# SplitLoaders first: its hooks replace LightningDataModule's placeholders.
class ImageDataModule(SplitLoaders, pl.LightningDataModule):
    """Labelled images for fine-tuning, preprocessed the way the backbone was pretrained.

    Args:
        source: a registered source name (``digits``, ``folder``, ``csv``, ... see
            :data:`~finetune.data.sources.SOURCES`), a :class:`~finetune.data.sources.Source`,
            or ready :class:`DataSplits` (which are used as they are: not scanned for bad images).
        backbone: timm model name whose pretrained config gives ``image_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct`` and ``crop_mode`` where the source does not set them.
        augment: a preset name (``none``, ``light``, ``medium``, ``heavy``), an
            :class:`~finetune.data.augment.AugmentConfig`, or a mapping of its fields.
        seed: seed of the splits, the train-time augmentation and the weighted sampler.
        **kwargs: the source's own fields (``root=``, ``val_fraction=``, ``image_size=``,
            ``batch_size=``, ...); for ready splits, the fields every source shares.
    """

    def __init__(
        self,
        source: str | Source | DataSplits = "digits",
        *,
        backbone: str | None = None,
        augment: str | AugmentConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        src, self._data = _resolve_source(source, kwargs)
        defaults = backbone_data_config(backbone) if backbone else {}
        self.image_size = int(src.image_size or defaults.get("input_size", (3, 224, 224))[-1])
        self.mean = tuple(src.mean or defaults.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(src.std or defaults.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = src.interpolation or defaults.get("interpolation", "bicubic")
        self.crop_pct = float(src.crop_pct or defaults.get("crop_pct", 0.875))
        self.crop_mode = str(defaults.get("crop_mode", "center"))
        self.scale, self.ratio, self.hflip = tuple(src.scale), tuple(src.ratio), float(src.hflip)
        self.augment = resolve_augment(augment)
        build_ops(self.augment.ops)  # bad ops fail here, not in the first training step
        self.batch_size, self.num_workers = src.batch_size, src.num_workers
        self.seed = seed
        if src.sampler not in (None, "weighted"):
            raise FineTuneError(f"unknown sampler '{src.sampler}'; choose null or weighted (data.sampler)")
        self.sampler = src.sampler
        self.on_bad_image = check_on_bad_image(src.on_bad_image)  # now, not when the data is first read
        # A source that draws its images at the input size (photos) sees the size resolved from the backbone.
        self.source = dataclasses.replace(src, image_size=self.image_size)
        self.bad_images: list[tuple[Path, str]] = []
        self.datasets: dict[str, ImageDataset] = {}

    # Scanning is cheap and deterministic, so it happens on first use in any process.
    @property
    def data(self) -> DataSplits:
        if self._data is None:
            from finetune.data.scan import check_split_images

            # A fast scan of every image file, so a corrupt file stops the run before training, not mid-epoch.
            self._data, self.bad_images = check_split_images(self.source.load(self.seed), self.on_bad_image)
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
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    @property
    def train_is_deterministic(self) -> bool:
        """Whether train images go through the same pipeline every epoch (``augment.no_aug``: ``augment=none``)."""
        return self.augment.no_aug

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        eval_t = self._eval_transform()
        train_t = eval_t if self.train_is_deterministic else train_transform(
            self.image_size, self.mean, self.std, self.scale, self.ratio, self.hflip, self.interpolation,
            extra=build_ops(self.augment.ops),
        )
        # albumentations draws from each Compose's own generator, which seed_everything does not reach;
        # unseeded it takes OS entropy, and two runs of one config crop differently and end differently.
        train_t.set_random_seed(self.seed)
        for name, split in self.data.splits.items():
            self.datasets[name] = ImageDataset(split, train_t if name == "train" else eval_t)

    def _eval_transform(self) -> Any:
        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation, self.crop_mode)

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

