"""Config -> objects: the data, the module, the trainer (with its callbacks and logger).

A leaf below ``train``, ``advise``, ``evaluate`` and ``predict``: nothing here imports a module
that imports it (tests/test_architecture.py walks the import graph).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from finetune.budget import run_budget_s
from finetune.callbacks.budget_planner import BudgetPlanner
from finetune.callbacks.ema import ema_from_config
from finetune.checkpoint_plugin import AtomicCheckpointIO
from finetune.config import OptimConfig
from finetune.data import ImageDataModule
from finetune.data.augment import mixing_options
from finetune.distributed import check_script_launcher
from finetune.errors import FineTuneError
from finetune.features import FeatureDataModule, PrecomputedFeatures, resolve_cache_features
from finetune.lr_find import FIND, FindLR, check_lr
from finetune.module import FineTuneModule

__all__ = [
    "balanced_class_weights", "build_callbacks", "build_datamodule", "build_fit_datamodule", "build_logger",
    "build_module", "build_trainer", "check_run_config",
]

_EVALUATE = ("last", "best")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _unknown_keys(node: Any, path: str = "") -> list[str]:
    """Keys of typed config nodes that their dataclass does not have (``+ckpt_path=...`` would be ignored)."""
    import dataclasses

    kind = OmegaConf.get_type(node)
    found: list[str] = []
    if kind is not None and dataclasses.is_dataclass(kind) and kind.__name__ != "TrainerConfig":
        known = {f.name for f in dataclasses.fields(kind)}
        found += [f"{path}{k}" for k in node.keys() if k not in known]
    for k in node.keys():
        child = node._get_node(k)
        if isinstance(child, DictConfig) and k not in ("callbacks", "logger"):
            found += _unknown_keys(child, f"{path}{k}.")
    return found


def check_run_config(cfg: DictConfig) -> None:
    """Values the types cannot check, before anything slow runs."""
    unknown = _unknown_keys(cfg)
    if unknown:
        hint = "; to continue a run use resume=RUN_DIR" if any("ckpt" in k for k in unknown) else ""
        raise FineTuneError(f"unknown config key(s) {', '.join(unknown)}: nothing reads them{hint}")
    if cfg.evaluate not in _EVALUATE:
        raise FineTuneError(f"evaluate must be one of {', '.join(_EVALUATE)}, got '{cfg.evaluate}'")
    check_lr(cfg.optim.lr)
    _check_find_share(cfg)
    run_budget_s(cfg)  # budget=abc, -1, 0s: one line here, before anything slow
    ema_from_config(cfg.get("ema"))  # a bad ema.decay stops the run here
    callbacks = {k: v for k, v in (_plain(cfg.callbacks) or {}).items() if v}
    targets = [str(v.get("_target_", "")) for v in callbacks.values()]
    if not any(t.endswith("RunRecorder") for t in targets):
        raise FineTuneError("callbacks has no RunRecorder (finetune.callbacks.RunRecorder): a run needs it to report")
    if cfg.evaluate == "best" and not any(v.get("monitor") for v in callbacks.values()):
        raise FineTuneError("evaluate=best needs a checkpoint callback with a monitor (callbacks.best_checkpoint)")


def _check_find_share(cfg: DictConfig) -> None:
    steps = cfg.optim.get("find_num_training_steps", 100)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3:  # the valley rule needs 3 falling points
        raise FineTuneError(f"optim.find_num_training_steps must be an integer of at least 3, got '{steps}'")
    share = cfg.optim.get("find_share")
    if share is None:
        return
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise FineTuneError(f"optim.find_share must be in (0, 1], got '{share}'")
    if cfg.optim.lr == FIND or not cfg.get("budget"):
        raise FineTuneError("optim.find_share needs budget= and a numeric optim.lr (the LR trained when the finder "
                            "does not fit); optim.lr=find runs the finder always")


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The DataModule of ``cfg.data`` and ``cfg.augment``, preprocessed for ``cfg.backbone.name``."""
    from finetune.data.sources import SOURCES
    from finetune.data.streaming import StreamingDataModule

    # A source that streams shards (data=webdataset) cannot be listed: its own DataModule feeds it.
    kind = StreamingDataModule if getattr(SOURCES.get(cfg.data.source), "streams", False) else ImageDataModule
    return kind(backbone=cfg.backbone.name, seed=cfg.seed, augment=_plain(cfg.augment), **_plain(cfg.data))


def balanced_class_weights(counts: Sequence[int], class_names: Sequence[str] | None = None) -> list[float]:
    """scikit-learn's ``balanced``: ``n_samples / (n_classes * count_c)``, so each class weighs the same in total."""
    for c, n in enumerate(counts):
        if n <= 0:
            name = class_names[c] if class_names else str(c)
            raise FineTuneError(f"loss.class_weights=balanced: class '{name}' has no training images")
    total = sum(counts)
    return [total / (len(counts) * n) for n in counts]


def _class_weights(value: Any, dm: ImageDataModule) -> list[float] | None:
    if value is None:
        return None
    if value == "balanced":
        return balanced_class_weights(dm.class_counts()["train"], dm.classes)
    if isinstance(value, str):
        raise FineTuneError(f"loss.class_weights must be null, balanced or a list of floats, got '{value}'")
    try:
        return [float(w) for w in value]
    except (TypeError, ValueError):
        raise FineTuneError(f"loss.class_weights must be null, balanced or a list of floats, got {value}") from None


def build_module(cfg: DictConfig, dm: ImageDataModule) -> FineTuneModule:
    """The FineTuneModule of ``cfg.backbone``, ``cfg.freeze``, ``cfg.head``, ``cfg.optim`` and ``cfg.loss`` for ``dm``."""
    b, o = cfg.backbone, cfg.optim
    model = FineTuneModule(
        backbone=b.name,
        num_classes=dm.num_classes,
        pretrained=b.pretrained,
        weights=b.weights,
        freeze=_plain(cfg.freeze),
        head=_plain(cfg.head),
        lr=OptimConfig.lr if o.lr == FIND else o.lr,  # optim.lr=find: FindLR replaces it before the first step
        backbone_lr_mult=o.backbone_lr_mult,
        layer_decay=o.layer_decay,
        weight_decay=o.weight_decay,
        l2sp=o.l2sp,
        optimizer=_plain(o.optimizer),
        scheduler=_plain(o.scheduler),
        label_smoothing=cfg.loss.label_smoothing,
        class_weights=_class_weights(_plain(cfg.loss.class_weights), dm),
        mixup=mixing_options(dm.augment),  # augment.mixup/cutmix: mixed in the training step (finetune.loss)
        class_names=dm.classes,
        channels_last=b.channels_last,
        compile=_plain(cfg.compile),
    )
    # The preprocessing goes into the checkpoint, so predict/evaluate need nothing but the checkpoint.
    model.hparams["data_config"] = dm.data_config
    return model


def build_fit_datamodule(
    cfg: DictConfig, dm: ImageDataModule, model: FineTuneModule, precomputed: Sequence[PrecomputedFeatures] = ()
) -> ImageDataModule | FeatureDataModule:
    """What the trainer fits on: cached backbone features when ``cache_features`` allows, else the images."""
    cached = resolve_cache_features(cfg.cache_features, model, dm)
    return FeatureDataModule(dm, model, precomputed=precomputed) if cached else dm


def _instantiate(name: str, node: Mapping[str, Any], run_dir: Path) -> Any:
    from hydra.utils import instantiate

    node = dict(node)
    for key in ("dirpath", "save_dir"):  # relative output paths are inside the run directory
        if isinstance(node.get(key), str) and not Path(node[key]).expanduser().is_absolute():
            node[key] = str(run_dir / node[key])
    try:
        return instantiate(node, _convert_="all")
    except Exception as e:  # noqa: BLE001 - a bad _target_ or argument is the user's to fix
        cause = e.__cause__ or e
        raise FineTuneError(f"{name}: {(str(cause).strip().splitlines() or [type(cause).__name__])[0]}") from None


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    """``cfg.callbacks`` (name -> ``_target_`` object; null entries skipped), built; the EMA of ``cfg.ema`` first."""
    nodes = _plain(cfg.get("callbacks")) or {}
    ema = ema_from_config(cfg.get("ema"))  # first: every later hook sees the weights it swaps in
    built = [_instantiate(f"callbacks.{k}", v, run_dir) for k, v in nodes.items() if v is not None]
    return [ema, *built] if ema else built


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """``cfg.logger`` built (a ``_target_`` object, a mapping of them, or null/false for none)."""
    node = _plain(cfg.get("logger"))
    if not node:
        return False
    if "_target_" in node:
        return _instantiate("logger", node, run_dir)
    return [_instantiate(f"logger.{k}", v, run_dir) for k, v in node.items() if v is not None]


def _run_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    """What ``optim.lr=find`` and ``budget=`` add: the LR finder (first: its test runs before the others start
    their clocks) and the budget's planner (a tune trial's with what earlier trials left: finetune.trial_budget)."""
    budget_s = run_budget_s(cfg)
    trial = None
    if budget_s and cfg.get("recipe") == "tune":
        from finetune.trial_budget import in_sequential_sweep, trial_share

        job_num = in_sequential_sweep()
        if job_num is not None:
            trial = trial_share(budget_s, int(cfg.tune.n_trials), run_dir, job_num)
            budget_s = trial["budget_s"]
    share = cfg.optim.get("find_share")
    steps = int(cfg.optim.get("find_num_training_steps", 100))
    finder = ([FindLR(num_training_steps=steps)] if cfg.optim.lr == FIND
              else [FindLR(num_training_steps=steps, budget_share=float(share))] if share is not None else [])
    planner = BudgetPlanner(budget_s, record={"trial": trial} if trial else None,
                            validates_best=cfg.get("evaluate") == "best",
                            replan=bool(cfg.get("budget_replan", True))) if budget_s else None
    return [*finder, *([planner] if planner else [])]


def _has_progress_bar(callbacks: Sequence[Any]) -> bool:
    from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar

    return any(isinstance(c, ProgressBar) for c in callbacks)


def build_trainer(cfg: DictConfig, run_dir: str | Path) -> pl.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` (Trainer's own argument names) writing into ``run_dir``."""
    run_dir = Path(run_dir)
    kwargs: dict[str, Any] = _plain(cfg.trainer)
    # Checkpoints written beside their target and renamed: a kill never leaves a partial last.ckpt.
    plugins = [AtomicCheckpointIO(), *(kwargs.pop("plugins", None) or [])]
    callbacks = [*_run_callbacks(cfg, run_dir), *build_callbacks(cfg, run_dir)]
    if kwargs.get("enable_progress_bar", True) and not _has_progress_bar(callbacks) and not sys.stdout.isatty():
        # TQDM's redraws become one line per step in a pipe or a log file: one line per epoch there instead.
        from finetune.callbacks.epoch_line import EpochLine

        callbacks.append(EpochLine())
    try:
        trainer = pl.Trainer(default_root_dir=run_dir, logger=build_logger(cfg, run_dir),
                             callbacks=callbacks, plugins=plugins, **kwargs)
    except TypeError as e:  # an argument Trainer does not take, e.g. +trainer.max_epoch=1
        raise FineTuneError(f"trainer: {e}") from None
    check_script_launcher(trainer)  # strategy=ddp in a --multirun would rerun the sweep in each child
    return trainer
