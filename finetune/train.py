"""train(cfg): plain config -> data, model, trainer -> run directory with metrics.

Callable from tests and notebooks without the Hydra CLI (see :func:`finetune.config.compose`).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from finetune.data import ImageDataModule
from finetune.errors import FineTuneError
from finetune.heads import head_kwargs
from finetune.module import FineTuneModule
from finetune.report import print_summary

__all__ = ["build_datamodule", "build_module", "build_trainer", "train"]


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The DataModule of ``cfg.data``, preprocessed for ``cfg.backbone.name``."""
    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        return ImageDataModule(backbone=cfg.backbone.name, seed=cfg.seed, **kwargs)  # type: ignore[arg-type]
    except TypeError as e:
        raise FineTuneError(f"bad data config: {e}") from None


def build_module(cfg: DictConfig, num_classes: int, class_names: list[str] | None = None) -> FineTuneModule:
    """The FineTuneModule of ``cfg.backbone``, ``cfg.freeze``, ``cfg.head`` and ``cfg.optim``."""
    b, h, o = cfg.backbone, cfg.head, cfg.optim
    if o.name != "adamw":
        raise FineTuneError(f"unknown optimizer '{o.name}'; choose adamw")
    return FineTuneModule(
        backbone=b.name,
        num_classes=num_classes,
        pretrained=b.pretrained,
        weights=b.weights,
        freeze=OmegaConf.to_container(cfg.freeze, resolve=True),  # type: ignore[arg-type]
        head=head_kwargs(h),
        lr=o.lr,
        backbone_lr_mult=o.backbone_lr_mult,
        layer_decay=o.get("layer_decay"),
        weight_decay=o.weight_decay,
        sched=o.sched,
        warmup_epochs=o.warmup_epochs,
        label_smoothing=h.get("label_smoothing", 0.0),
        class_names=class_names,
        channels_last=b.get("channels_last", False),
    )


def build_trainer(cfg: DictConfig, run_dir: Path) -> tuple[pl.Trainer, ModelCheckpoint]:
    """A Lightning Trainer from ``cfg.trainer`` (Trainer's own argument names) that writes to ``run_dir``."""
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=CSVLogger(save_dir=run_dir, name="logs", version=""),
        callbacks=[checkpoint],
        **kwargs,
    )
    return trainer, checkpoint


def _epoch_rows(metrics_csv: Path) -> list[dict[str, str]]:
    """Lightning's CSV log has a row per logging event; merge them into one row per epoch."""
    if not metrics_csv.exists():
        return []
    by_epoch: dict[int, dict[str, str]] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            merged = by_epoch.setdefault(int(float(row["epoch"])), {"epoch": str(int(float(row["epoch"])))})
            for k, v in row.items():
                if v != "" and k not in ("step", "epoch") and not k.endswith("_step"):
                    merged[k.removesuffix("_epoch")] = v
    return [by_epoch[e] for e in sorted(by_epoch)]


def _write_epochs_csv(rows: list[dict[str, str]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; write config, logs, checkpoint and ``metrics.json`` to ``run_dir``.

    Returns:
        The metrics written to ``metrics.json``.
    """
    evaluate = cfg.get("evaluate", "last")
    if evaluate not in ("last", "best"):  # checked before training, not after it
        raise FineTuneError(f"evaluate must be 'last' or 'best', got '{evaluate}'")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = build_datamodule(cfg)
    model = build_module(cfg, dm.num_classes, dm.classes)
    trainer, checkpoint = build_trainer(cfg, run_dir)

    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_time = time.perf_counter() - start
    # Read now: validate/test below append rows for an epoch that did not train.
    rows = _epoch_rows(run_dir / "logs" / "metrics.csv")
    if rows:
        _write_epochs_csv(rows, run_dir / "epochs.csv")

    # None: the weights in memory, i.e. those after the last epoch.
    ckpt = "best" if evaluate == "best" and checkpoint.best_model_path else None
    metrics: dict[str, Any] = {
        "recipe": cfg.get("recipe"),
        "backbone": cfg.backbone.name,
        "weights_source": model.weights_source,
        "freeze": model.freeze_spec.name,
        "data": dm.data.name,
        "image_size": dm.image_size,
        "num_classes": dm.num_classes,
        "split_sizes": {k: len(v) for k, v in dm.data.splits.items()},
        "epochs": trainer.current_epoch,
        "train_time_s": round(train_time, 2),
        # What the strategy trained in the last epoch (gradual/lp_ft start from fewer).
        "trainable_params": model.trainable_params_at(max(0, trainer.current_epoch - 1)),
        "trainable_params_first_epoch": model.trainable_params_at(0),
        "total_params": model.total_params(),
        "best_checkpoint": checkpoint.best_model_path or None,
        "evaluated": "best" if ckpt else "last",
    }
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        if stage == "test" and not dm.has_test:
            continue
        result = run(model, datamodule=dm, ckpt_path=ckpt, verbose=False)[0]
        metrics[f"{stage}_acc"] = round(float(result[f"{stage}/acc"]), 5)
        if f"{stage}/top5" in result:
            metrics[f"{stage}_top5"] = round(float(result[f"{stage}/top5"]), 5)
        metrics[f"{stage}_loss"] = round(float(result[f"{stage}/loss"]), 5)

    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_summary(metrics, run_dir, dm.class_counts(), dm.data.notes)
    return metrics
