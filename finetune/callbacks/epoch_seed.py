"""The callback that makes each epoch's randomness a function of (seed, epoch) alone.

A run resumed from the checkpoint written at the end of epoch ``k - 1`` then trains epoch ``k``
exactly as the uninterrupted run did, wherever the interruption struck (a kill -9 mid-epoch
restarts that epoch). The data's share (order, augmentations, worker seeds) is drawn by
:class:`finetune.data.samplers.EpochSampler` from (seed, epoch); this callback reseeds
torch, numpy and random at every epoch start for the model's own randomness (dropout,
stochastic depth). Nothing draws from those generators between the epoch's start and its
first step: the train loader's sampler and worker seeds have generators of their own.
"""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from finetune.data.samplers import epoch_seed

__all__ = ["SeedEachEpoch"]


class SeedEachEpoch(Callback):
    """Reseed torch, numpy and random with ``(seed, epoch)`` at every epoch start.

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s = epoch_seed(self.seed, trainer.current_epoch)
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)
