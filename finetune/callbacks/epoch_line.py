"""A progress "bar" for a pipe or a log file: one line per trained epoch.

``epoch 3/15  train/loss 0.412  val/acc 97.2%  12.3 s``. Lightning's TQDM bar redraws itself with
carriage returns, which a pipe or a log file keeps as one line per step; :func:`finetune.builders.build_trainer`
uses this callback in its place when stdout is not a terminal.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar

__all__ = ["EpochLine", "epoch_line"]


def _number(value: Any) -> float | None:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


def epoch_line(epoch: int, max_epochs: int | None, metrics: Mapping[str, Any], seconds: float) -> str:
    """The line of 0-based ``epoch``: its number, train loss, val loss and accuracy (where logged) and time."""
    of = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    parts = [f"epoch {epoch + 1}{of}"]
    for label, keys, percent in (("train/loss", ("train/loss_epoch", "train/loss"), False),
                                 ("val/loss", ("val/loss",), False), ("val/acc", ("val/acc",), True)):
        value = next((v for v in (_number(metrics[k]) for k in keys if k in metrics) if v is not None), None)
        if value is not None:
            parts.append(f"{label} {100 * value:.1f}%" if percent else f"{label} {value:.3f}")
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


class EpochLine(ProgressBar):
    """Prints :func:`epoch_line` at the end of each training epoch (after its validation); nothing per step."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._start = time.monotonic()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero or trainer.sanity_checking:
            return
        line = epoch_line(trainer.current_epoch, trainer.max_epochs, trainer.callback_metrics,
                          time.monotonic() - self._start)
        print(line, flush=True)
