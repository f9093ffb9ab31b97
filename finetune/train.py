"""train(cfg): plain config -> data, model, trainer -> run directory with metrics.

Callable from tests and notebooks without the Hydra CLI (see :func:`finetune.config.compose`).
"""

from __future__ import annotations

import csv
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from finetune.data import ImageDataModule
from finetune.errors import FineTuneError
from finetune.features import FeatureDataModule, PrecomputedFeatures, resolve_cache_features
from finetune.heads import head_kwargs
from finetune.module import FineTuneModule
from finetune.report import print_summary

__all__ = ["balanced_class_weights", "build_datamodule", "build_module", "build_trainer", "train"]


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The DataModule of ``cfg.data``, preprocessed for ``cfg.backbone.name``."""
    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        return ImageDataModule(
            backbone=cfg.backbone.name, seed=cfg.seed, augment=cfg.get("augment"), **kwargs  # type: ignore[arg-type]
        )
    except TypeError as e:
        raise FineTuneError(f"bad data config: {e}") from None


def balanced_class_weights(counts: Sequence[int], class_names: Sequence[str] | None = None) -> list[float]:
    """scikit-learn's ``balanced``: ``n_samples / (n_classes * count_c)``, so each class weighs the same in total."""
    for c, n in enumerate(counts):
        if n <= 0:
            name = class_names[c] if class_names else str(c)
            raise FineTuneError(f"class_weights=balanced: class '{name}' has no training images")
    total = sum(counts)
    return [total / (len(counts) * n) for n in counts]


def _class_weights(
    value: Any, class_names: list[str] | None, class_counts: Sequence[int] | None
) -> list[float] | None:
    if value is None:
        return None
    if value == "balanced":
        if class_counts is None:
            raise FineTuneError("head.class_weights=balanced needs the training class counts")
        return balanced_class_weights(class_counts, class_names)
    if isinstance(value, str):
        raise FineTuneError(f"head.class_weights must be null, balanced or a list of floats, got '{value}'")
    try:
        return [float(w) for w in value]
    except (TypeError, ValueError):
        raise FineTuneError(f"head.class_weights must be null, balanced or a list of floats, got {value}") from None


def build_module(
    cfg: DictConfig,
    num_classes: int,
    class_names: list[str] | None = None,
    class_counts: Sequence[int] | None = None,
) -> FineTuneModule:
    """The FineTuneModule of ``cfg.backbone``, ``cfg.freeze``, ``cfg.head`` and ``cfg.optim``.

    ``class_counts`` (training images per class) is needed only for ``head.class_weights=balanced``.
    """
    b, h, o = cfg.backbone, cfg.head, cfg.optim
    if o.name != "adamw":
        raise FineTuneError(f"unknown optimizer '{o.name}'; choose adamw")
    class_weights = h.get("class_weights")
    if isinstance(class_weights, ListConfig):
        class_weights = OmegaConf.to_container(class_weights, resolve=True)
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
        class_weights=_class_weights(class_weights, class_names, class_counts),
        class_names=class_names,
        channels_last=b.get("channels_last", False),
        compile=cfg.get("compile", False),  # a DictConfig of torch.compile arguments is a Mapping
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


# Lightning's short precision names and the names it reports them by.
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


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


def _follow_advice(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str] | None
) -> tuple[DictConfig, dict, list[PrecomputedFeatures]]:
    """For ``+recipe=auto``: measure the data, write ``advice.json``, and compose the chosen recipe.

    Also returns the backbone features of the measured sample: a ``head_only`` recipe trains on
    them instead of running the backbone over the same images again.
    """
    from finetune.advise import advise_or_fallback, recipe_overrides
    from finetune.config import compose

    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise FineTuneError("+recipe=auto from Python needs train(cfg, run_dir, overrides=<the compose overrides>)")
        overrides = list(HydraConfig.get().overrides.task)
    features: list[PrecomputedFeatures] = []
    advice = advise_or_fallback(cfg, features)
    (run_dir / "advice.json").write_text(json.dumps(advice, indent=2) + "\n")
    print(f"advice: {advice['recipe']}: {advice['reason']}", flush=True)
    return compose(recipe_overrides(overrides, advice["recipe"])), advice, features


def train(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; write config, logs, checkpoint and ``metrics.json`` to ``run_dir``.

    Args:
        cfg: the composed config.
        run_dir: where the run's files go.
        overrides: the overrides ``cfg`` was composed with; ``+recipe=auto`` recomposes them with
            the recipe it picks (read from Hydra in the CLI).

    Returns:
        The metrics written to ``metrics.json``.
    """
    evaluate = cfg.get("evaluate", "last")
    if evaluate not in ("last", "best"):  # checked before training, not after it
        raise FineTuneError(f"evaluate must be 'last' or 'best', got '{evaluate}'")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    advice = None
    precomputed: list[PrecomputedFeatures] = []
    if cfg.get("recipe") == "auto":
        cfg, advice, precomputed = _follow_advice(cfg, run_dir, overrides)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = build_datamodule(cfg)
    classes = {"classes": dm.classes, "class_to_idx": {c: i for i, c in enumerate(dm.classes)}}
    (run_dir / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    model = build_module(cfg, dm.num_classes, dm.classes, dm.class_counts()["train"])
    if dm.bad_images:
        from finetune.data.scan import write_bad_images

        write_bad_images(dm.bad_images, run_dir / "bad_images.txt")
    # The preprocessing goes into the checkpoint, so predict/evaluate need nothing but the checkpoint.
    model.hparams["data_config"] = dm.data_config
    trainer, checkpoint = build_trainer(cfg, run_dir)
    cached = resolve_cache_features(cfg.get("cache_features", "auto"), model, dm)
    fit_dm = FeatureDataModule(dm, model, precomputed=precomputed) if cached else dm

    _reset_peak_memory()
    start = time.perf_counter()
    trainer.fit(model, datamodule=fit_dm)
    train_time = time.perf_counter() - start
    images_per_epoch = min(len(dm.data.splits["train"]),
                           trainer.num_training_batches * fit_dm.batch_size * trainer.world_size)
    # Read now: validate/test below append rows for an epoch that did not train.
    rows = _epoch_rows(run_dir / "logs" / "metrics.csv")
    if rows:
        _write_epochs_csv(rows, run_dir / "epochs.csv")

    # None: the weights in memory, i.e. those after the last epoch.
    ckpt = "best" if evaluate == "best" and checkpoint.best_model_path else None
    metrics: dict[str, Any] = {
        "status": "ok",
        "recipe": "auto" if advice else cfg.get("recipe"),
        **({"advised_recipe": advice["recipe"], "advice": advice["reason"]} if advice else {}),
        "backbone": cfg.backbone.name,
        "weights_source": model.weights_source,
        "freeze": model.freeze_spec.name,
        "data": dm.data.name,
        "image_size": dm.image_size,
        "num_classes": dm.num_classes,
        "split_sizes": {k: len(v) for k, v in dm.data.splits.items()},
        "epochs": trainer.current_epoch,
        "train_time_s": round(train_time, 2),
        "train_images_per_s": round(images_per_epoch * trainer.current_epoch / max(train_time, 1e-9), 1),
        **_peak_memory_mb(trainer),
        # What the strategy trained in the last epoch (gradual/lp_ft start from fewer).
        "trainable_params": model.trainable_params_at(max(0, trainer.current_epoch - 1)),
        "trainable_params_first_epoch": model.trainable_params_at(0),
        "total_params": model.total_params(),
        "best_checkpoint": checkpoint.best_model_path or None,
        "evaluated": "best" if ckpt else "last",
        "augment": dm.augment["name"],
        "cached_features": cached,
    }
    # Lightning trains 16-mixed on a CPU as bf16-mixed (fp16 autocast needs a GPU): report what ran.
    metrics["precision"] = str(trainer.precision)
    notes = list(dm.data.notes)
    asked = _PRECISION_ALIASES.get(str(cfg.trainer.get("precision")), str(cfg.trainer.get("precision")))
    if metrics["precision"] != asked:
        metrics["precision_asked"] = asked
        notes.append(f"trainer.precision={asked} was asked; Lightning trained with {metrics['precision']} "
                     f"on {trainer.strategy.root_device.type}")
    if isinstance(fit_dm, FeatureDataModule):
        metrics["feature_extraction_s"] = round(fit_dm.extraction_time_s, 2)
        metrics["features_reused"] = fit_dm.reused_features  # images measured by the advice, not run again
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        if stage == "test" and not dm.has_test:
            continue
        result = run(model, datamodule=fit_dm, ckpt_path=ckpt, verbose=False)[0]
        metrics[f"{stage}_acc"] = round(float(result[f"{stage}/acc"]), 5)
        if f"{stage}/top5" in result:
            metrics[f"{stage}_top5"] = round(float(result[f"{stage}/top5"]), 5)
        metrics[f"{stage}_loss"] = round(float(result[f"{stage}/loss"]), 5)

    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_summary(metrics, run_dir, dm.class_counts(), notes)
    return metrics
