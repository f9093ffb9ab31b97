"""The callback that records a run: ``classes.json``, ``epochs.csv``, ``metrics.json`` and the summary."""

from __future__ import annotations

import csv
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

from finetune.report import print_summary
from finetune.weights_version import weights_version

__all__ = ["RunRecorder", "best_checkpoint"]


def _reset_peak_memory() -> None:
    # A sweep runs its jobs in one process: without a reset, each run reports the largest run before it.
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS that getrusage reports
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mb(trainer: pl.Trainer) -> dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_memory_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if trainer.strategy.root_device.type == "cuda":
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _model_size(trainer: pl.Trainer, model: Any) -> dict[str, int]:
    """Units, weights, connections (finetune.layer_size), trainable and total: one forward pass at batch 1."""
    from finetune.layer_size import freeze_cost, size_metrics, size_table, trainable_names

    dm = _images(trainer.datamodule)
    epoch = max(0, (trainer.max_epochs or 1) - 1)  # as trainable_params: what trains in the last epoch
    table = size_table(model, dm.image_size)
    cost = freeze_cost(table, trainable_names(model, model.freeze_plan, epoch), cached=trainer.datamodule is not dm)
    return size_metrics(cost)


def best_checkpoint(trainer: pl.Trainer) -> str:
    """Path of the best checkpoint of the first ModelCheckpoint that monitors a metric ('' if none)."""
    for c in trainer.checkpoint_callbacks:  # type: ignore[attr-defined]
        if isinstance(c, ModelCheckpoint) and c.monitor:
            return c.best_model_path
    return ""


def _images(datamodule: Any) -> Any:
    """The ImageDataModule behind ``datamodule`` (a FeatureDataModule wraps one)."""
    return getattr(datamodule, "images", datamodule)


class RunRecorder(Callback):
    """Writes what a run did into the trainer's ``default_root_dir`` (the run directory).

    ``epochs.csv`` has one row per trained epoch: the epoch's logged metrics (``train/loss``,
    ``val/acc``, ...) and every parameter group's learning rate as the
    :class:`~pytorch_lightning.callbacks.LearningRateMonitor` logged it (``lr-AdamW/head``, ...).
    :meth:`finish`, called after the final validation and test, writes ``metrics.json`` and
    prints the summary. Its rows and training time are part of the checkpoint, so a resumed run
    reports every epoch. A run stopped by Ctrl-C, or by an error, leaves ``metrics.json`` with
    ``status: interrupted`` or ``failed`` and the epochs it completed.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}  # final val/test metrics; calibration adds its own
        self.train_time_s = 0.0
        self.memory: dict[str, float] = {}
        self.size: dict[str, int] = {}
        self._start = 0.0
        self._fit_val: tuple[Any, dict[str, Any]] | None = None  # the fit's last validation: weights version, figures

    @staticmethod
    def of(trainer: pl.Trainer) -> "RunRecorder":
        found = [c for c in trainer.callbacks if isinstance(c, RunRecorder)]  # type: ignore[attr-defined]
        if not found:
            raise LookupError("the trainer has no RunRecorder callback")
        return found[0]

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = _images(trainer.datamodule)
        if stage != "fit" or dm is None or not trainer.is_global_zero:
            return
        run_dir = self._dir(trainer)
        classes = {"classes": dm.classes, "class_to_idx": {c: i for i, c in enumerate(dm.classes)}}
        (run_dir / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
        if dm.bad_images:
            from finetune.data.scan import write_bad_images

            write_bad_images(dm.bad_images, run_dir / "bad_images.txt")

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "train_time_s": self.train_time_s + self._elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start if self._start else 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and hasattr(pl_module, "freeze_plan") and trainer.datamodule is not None:
            self.size = _model_size(trainer, pl_module)  # before the clock: not training time
        _reset_peak_memory()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation of this epoch has run by now, so its metrics are among the callback metrics.
        self.rows = [r for r in self.rows if r["epoch"] < trainer.current_epoch]  # a resumed epoch replaces its row
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            if not k.endswith("_step"):
                row[k.removesuffix("_epoch")] = round(float(v), 6)
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, LearningRateMonitor):
                row.update({k: v[-1] for k, v in cb.lrs.items() if v})
        self.rows.append(row)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_time_s += self._elapsed()
        self._start = 0.0
        self.memory = _peak_memory_mb(trainer)
        if self.rows and trainer.is_global_zero:
            _write_csv(self.rows, self._dir(trainer) / "epochs.csv")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl-C or a crash: leave a run directory that says so, with what was done, and how to go on.
        if not trainer.is_global_zero:
            return
        run_dir = self._dir(trainer)
        if self.rows:
            _write_csv(self.rows, run_dir / "epochs.csv")
        interrupted = isinstance(exception, KeyboardInterrupt)
        lines = str(exception).strip().splitlines()
        record = {
            "status": "interrupted" if interrupted else "failed",
            **({} if interrupted else {"error": f"{type(exception).__name__}: {lines[0] if lines else ''}"}),
            "epochs_completed": len(self.rows),
            "train_time_s": round(self.train_time_s + self._elapsed(), 2),
        }
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            record["resume"] = f"python -m finetune resume={run_dir}"
        (run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")

    def _record(self, m: Any, stage: str) -> None:
        """``stage``'s figures from Lightning's logged metrics ``m`` (``trainer.callback_metrics``)."""
        for name, key in (("acc", "acc"), ("top5", "top5"), ("loss", "loss")):
            if f"{stage}/{key}" in m:
                self.results[f"{stage}_{name}"] = round(float(m[f"{stage}/{key}"]), 5)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._record(trainer.callback_metrics, "val")
        elif trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            m = trainer.callback_metrics
            self._fit_val = (weights_version(pl_module), {k: m[k] for k in ("val/acc", "val/top5", "val/loss") if k in m})

    def validated(self, trainer: pl.Trainer, module: pl.LightningModule) -> bool:
        """Whether the fit's last validation was of ``module``'s weights as they are now; if so, its figures are
        the run's val figures, and ``trainer.validate`` would only pass val again to get the same ones."""
        if self._fit_val is None or self._fit_val[0] != weights_version(module):
            return False
        self._record(self._fit_val[1], "val")
        return True

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer.callback_metrics, "test")

    def finish(self, trainer: pl.Trainer, extra: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        """``metrics.json`` (returned too) and the summary, after the final validation/test."""
        model, fit_dm = trainer.lightning_module, trainer.datamodule
        dm = _images(fit_dm)
        epochs = trainer.current_epoch
        images_per_epoch = min(len(dm.data.splits["train"]),
                               trainer.num_training_batches * fit_dm.batch_size * trainer.world_size)
        best = best_checkpoint(trainer)
        metrics: dict[str, Any] = {
            "status": "ok",
            **extra,
            "weights_source": model.weights_source,
            "freeze": model.strategy.name,
            "data": dm.data.name,
            "image_size": dm.image_size,
            "num_classes": dm.num_classes,
            "split_sizes": {k: len(v) for k, v in dm.data.splits.items()},
            "bad_images": len(dm.bad_images),
            "skipped_during_training": [str(p) for p, _ in dm.skipped_during_training],
            "duplicates_across_splits": len(dm.duplicates),
            "duplicate_pairs": [str(d) for d in dm.duplicates[:20]],
            "epochs": epochs,
            "train_time_s": round(self.train_time_s, 2),
            "train_images_per_s": round(images_per_epoch * epochs / max(self.train_time_s, 1e-9), 1),
            **self.memory,
            # What the strategy trained in the last epoch (gradual/lp_ft start from fewer).
            "trainable_params": model.trainable_params_at(max(0, epochs - 1)),
            "trainable_params_first_epoch": model.trainable_params_at(0),
            "total_params": model.total_params(),
            **({"size": self.size} if self.size else {}),
            "best_checkpoint": best or None,
            "augment": dm.augment.name,
            "mixup": model.hparams.get("mixup"),  # Mixup/CutMix options (finetune.loss), None: off
            "cached_features": fit_dm is not dm,
            "precision": str(trainer.precision),
        }
        if fit_dm is not dm:
            metrics["feature_extraction_s"] = round(fit_dm.extraction_time_s, 2)
            metrics["features_reused"] = fit_dm.reused_features  # images measured by the advice, not run again
        asked = metrics.pop("precision_asked", None)
        notes = [*dm.data.notes, *notes]
        skipped = dm.skipped_during_training
        if skipped:
            notes.append(f"{len(skipped)} image(s) failed to decode while training (after the scan) and were "
                         "replaced by the next image of their split; listed in bad_images.txt")
            if trainer.is_global_zero:
                from finetune.data.scan import write_bad_images

                write_bad_images([*dm.bad_images, *skipped], self._dir(trainer) / "bad_images.txt")
        if asked and asked != metrics["precision"]:
            # Lightning trains 16-mixed on a CPU as bf16-mixed (fp16 autocast needs a GPU): report what ran.
            metrics["precision_asked"] = asked
            notes.append(f"trainer.precision={asked} was asked; Lightning trained with {metrics['precision']} "
                         f"on {trainer.strategy.root_device.type}")
        metrics.update(self.results)
        if trainer.is_global_zero:
            run_dir = self._dir(trainer)
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            print_summary(metrics, run_dir, dm.class_counts(), notes, dm.classes)
        return metrics
