"""ImageDataModule: labelled images -> albumentations -> (images, labels) batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.augment import AugmentConfig, build_ops, resolve_augment
from finetune.data.duplicates import Duplicate, check_on_duplicate
from finetune.data.images import UnreadableImage, load_image
from finetune.data.samplers import EpochSampler, first_epoch, seed_worker_transform
from finetune.data.scan import check_on_bad_image
from finetune.data.sources import DataSplits, Source, Split, build_source
from finetune.data.sources.base import check_fields
from finetune.data.transforms import eval_transform, train_transform
from finetune.distributed import shard_order
from finetune.errors import FineTuneError

__all__ = ["ImageDataModule", "ImageDataset", "SplitLoaders", "backbone_data_config"]


# How many following items a failed one may try before ``on_bad_image=skip`` gives up on the split.
_MAX_SUBSTITUTES = 32


class ImageDataset(Dataset):
    """Items that are uint8 RGB arrays or image paths, with integer labels.

    A file that fails to decode here (it passed the scan, or changed since) raises
    :class:`~finetune.data.images.UnreadableImage` naming it (``on_bad_image="error"``), or
    (``"skip"``) is replaced by the next readable item, image and label, so batches keep their
    shape. Either way its flag in :attr:`failed` is set: the flags live in shared memory, so
    DataLoader workers' failures reach the main process (:meth:`failed_items`).
    """

    def __init__(self, split: Split, transform: Any, on_bad_image: str = "error") -> None:
        self.split = split
        self.transform = transform
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.failed = torch.zeros(len(split), dtype=torch.bool)
        try:
            self.failed.share_memory_()
        except RuntimeError:  # no shared memory here: workers could not run either; num_workers=0 still counts
            pass

    def __len__(self) -> int:
        return len(self.split)

    def _image(self, i: int) -> np.ndarray | None:
        item = self.split.items[i]
        if isinstance(item, np.ndarray):
            return item
        if self.failed[i] and self.on_bad_image == "skip":
            return None  # failed in an earlier epoch: the same substitute, without decoding again
        try:
            return load_image(item)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken files
            self.failed[i] = True
            if self.on_bad_image == "error":
                why = " ".join(str(e).split())[:160] or type(e).__name__
                raise UnreadableImage(
                    f"cannot decode image '{item}': {why} (it passed the scan before training: changed since, or "
                    "damaged past the scan's checks); data.on_bad_image=skip leaves such files out"
                ) from None
            return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j, image = i, self._image(i)
        for _ in range(min(_MAX_SUBSTITUTES, len(self) - 1)):
            if image is not None:
                break
            j = (j + 1) % len(self)
            image = self._image(j)
        if image is None:
            raise FineTuneError(
                f"image '{self.split.items[i]}' and the {min(_MAX_SUBSTITUTES, len(self) - 1)} after it cannot be "
                "decoded (data.on_bad_image=skip replaces a few, not a broken data set)"
            )
        return self.transform(image=image)["image"], int(self.split.labels[j])

    def failed_items(self) -> list[Any]:
        """The items that failed to decode so far, in this process or its DataLoader workers."""
        return [self.split.items[i] for i in self.failed.nonzero().flatten().tolist()]


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
            or ready :class:`DataSplits` (which are used as they are: not scanned for bad images or duplicates).
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
        self.on_duplicate = check_on_duplicate(src.on_duplicate)
        # A source that draws its images at the input size (photos) sees the size resolved from the backbone.
        self.source = dataclasses.replace(src, image_size=self.image_size)
        self.bad_images: list[tuple[Path, str]] = []
        self.duplicates: list[Duplicate] = []  # val/test images byte-identical to earlier splits' (data.on_duplicate)
        self.datasets: dict[str, ImageDataset] = {}
        self._worker_seeds = torch.Generator()  # the train loader's: reseeded each epoch by its sampler

    # ddp_spawn pickles the datamodule into its children, and a torch.Generator does not survive
    # torch.multiprocessing's pickler (the child fails "unable to resize file"): its state travels as bytes.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_worker_seeds": self._worker_seeds.get_state().numpy().tobytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _worker_seeds=torch.Generator())
        self._worker_seeds.set_state(torch.frombuffer(bytearray(state["_worker_seeds"]), dtype=torch.uint8))

    # Scanning is cheap and deterministic, so it happens on first use in any process.
    @property
    def data(self) -> DataSplits:
        if self._data is None:
            from finetune.data.duplicates import check_duplicates
            from finetune.data.scan import check_split_images

            # A fast scan of every image file, so a corrupt file stops the run before training, not mid-epoch.
            data, self.bad_images = check_split_images(self.source.load(self.seed), self.on_bad_image)
            self._data, self.duplicates = check_duplicates(data, self.on_duplicate)
        return self._data

    @property
    def skipped_during_training(self) -> list[tuple[Path, str]]:
        """Files that passed the scan but failed to decode when read for a batch, with why (empty: none).

        With ``on_bad_image=skip`` each was replaced by the next readable item of its split. Workers'
        failures are included; the reason is found again here, by the scan's full check.
        """
        from finetune.data.scan import image_problem

        failed = {Path(p) for ds in self.datasets.values() for p in ds.failed_items()}
        return [(p, image_problem(p) or "failed to decode when read for a batch") for p in sorted(failed)]

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
            self.datasets[name] = ImageDataset(split, train_t if name == "train" else eval_t, self.on_bad_image)

    def _eval_transform(self) -> Any:
        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation, self.crop_mode)

    def eval_dataset(self, name: str) -> ImageDataset:
        """Split ``name`` through the deterministic eval pipeline (for measuring, not training)."""
        return ImageDataset(self.data.splits[name], self._eval_transform(), self.on_bad_image)

    def train_sampler(self, trainer: Any = None) -> Sampler[int]:
        """The train split's order from (seed, epoch): a shuffle, or with ``sampler="weighted"`` draws with
        replacement weighted 1 / (images of the class), so every class comes up about equally often.
        Under DDP, this rank's share of that order (:func:`finetune.distributed.shard_order`)."""
        labels = self.data.splits["train"].labels
        weights = (1.0 / np.bincount(labels)[labels]).tolist() if self.sampler == "weighted" else None
        trainer = trainer or self.trainer
        return shard_order(EpochSampler(len(labels), self.seed, first_epoch(trainer), weights, self._reseed_train),
                           trainer)

    def _reseed_train(self, seed: int) -> None:
        # Each epoch's augmentations and worker seeds from (seed, epoch), as its order: a resumed run repeats them.
        self.setup()
        transform = self.datasets["train"].transform
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)
        self._worker_seeds.manual_seed(seed)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        train = name == "train" and shuffle
        sampler = self.train_sampler() if train else None
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            sampler=sampler,
            # A last batch of one image fails BatchNorm in training (one value per channel on a 1x1 map): that
            # epoch leaves it out (the order is reshuffled every epoch; timm and fastai drop every partial batch).
            drop_last=sampler is not None and len(sampler) % self.batch_size == 1,
            num_workers=self.num_workers,
            # Workers start anew each epoch, seeded from the epoch: persistent ones would carry their state over.
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=seed_worker_transform,
            generator=self._worker_seeds if train else None,
        )

