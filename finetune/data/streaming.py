"""StreamingDataModule: ImageDataModule for sources that stream tar shards (``data=webdataset``).

How a split is divided, each epoch (:func:`finetune.data.shard_index.shard_plan`): rank ``r`` of
``world`` reads shards ``r, r + world, ...`` (webdataset's ``split_by_node``, which reads the
rank from ``RANK``/``WORLD_SIZE`` or ``torch.distributed``), and its loader worker ``w`` of ``W``
every ``W``-th of those (``split_by_worker``). Every sample is read once per epoch, on one rank and
one worker. Each worker shuffles its samples through a buffer (webdataset's ``shuffle``), seeded
from (seed, epoch, rank, worker), and batches them itself.

DDP needs the same number of batches on every rank, or the gradient all-reduce waits forever.
Rather than webdataset's ``.repeat()`` + ``with_epoch`` (which blurs epochs: a sample may come
twice in one and not at all in the next), the train loader is cut to the batches of the poorest
rank, known in advance from the shard index (:func:`~finetune.data.shard_index.worker_quotas`):
nothing is dropped when the shards divide evenly over ranks and workers (equal shards, a
multiple of ``world * num_workers`` of them), otherwise the dropped samples per epoch are in
the summary's notes. Val and test are not cut: each rank evaluates its own shards (metrics are
reduced over ranks), so they are seen whole.
"""

from __future__ import annotations

import io
import random
from itertools import islice
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from finetune.data.datamodule import ImageDataModule
from finetune.data.images import UnreadableImage, to_rgb
from finetune.data.samplers import epoch_seed
from finetune.data.shard_index import IMAGE_SUFFIXES, ShardSplit, shard_plan, worker_quotas
from finetune.data.sources import DataSplits
from finetune.errors import FineTuneError

__all__ = ["ShardStream", "StreamingDataModule", "decode_sample", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """This process's DDP rank and world size, found as webdataset's ``split_by_node`` finds them."""
    from webdataset.utils import pytorch_worker_info

    rank, world, _, _ = pytorch_worker_info()
    return rank, world


def decode_sample(sample: dict[str, Any]) -> np.ndarray:
    """A webdataset sample's image as an HxWx3 uint8 RGB array (EXIF orientation applied, as files are read)."""
    from PIL import Image, ImageOps

    suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    try:
        if suffix is None:
            raise ValueError(f"no image member (has {', '.join(k for k in sample if not k.startswith('__'))})")
        with Image.open(io.BytesIO(sample[suffix])) as img:
            return np.asarray(to_rgb(ImageOps.exif_transpose(img)), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken bytes
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise UnreadableImage(f"cannot decode sample '{sample.get('__key__')}' of shard "
                              f"'{sample.get('__url__')}': {why}") from None


class ShardStream(IterableDataset):
    """One split's batches, streamed: this rank's and worker's shards, filtered, shuffled, decoded, batched.

    ``bind(rank, world, workers)`` is called in the main process when the loader is made, so the
    length (batches on this rank) and the workers' shard plans agree; ``epoch`` is set before each pass.
    """

    def __init__(self, split: ShardSplit, transform: Any, batch_size: int, shuffle_buffer: int = 0,
                 seed: int = 0, equalize: bool = False) -> None:
        self.split, self.transform, self.batch_size = split, transform, batch_size
        self.shuffle_buffer, self.seed, self.equalize = shuffle_buffer, seed, equalize
        self.epoch, self.rank, self.world, self.workers = 0, 0, 1, 1
        self.quotas: list[list[int]] = [[0]]
        self.dropped = 0

    def bind(self, rank: int, world: int, workers: int) -> None:
        self.rank, self.world, self.workers = rank, world, max(1, workers)
        counts = self.split.counts()
        if self.equalize:
            self.quotas, self.dropped = worker_quotas(counts, self.batch_size, self.world, self.workers)
        else:  # every batch of this rank: ranks may differ (evaluation only)
            self.quotas = [[-(-sum(counts[i] for i in shard_plan(len(counts), r, self.world, w, self.workers))
                              // self.batch_size) for w in range(self.workers)] for r in range(self.world)]
            self.dropped = 0

    def __len__(self) -> int:
        return sum(self.quotas[self.rank])

    def _seed(self, worker: int) -> int:
        return epoch_seed(self.seed, self.epoch * 1_000_003 + self.rank * 1009 + worker)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        if (info.num_workers if info else 1) != self.workers:
            raise RuntimeError(f"ShardStream bound for {self.workers} workers, iterated by {info and info.num_workers}")
        urls = [self.split.urls[i] for i in shard_plan(len(self.split.urls), self.rank, self.world, worker,
                                                       self.workers)]
        quota = self.quotas[self.rank][worker]
        if not urls or not quota:
            return iter(())
        seed = self._seed(worker)
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        stages: list[Callable[..., Any]] = [wds.SimpleShardList(urls), wds.tarfile_to_samples(),
                                            wds.select(lambda s: self.split.keeps(s["__key__"]))]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed)))
        stages += [wds.map(self._tensors), wds.batched(self.batch_size, collation_fn=default_collate, partial=True)]
        return islice(iter(wds.DataPipeline(*stages)), quota)

    def _tensors(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        label = int(sample["cls"].decode().strip())
        return self.transform(image=decode_sample(sample))["image"], label


class _EpochLoader(DataLoader):
    """A DataLoader that tells its :class:`ShardStream` the epoch before each pass (Lightning sets
    epochs on samplers only, and an IterableDataset's loader has none of its own)."""

    def __init__(self, dataset: ShardStream, epoch: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch = epoch

    def __iter__(self) -> Any:
        self.dataset.epoch = self._epoch()  # type: ignore[attr-defined]  # before workers copy the dataset
        return super().__iter__()


class StreamingDataModule(ImageDataModule):
    """ImageDataModule over a streaming source: the same preprocessing, sizes and class counts, fed by
    :class:`ShardStream`. What needs images one by one (the feature cache, the weighted sampler,
    ``on_bad_image=skip``, the duplicate check) is refused in one line."""

    def __init__(self, source: Any = "webdataset", **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        if not getattr(self.source, "streams", False):
            raise FineTuneError(f"data={self.source.source} is listed, not streamed: use ImageDataModule")
        refused = {"sampler": (self.sampler, None), "on_bad_image": (self.on_bad_image, "error"),
                   "on_duplicate": (self.on_duplicate, "warn")}
        for key, (value, allowed) in refused.items():
            if value != allowed:
                raise FineTuneError(f"data.{key}={value} needs images listed one by one; data={self.source.source} "
                                    f"streams them (leave data.{key} at {allowed})")

    @property
    def data(self) -> DataSplits:
        if self._data is None:
            self._data = self.source.index(self.seed)  # type: ignore[attr-defined]
        return self._data

    @property
    def skipped_during_training(self) -> list:
        return []  # a sample that fails to decode stops the run (on_bad_image=error)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        eval_t = self._eval_transform()
        train_t = eval_t if self.train_is_deterministic else self._train_transform()
        for name, split in self.data.splits.items():
            train = name == "train"
            self.datasets[name] = ShardStream(  # type: ignore[assignment]
                split, train_t if train else eval_t, self.batch_size,
                self.source.shuffle_buffer if train else 0, self.seed, equalize=train)  # type: ignore[attr-defined]

    def _train_transform(self) -> Any:
        from finetune.data.augment import build_ops
        from finetune.data.transforms import train_transform

        return train_transform(self.image_size, self.mean, self.std, self.scale, self.ratio, self.hflip,
                               self.interpolation, extra=build_ops(self.augment.ops))

    def eval_dataset(self, name: str) -> Any:
        return self.data.splits[name].items  # refuses in one line: nothing here is indexable

    def train_sampler(self, trainer: Any = None) -> Any:
        raise FineTuneError(f"data={self.source.source} streams its train split: it has no sampler")

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        dataset: ShardStream = self.datasets[name]  # type: ignore[assignment]
        dataset.bind(*rank_and_world(), self.num_workers)
        if dataset.dropped and not any("DDP" in n for n in self.data.notes):
            self.data.notes.append(f"DDP: {dataset.dropped} train sample(s) per epoch left out so that every rank "
                                   f"has {len(dataset)} batches (shards do not divide evenly over "
                                   f"{dataset.world} ranks x {dataset.workers} workers)")
        trainer = self.trainer
        return _EpochLoader(dataset, lambda: int(trainer.current_epoch) if trainer else 0,
                            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                            persistent_workers=False)
