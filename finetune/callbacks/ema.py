"""An exponential moving average of the weights (``ema.decay``), evaluated and checkpointed in their place.

Built on Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging`, which already does the parts
that are easy to get wrong: during fit every validation runs on the averaged weights (swapped in at the
start of the val epoch and back at its end, so training continues on the raw weights); each checkpoint's
``state_dict`` holds the averaged weights (so ``load_from_checkpoint``, predict, evaluate, export,
calibration and ``evaluate=best`` all get them), with the raw weights beside them as
``current_model_state`` and the update count as ``averaging_state``, which is what ``resume=RUN`` restores;
and at the end of fit the module itself is given the averaged weights.

What this subclass changes:

- The update is timm's ``ModelEmaV3``'s: ``ema.lerp_(w, 1 - decay)`` on floating-point tensors and a copy
  of integer buffers (BatchNorm's ``num_batches_tracked``). A lerp toward an equal value is exact, so the
  average of a frozen weight is that weight, bit for bit: when a freeze schedule unfreezes it at epoch k,
  its average starts from its true value. BatchNorm running statistics are averaged like the weights
  (``use_buffers=True``, as timm does); frozen BatchNorm keeps its statistics, so their average is them.
- timm's decay warmup (``use_warmup``): update ``t`` uses ``min(decay, 1 - (1 + t) ** -warmup_power)``, so
  on a short run the average is not dominated by the first steps' weights (0.999 ** 135 = 0.87: with 135
  steps and no warmup, 87% of the "average" would be the weights after the first step).
- The update function is a picklable object, not a closure: ``ddp_spawn`` pickles the callbacks.
- Outside fit (``trainer.validate/test(ckpt_path=...)`` after training) it does nothing: the module is
  evaluated with the weights it holds, i.e. the checkpoint's averaged ``state_dict``. Lightning's class
  would swap in its own (last) average there and report the last epoch's weights for ``evaluate=best``.

Under DDP every rank applies the same update to the same (all-reduced) weights, so the averages agree
without any communication; per-rank BatchNorm statistics average per rank, as the raw ones do.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

from finetune.config import EmaConfig
from finetune.errors import FineTuneError

__all__ = ["EMA", "EmaUpdate", "ema_from_config"]


class EmaUpdate:
    """``torch.optim.swa_utils.AveragedModel``'s ``multi_avg_fn``: timm ModelEmaV3's update and warmup."""

    def __init__(self, decay: float, use_warmup: bool, warmup_power: float) -> None:
        self.decay = decay
        self.use_warmup = use_warmup
        self.warmup_power = warmup_power

    def decay_at(self, updates: int) -> float:
        """The decay of the update made after ``updates`` earlier ones (the first one copies the weights)."""
        if not self.use_warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + updates) ** -self.warmup_power)

    @torch.no_grad()
    def __call__(self, averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], n_averaged: Any) -> None:
        decay = self.decay_at(int(n_averaged))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c.to(a.dtype), 1.0 - decay)
            else:
                a.copy_(c)


def _check(decay: float, warmup_power: float, update_every_n_steps: int) -> float:
    try:
        value = float(decay)
    except (TypeError, ValueError):
        raise FineTuneError(f"ema.decay must be in (0, 1), got {decay!r}") from None
    if not 0.0 < value < 1.0:
        raise FineTuneError(f"ema.decay must be in (0, 1), got {value}")
    if not (math.isfinite(warmup_power) and warmup_power > 0):
        raise FineTuneError(f"ema.warmup_power must be > 0, got {warmup_power}")
    if update_every_n_steps < 1:
        raise FineTuneError(f"ema.update_every_n_steps must be >= 1, got {update_every_n_steps}")
    return value


class EMA(WeightAveraging):
    """Keep an EMA of the module's weights; validate, checkpoint and finish with it.

    Add it to any Trainer: ``pl.Trainer(callbacks=[EMA(decay=0.99)])``; the CLI adds it for ``ema.decay=``.

    Args:
        decay: the EMA's decay per update, in (0, 1).
        use_warmup: timm's decay warmup, ``min(decay, 1 - (1 + t) ** -warmup_power)`` at update ``t``.
        warmup_power: timm's ``warmup_power``: 2/3 reaches 0.99 after 1,000 updates and 0.999 after 31,600.
        update_every_n_steps: update after every n-th optimizer step (Lightning's ``EMAWeightAveraging``).
        device: where the averaged copy lives; None: beside the module (``"cpu"`` saves accelerator memory,
            at the cost of a copy per update and per validation).
    """

    def __init__(
        self,
        decay: float,
        use_warmup: bool = EmaConfig.use_warmup,
        warmup_power: float = EmaConfig.warmup_power,
        update_every_n_steps: int = EmaConfig.update_every_n_steps,
        device: str | None = None,
    ) -> None:
        decay = _check(decay, warmup_power, update_every_n_steps)
        self.update = EmaUpdate(decay, use_warmup, warmup_power)
        self.update_every_n_steps = update_every_n_steps
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self.update)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def _fitting(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._fitting(trainer):  # resume: the average and the raw weights both come back
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` says under ``ema``."""
        u = self.update
        updates = int(self._average_model.n_averaged) if self._average_model is not None else 0
        out: dict[str, Any] = {"decay": u.decay, "use_warmup": u.use_warmup, "updates": updates}
        if u.use_warmup:
            out["warmup_power"] = round(u.warmup_power, 6)
        if updates > 1:  # the decay the last update used (below ``decay`` while the warmup lasts)
            out["last_decay"] = round(u.decay_at(updates - 1), 6)
        return out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from finetune.callbacks.run_recorder import RunRecorder

        for recorder in (c for c in trainer.callbacks if isinstance(c, RunRecorder)):  # type: ignore[attr-defined]
            recorder.results["ema"] = self.summary()


def ema_from_config(node: Any) -> EMA | None:
    """The :class:`EMA` that ``cfg.ema`` asks for, or None when ``ema.decay`` is null (off)."""
    if node is None or node.get("decay") is None:
        return None
    return EMA(decay=node["decay"], use_warmup=node["use_warmup"], warmup_power=node["warmup_power"],
               update_every_n_steps=node["update_every_n_steps"])
