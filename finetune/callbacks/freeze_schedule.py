"""The callback that applies a freeze strategy: which parameters train at each epoch.

:class:`finetune.FineTuneModule` attaches it itself (``configure_callbacks``), so a plain
``pl.Trainer().fit(module, data)`` follows the strategy too. How it avoids the peers' bugs
is in :mod:`finetune.freezing`; in short, every parameter is in the optimizer from the
first step and the trainable set is a pure function of the epoch, re-applied at the start
of each epoch, so a resumed run re-derives it rather than restoring fragile state.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from finetune.errors import FineTuneError

__all__ = ["FreezeSchedule"]


class FreezeSchedule(Callback):
    """Apply ``module.strategy`` at every epoch start; under DDP gate unfreezing by learning rate alone.

    Its checkpoint state is the strategy: resuming a checkpoint with another strategy is refused
    instead of silently training a different trainable set from the saved optimizer state.
    """

    def __init__(self) -> None:
        self._strategy: dict[str, Any] | None = None
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._strategy = pl_module.strategy.to_dict()
        # Before the strategy wraps the model: DDP registers the parameters that require grad then,
        # and gradient sync needs the same set on every rank at every step (Lightning #20340).
        if stage == "fit" and trainer.world_size > 1 and pl_module.strategy.is_dynamic:
            pl_module.gate_requires_grad = False
            pl_module.apply_freeze(0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None and self._loaded != self._strategy:
            raise FineTuneError(
                f"the checkpoint was trained with freeze={self._loaded.get('name')} {self._loaded}; "
                f"this run has freeze={self._strategy}: resume with the same freeze settings"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.apply_freeze(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self._strategy}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("strategy")
