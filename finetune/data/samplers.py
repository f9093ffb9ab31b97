"""The train split's order, drawn from (seed, epoch) alone.

PyTorch's ``RandomSampler`` and ``WeightedRandomSampler`` draw from generators whose state
depends on everything drawn before, and Lightning creates the first epoch's iterator early
(``estimated_stepping_batches`` loads the train loader before any callback runs). So a run
resumed at epoch ``k`` would see another order than the uninterrupted run's epoch ``k``.
:class:`EpochSampler` draws each epoch's order, and the DataLoader's worker seeds, from a
generator seeded with ``(seed, epoch)``; Lightning calls :meth:`EpochSampler.set_epoch` at
every epoch start, and the first epoch is given at construction.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "epoch_seed", "first_epoch", "seed_worker_transform"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for ``epoch`` of a run seeded with ``seed`` (distinct epochs, distinct seeds)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class EpochSampler(Sampler[int]):
    """A shuffle (or, with ``weights``, draws with replacement) that depends only on ``seed`` and the epoch.

    Args:
        n: items in the split.
        seed: the run's seed.
        epoch: the first epoch this sampler serves (a resumed run starts later).
        weights: per-item weights: ``n`` draws with replacement (a weighted sampler); None: a permutation.
        on_epoch: called with each epoch's seed when the epoch is set (the datamodule reseeds its
            train transform and the loader's worker seeds with it).
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int = 0,
        weights: Sequence[float] | None = None,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        self.n, self.seed = int(n), int(seed)
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.on_epoch = on_epoch
        self.epoch = -1
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = int(epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch_seed(self.seed, self.epoch))

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def first_epoch(trainer: Any) -> int:
    """The epoch a fit starts with: 0, or where the checkpoint it resumes from left off.

    Asked when the train loader is built, which Lightning does before it restores its loops.
    """
    if trainer is None or not getattr(trainer, "ckpt_path", None):
        return 0
    state = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None) or torch.load(
        trainer.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    # "processed", not the checkpoint's epoch: one written at an epoch's end still names that epoch.
    return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each worker reseeds its copy of the transform from its own torch seed.

    Without it workers would repeat each other's crops. A worker's seed is the loader's base seed
    (drawn from the loader's generator, which :class:`EpochSampler` reseeds every epoch) plus its id.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)
