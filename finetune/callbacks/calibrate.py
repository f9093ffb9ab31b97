"""The callback that calibrates a run's probabilities once training ends (``calibrate=true``).

At the end of fit it fits a temperature (:func:`finetune.calibration.fit_temperature`) on the
val split's logits, sets ``pl_module.temperature`` and writes it into every checkpoint file the
run's ``ModelCheckpoint`` callbacks left (``last.ckpt``, ``best.ckpt``): those were written
during the last validation, before there was a temperature. A checkpoint whose weights are not
the final ones (``best.ckpt`` of an earlier epoch) gets the temperature fitted for its own
weights. Files are rewritten through the trainer's checkpoint IO (:class:`~finetune.checkpoint_plugin.AtomicCheckpointIO`
in a run: the old file or the new one, never half of one). ``metrics.json`` gets the temperature
and the val NLL, ECE and Brier score before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

from finetune.calibration import calibration_metrics, fit_temperature
from finetune.checkpoint_io import safe_load
from finetune.errors import FineTuneError
from finetune.weights_version import weights_version

__all__ = ["CalibrateTemperature"]


def _val_loader(trainer: pl.Trainer) -> Any:
    # The datamodule's own loader (features for a cached-features run): the whole val split on every rank.
    dm = trainer.datamodule
    loader = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader


def _val_size(trainer: pl.Trainer) -> int | None:
    """Images in the val split where the datamodule says (an ImageDataModule, or one wrapping it), else None."""
    dm = getattr(trainer.datamodule, "images", trainer.datamodule)
    splits = getattr(getattr(dm, "data", None), "splits", None)
    return len(splits.get("val", ())) if isinstance(splits, dict) else None


@torch.no_grad()
def _logits(trainer: pl.Trainer, module: pl.LightningModule, loader: Iterable[Any]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's uncalibrated val logits (eval mode, the trainer's precision) and labels, on the CPU."""
    was_training = module.training
    module.eval()
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        # Iterating a loader draws its base seed from the global RNG: fork it, so nothing after sees a difference.
        with torch.random.fork_rng(devices=[]), trainer.precision_plugin.forward_context():
            for x, y in loader:
                logits.append(module(x.to(module.device)).float().cpu())
                labels.append(torch.as_tensor(y).cpu())
    finally:
        module.train(was_training)
    if not logits:
        raise FineTuneError("calibrate=true needs val images to fit the temperature on; the val split is empty "
                            "(calibrate=false trains without calibration)")
    return torch.cat(logits), torch.cat(labels)


def _checkpoint_files(trainer: pl.Trainer) -> list[Path]:
    found: list[Path] = []
    for cb in trainer.checkpoint_callbacks:  # type: ignore[attr-defined]
        if not isinstance(cb, ModelCheckpoint):
            continue
        for name in (cb.last_model_path, cb.best_model_path, *cb.best_k_models):
            path = Path(name) if name and "://" not in str(name) else None
            if path is not None and path.is_file() and path not in found:
                found.append(path)
    return found


def _same_weights(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> bool:
    return saved.keys() == current.keys() and all(torch.equal(saved[k], v) for k, v in current.items())


class CalibrateTemperature(Callback):
    """Fit temperature scaling on the val split at the end of fit; store it in the module and the checkpoints.

    Args:
        enabled: ``calibrate`` of the run's config; False: the callback does nothing (temperature 1).
        max_iter: LBFGS iterations of the fit.
    """

    def __init__(self, enabled: bool = True, max_iter: int = 100) -> None:
        self.enabled = enabled
        self.max_iter = max_iter
        self.results: dict[str, Any] = {}
        # The last validation of the fit: its weights' version, logits and labels. Where the final weights are
        # those, calibration fits on them instead of passing val again (a 1-minute run at 10 images per class
        # spent 3-4 s on each pass).
        self._collected: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last_val: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self.reused_validation = False

    def _collecting(self, trainer: pl.Trainer) -> bool:
        return self.enabled and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collected = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._collecting(trainer) and isinstance(outputs, torch.Tensor):
            self._collected.append((outputs.detach().float().cpu(), torch.as_tensor(batch[1]).cpu()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._collecting(trainer) and self._collected:
            self._last_val = (weights_version(pl_module), torch.cat([x for x, _ in self._collected]),
                              torch.cat([y for _, y in self._collected]))
        self._collected = []

    def _reused(self, trainer: pl.Trainer, module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last validation's logits where they are of these weights and of the whole val split (each process
        of a distributed run validated a shard of it, and calibrates on the whole)."""
        if self._last_val is None or self._last_val[0] != weights_version(module):
            return None
        logits, labels = self._last_val[1:]
        return (logits, labels) if len(labels) == _val_size(trainer) else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before training, not after it: a split that cannot be calibrated on is known now.
        if stage == "fit" and self.enabled and _val_size(trainer) == 0:
            raise FineTuneError("calibrate=true needs val images to fit the temperature on; the data has none "
                                "(calibrate=false trains without calibration)")

    def _fit(self, trainer: pl.Trainer, module: pl.LightningModule) -> tuple[float, dict[str, Any]]:
        reused = self._reused(trainer, module)
        loader = _val_loader(trainer) if reused is None else None
        if reused is None and loader is None:
            raise FineTuneError("calibrate=true needs val data to fit the temperature on (calibrate=false: off)")
        logits, labels = reused if reused is not None else _logits(trainer, module, loader)
        self.reused_validation = reused is not None
        t = fit_temperature(logits, labels, self.max_iter)
        before = calibration_metrics(logits.softmax(-1), labels)
        after = calibration_metrics((logits / t).softmax(-1), labels)
        return t, {f"val_{k}_{when}": round(float(v), 6) for when, m in (("before", before), ("after", after))
                   for k, v in m.items() if v is not None}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        t, measured = self._fit(trainer, pl_module)
        pl_module.temperature = t
        self.results = {"temperature": round(t, 6), **measured}
        if trainer.is_global_zero:
            self.results["checkpoint_temperatures"] = self._write_checkpoints(trainer, pl_module, t)
        trainer.strategy.barrier("calibrate")
        from finetune.callbacks.run_recorder import RunRecorder

        recorders = [c for c in trainer.callbacks if isinstance(c, RunRecorder)]  # type: ignore[attr-defined]
        if recorders:
            recorders[0].results.update(self.results)

    def _write_checkpoints(self, trainer: pl.Trainer, module: pl.LightningModule, t: float) -> dict[str, float]:
        """Each checkpoint file with its own weights' temperature (``t`` where they are the final weights)."""
        written: dict[str, float] = {}
        final = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}  # a CPU copy
        swapped = False  # only then put the final weights back: loading them would make them look changed
        try:
            for path in _checkpoint_files(trainer):
                raw = safe_load(path, "checkpoint", mmap=False)  # read whole: the file is replaced below
                own = t
                if not _same_weights(raw["state_dict"], final):
                    swapped = True
                    module.load_state_dict(raw["state_dict"])
                    own, _ = self._fit(trainer, module)
                raw["temperature"] = own
                trainer.strategy.checkpoint_io.save_checkpoint(raw, path)
                written[path.name] = round(own, 6)
        finally:
            if swapped:
                module.load_state_dict(final)
        return written
