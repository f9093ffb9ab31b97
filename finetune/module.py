"""FineTuneModule: a pretrained timm backbone, a new head, and how it trains."""

from __future__ import annotations

import contextvars
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from finetune.backbones import create_backbone
from finetune.calibration import check_temperature
from finetune.callbacks import FreezeSchedule
from finetune.config import BackboneConfig, LossConfig, OptimConfig
from finetune.errors import FineTuneError
from finetune.freezing import FreezePlan, set_frozen_norms_eval
from finetune.heads import build_head, head_config
from finetune.l2sp import L2SP
from finetune.loss import TrainingLoss, build_criterion
from finetune.memory_format import apply_channels_last
from finetune.module_args import compile_kwargs, instantiate_leaf, plain
from finetune.optim import param_groups
from finetune.strategies import FreezeStrategy, get_strategy

__all__ = ["FineTuneModule"]

# Frozen BatchNorm layers are in eval mode on purpose (see finetune.freezing).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

# Set while load_from_checkpoint rebuilds a module: the checkpoint holds every weight,
# so looking up pretrained weights again would be wasted time, or fail on a machine
# that lacks the original weights file.
_RESTORING = contextvars.ContextVar("finetune_restoring", default=False)


class FineTuneModule(pl.LightningModule):
    """Fine-tune an ImageNet-pretrained timm backbone with a new classification head.

    Batches are ``(images, labels)`` tensors, so any such DataLoader works.

    Args:
        backbone: timm model name.
        num_classes: classes of the new head.
        pretrained: start from pretrained weights (see :mod:`finetune.backbones`).
        weights: explicit pretrained weights file.
        freeze: strategy name (``finetune.strategies.STRATEGIES``), a :class:`FreezeStrategy`, or a
            mapping with ``name`` and the strategy's options.
        head: ``linear``, ``mlp``, or a ``_target_`` mapping (``{"_target_": "finetune.heads.MLPHead",
            "hidden_dim": 256}``); the class gets ``num_features`` and ``num_classes``.
        lr: learning rate of the head.
        backbone_lr_mult: the backbone's LR is ``lr * backbone_lr_mult``: pretrained
            weights need much smaller steps than the freshly initialized head.
        layer_decay: optional layer-wise decay: stage ``i`` of ``S`` gets a further
            ``layer_decay ** (S - 1 - i)``, so layers nearer the input move least.
        weight_decay: weight decay (not applied to norms, biases and the model's ``no_weight_decay()``).
        l2sp: L2-SP's alpha: pull the backbone toward its pretrained weights (:mod:`finetune.l2sp`); 0: off.
        optimizer: a partial ``torch.optim`` class as a ``_target_`` mapping; None: AdamW.
        scheduler: a partial ``(optimizer, total_steps, steps_per_epoch)`` factory as a ``_target_``
            mapping; None: :func:`finetune.optim.build_scheduler` (warmup, then cosine, per group).
        label_smoothing: cross-entropy label smoothing.
        class_weights: one cross-entropy weight per class (PyTorch's ``weight``), or None for
            equal weights; ``finetune.builders.build_module`` turns ``balanced`` into a list.
        mixup: Mixup/CutMix of training batches (:mod:`finetune.loss`), a mapping of the mixing
            fields of :class:`~finetune.data.augment.AugmentConfig` (``{"mixup": 0.2}``); None: off.
        channels_last: keep weights and inputs in channels-last memory format (timm's
            ``--channels-last``): faster convolutions on recent CPUs and GPUs. None: on where the
            backbone is convolutional (:func:`finetune.memory_format.resolve_channels_last`).
        class_names: names of the classes, saved with the checkpoint.
        compile: ``torch.compile`` the backbone in place (``nn.Module.compile``, so checkpoint keys
            do not change): False, True for torch's defaults (the inductor backend), a backend
            name, or ``torch.compile``'s keyword arguments (``{"backend": ..., "mode": ...}``). Not saved
            with the checkpoint: it is a choice of how to train, and a module loaded for
            predictions runs uncompiled unless compiled again.

    Defaults are those of :mod:`finetune.config` (the CLI's), so both train the same way.
    """

    def __init__(
        self,
        backbone: str = BackboneConfig.name,
        num_classes: int = 10,
        pretrained: bool = BackboneConfig.pretrained,
        weights: str | None = BackboneConfig.weights,
        freeze: str | FreezeStrategy | Mapping[str, Any] = "none",
        head: str | Mapping[str, Any] = "linear",
        lr: float = OptimConfig.lr,
        backbone_lr_mult: float = OptimConfig.backbone_lr_mult,
        layer_decay: float | None = OptimConfig.layer_decay,
        weight_decay: float = OptimConfig.weight_decay,
        l2sp: float = OptimConfig.l2sp,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        label_smoothing: float = LossConfig.label_smoothing,
        class_weights: Sequence[float] | None = LossConfig.class_weights,
        mixup: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        channels_last: bool | None = BackboneConfig.channels_last,
        compile: bool | str | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        strategy = get_strategy(plain(freeze))
        self.save_hyperparameters(ignore=["compile"])
        self.hparams["freeze"] = strategy.to_dict()
        self.hparams["head"] = head_config(plain(head))
        defaults = OptimConfig()
        self.hparams["optimizer"] = plain(optimizer) if optimizer is not None else plain(defaults.optimizer)
        self.hparams["scheduler"] = plain(scheduler if scheduler is not None else OmegaConf.structured(defaults.scheduler))
        if class_names is not None:
            self.hparams["class_names"] = list(class_names)
        if weights is not None:
            self.hparams["weights"] = os.fspath(weights)
        if class_weights is not None and not isinstance(class_weights, str):
            self.hparams["class_weights"] = [float(w) for w in class_weights]  # plain floats load with weights_only

        built = create_backbone(backbone, pretrained=pretrained and not _RESTORING.get(), weights=weights)
        self.weights_source = "checkpoint" if _RESTORING.get() else built.weights_source
        model = built.model
        model.reset_classifier(0)
        self.backbone = strategy.adapt(model)  # freeze=lora adds adapters, also before a checkpoint loads
        self.head = build_head(self.hparams["head"], model.num_features, num_classes)
        self.strategy = strategy
        self.freeze_plan = FreezePlan.build(self.backbone, strategy)
        self.l2sp = L2SP(self.backbone, self.freeze_plan, l2sp, start_known=not _RESTORING.get())
        # False under DDP with a schedule that unfreezes: see finetune.freezing.
        self.gate_requires_grad = True
        # A plain list, so these modules are not registered twice.
        self._frozen_norms: list[nn.Module] = []
        self.apply_freeze(0)
        # The head takes pooled (B, C) features: only the backbone has 4-D weights to convert.
        self.channels_last = apply_channels_last(self.backbone, channels_last)
        self.compile_kwargs = compile_kwargs(compile)
        if self.compile_kwargs is not None:
            self.backbone.compile(**self.compile_kwargs)
        # predict_step divides logits by it; fitted by finetune.callbacks.CalibrateTemperature, 1.0: not calibrated.
        self.temperature = 1.0

        self.criterion = build_criterion(num_classes, label_smoothing, class_weights)  # val/test: always hard labels
        self.train_loss = TrainingLoss(self.criterion, num_classes, plain(mixup))
        self.hparams["mixup"] = self.train_loss.options
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.has_top5 = num_classes > 5
        if self.has_top5:
            self.val_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "FineTuneModule":  # type: ignore[override]
        """Rebuild from a checkpoint without Hydra and without fetching pretrained weights."""
        token = _RESTORING.set(True)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _RESTORING.reset(token)

    # -- model -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images ``(B, C, H, W)``, or of backbone features ``(B, num_features)``.

        Features are what :class:`finetune.features.FeatureDataModule` feeds when the
        backbone is frozen throughout and its outputs were computed once.
        """
        return self.head(x if x.ndim == 2 else self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features ``(B, num_features)`` of images ``(B, C, H, W)``."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def train(self, mode: bool = True) -> "FineTuneModule":
        super().train(mode)
        if mode:
            set_frozen_norms_eval(self._frozen_norms)
        return self

    def apply_freeze(self, epoch: int) -> None:
        """Make the trainable set and BatchNorm modes those of ``epoch`` under the freeze strategy."""
        self._frozen_norms = self.freeze_plan.apply(self.backbone, self.head, epoch, self.gate_requires_grad)
        self.train(self.training)

    def configure_callbacks(self) -> list[pl.Callback]:
        # The module brings its freeze schedule, so plain Lightning code follows the strategy too
        # (once: validate/test after fit ask again, and Lightning would warn about replacing it).
        if any(isinstance(c, FreezeSchedule) for c in self.trainer.callbacks):
            return []
        return [FreezeSchedule()]

    def trainable_params_at(self, epoch: int) -> int:
        """Parameters the strategy trains at ``epoch`` (head included)."""
        return self.freeze_plan.trainable_count(self.backbone, self.head, epoch)

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's preprocessing (input size, mean, std, interpolation, crop_pct)."""
        import timm

        return timm.data.resolve_model_data_config(self.backbone)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- steps -------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, target = self.train_loss.mix(*batch)
        y = self.train_loss.labels(target)  # with mixing: the mixed target's dominant label
        logits = self(x)
        loss = self.train_loss(logits, target)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return self.l2sp.add_to(loss, self, len(y))

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self.criterion(logits, y), prog_bar=stage == "val", batch_size=len(y))
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=len(y))
        if self.has_top5:
            top5 = getattr(self, f"{stage}_top5")
            top5(logits, y)
            self.log(f"{stage}/top5", top5, batch_size=len(y))
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The batch's uncalibrated logits: calibration reuses the last validation's (finetune/callbacks/calibrate.py)."""
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Calibrated probabilities; views ``(B, V, C, H, W)`` (:mod:`finetune.tta`) are averaged per image."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x.ndim == 5:
            b, v = x.shape[:2]
            return (self(x.flatten(0, 1)) / self.temperature).softmax(-1).unflatten(0, (b, v)).mean(1)
        return (self(x) / self.temperature).softmax(-1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["temperature"] = float(self.temperature)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint from before calibration existed is uncalibrated: 1.0.
        self.temperature = check_temperature(checkpoint.get("temperature", 1.0), "the checkpoint's temperature")

    # -- optimization ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(
            self.backbone, self.head, self.freeze_plan, hp.lr, hp.backbone_lr_mult, hp.weight_decay, hp.layer_decay,
            backbone_weight_decay=0.0 if hp.l2sp else None,  # L2-SP replaces it on the backbone
        )
        optimizer = instantiate_leaf(hp.optimizer, "optim.optimizer")(groups, lr=hp.lr)
        total = self.trainer.estimated_stepping_batches
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        if not math.isfinite(total) or epochs is None:
            raise FineTuneError("the LR schedule needs a finite trainer.max_epochs")
        steps_per_epoch = max(1, int(round(total / epochs)))
        scheduler = instantiate_leaf(hp.scheduler, "optim.scheduler")(
            optimizer, total_steps=int(total), steps_per_epoch=steps_per_epoch
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
