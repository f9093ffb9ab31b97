"""Cached backbone features: a frozen backbone runs once, not once per epoch.

With ``freeze=head_only`` and deterministic train preprocessing (``augment=none``) every
epoch would feed the same images through the same fixed function. :class:`FeatureDataModule`
computes the backbone's features of each split once and serves ``(features, labels)``
batches; :meth:`FineTuneModule.forward` sends 2-D inputs straight to the head. The full
model (backbone included) is still what checkpoints hold, so predictions take images.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from finetune.data.datamodule import ImageDataModule, SplitLoaders
from finetune.data.sources import Split
from finetune.distributed import gather_strided, process_group_rank
from finetune.errors import FineTuneError
from finetune.module import FineTuneModule

__all__ = [
    "FeatureDataModule",
    "PrecomputedFeatures",
    "cache_features_reason",
    "resolve_cache_features",
    "split_fingerprint",
    "state_digest",
]


def cache_features_reason(module: FineTuneModule, images: ImageDataModule) -> str | None:
    """Why features cannot be cached for this module and data; None when they can."""
    if getattr(images.source, "streams", False):
        return f"data={images.source.source} streams its images: the cache keeps features of listed images"
    if not module.freeze_plan.backbone_frozen_throughout:
        return f"the backbone trains (freeze={module.strategy.name}); caching needs freeze=head_only"
    if module.train_loss.mixing:
        return "training batches are mixed (augment.mixup/cutmix mix images, not features); caching needs them off"
    if not images.train_is_deterministic:
        return f"train images are augmented (augment={images.augment.name}); caching needs augment=none"
    return None


def resolve_cache_features(setting: Any, module: FineTuneModule, images: ImageDataModule) -> bool:
    """Decide ``cache_features`` (``auto``, true or false) for this module and data."""
    if setting in (False, "false", "False", None):
        return False
    if setting not in ("auto", True, "true", "True"):
        raise FineTuneError(f"cache_features must be auto, true or false, got '{setting}'")
    reason = cache_features_reason(module, images)
    if reason and setting != "auto":
        raise FineTuneError(f"cache_features=true is not possible: {reason}")
    return reason is None


def state_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: features computed with other weights are stale."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_fingerprint(split: Split) -> str:
    """A hash of a split's items (paths, or array bytes) and labels, in order."""
    h = hashlib.sha1()
    for item in split.items:
        if isinstance(item, np.ndarray):
            h.update(str(item.shape).encode())
            h.update(np.ascontiguousarray(item).tobytes())
        else:
            h.update(os.fsencode(item))
        h.update(b"\0")
    h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PrecomputedFeatures:
    """Backbone features of some images of one split, computed before the cache was built.

    ``+recipe=auto`` measures its sample with the backbone itself (see :mod:`finetune.advise`);
    those forward passes are the features a ``head_only`` run needs. :class:`FeatureDataModule`
    uses them only where everything they depend on still holds, and extracts the rest.

    Attributes:
        split: the split's name.
        fingerprint: :func:`split_fingerprint` of the split they were computed on.
        data_config: the eval preprocessing they went through (``ImageDataModule.data_config``).
        digest: :func:`state_digest` of the backbone that computed them.
        channels_last: whether that backbone ran channels-last.
        indices: which images of the split, in the order of ``features``.
        features: ``(len(indices), num_features)`` float32.
    """

    split: str
    fingerprint: str
    data_config: dict[str, Any]
    digest: str
    channels_last: bool
    indices: tuple[int, ...]
    features: torch.Tensor


class FeatureDataModule(SplitLoaders, pl.LightningDataModule):
    """The splits of an :class:`ImageDataModule` as backbone features of a frozen ``module``.

    Features are computed on the module's device, in eval mode, without gradients, the
    first time a split's loader is asked for (Lightning asks after moving the model to
    its device), and again only if the backbone's weights changed since.

    Args:
        images: the image data; its eval pipeline preprocesses every split.
        module: the model whose backbone is frozen throughout.
        batch_size: training batch size (default: the image data's).
        precomputed: features already computed for some images; used for the images they
            cover when split, preprocessing, backbone weights and memory format all match.
    """

    def __init__(
        self,
        images: ImageDataModule,
        module: FineTuneModule,
        batch_size: int | None = None,
        precomputed: Sequence[PrecomputedFeatures] = (),
    ) -> None:
        super().__init__()
        reason = cache_features_reason(module, images)
        if reason:
            raise FineTuneError(f"cannot cache features: {reason}")
        self.images = images
        self.module = module
        self.batch_size = batch_size or images.batch_size
        self._cache: dict[str, tuple[str, TensorDataset]] = {}
        self.precomputed = list(precomputed)
        self.extraction_time_s = 0.0
        self.reused_features = 0  # images whose features came from ``precomputed``

    # The image data's facts, so code that reports on a datamodule works with either.
    @property
    def data(self) -> Any:
        return self.images.data

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    @property
    def has_test(self) -> bool:
        return self.images.has_test

    @property
    def image_size(self) -> int:
        return self.images.image_size

    def class_counts(self) -> dict[str, list[int]]:
        return self.images.class_counts()

    def setup(self, stage: str | None = None) -> None:
        self.images.setup(stage)

    def _usable(self, split: str, digest: str) -> tuple[list[int], torch.Tensor | None]:
        """Indices of ``split`` with precomputed features that this module and data would compute, and those rows."""
        candidates = [p for p in self.precomputed if p.split == split and p.digest == digest
                      and p.data_config == self.images.data_config
                      and p.channels_last == self.module.channels_last]
        if candidates:
            fingerprint = split_fingerprint(self.images.data.splits[split])
            candidates = [p for p in candidates if p.fingerprint == fingerprint]
        if not candidates:
            return [], None
        return [i for p in candidates for i in p.indices], torch.cat([p.features for p in candidates])

    @torch.no_grad()
    def _extract(self, split: str, digest: str) -> TensorDataset:
        dataset = self.images.datasets[split]
        n = len(dataset)
        # Under DDP each rank extracts every world-th image and the rows are gathered: each rank's sampler takes
        # its share of a new shuffle of the whole split every epoch, so each needs every row, not a fixed shard.
        rank, world = process_group_rank()
        if n < world:  # a rank would have nothing (so no row width to gather with): each extracts all
            rank, world = 0, 1
        known, known_rows = self._usable(split, digest)
        row_of = torch.full((n,), -1, dtype=torch.long)
        row_of[known] = torch.arange(len(known))
        mine = torch.arange(rank, n, world)
        have = row_of[mine] >= 0
        todo = mine[~have].tolist()
        feats: list[torch.Tensor] = []
        start = time.perf_counter()
        if todo:
            self.module.backbone.eval()
            # Extraction draws nothing random, but iterating a DataLoader consumes the global RNG
            # (its base seed): fork it so the shuffle order equals an uncached run's.
            with torch.random.fork_rng(devices=[]):
                loader = DataLoader(Subset(dataset, todo), batch_size=max(self.batch_size, 64), shuffle=False,
                                    num_workers=self.images.num_workers)
                for x, _ in loader:
                    feats.append(self.module.forward_features(x.to(self.module.device)).float().cpu())
            self.module.train(self.module.training)  # the module's own policy for which parts stay in eval
        self.reused_features += int(have.sum())
        if not have.any():
            features = torch.cat(feats)  # nothing precomputed: the rows are already in order
        else:
            features = torch.empty(len(mine), known_rows.shape[1])
            features[have] = known_rows[row_of[mine[have]]]
            if feats:
                features[~have] = torch.cat(feats)
        if world > 1:
            features = gather_strided(features, n, self.module.device)
        self.extraction_time_s += time.perf_counter() - start
        labels = torch.as_tensor(np.asarray(dataset.split.labels), dtype=torch.long)
        return TensorDataset(features, labels)

    def dataset(self, split: str) -> TensorDataset:
        """The ``(features, labels)`` of ``split``, computed now if missing or stale."""
        self.images.setup()
        digest = state_digest(self.module.backbone)
        cached = self._cache.get(split)
        if cached is None or cached[0] != digest:
            self._cache[split] = (digest, self._extract(split, digest))
        return self._cache[split][1]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # Features are small tensors in memory: worker processes would only add overhead.
        sampler = self.images.train_sampler(self.trainer) if split == "train" and shuffle else None
        return DataLoader(self.dataset(split), batch_size=self.batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler)

