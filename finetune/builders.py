"""Config -> objects. A leaf: nothing here imports a module that imports it (see tests/test_architecture.py)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from finetune.data import ImageDataModule
from finetune.errors import FineTuneError

__all__ = ["build_datamodule"]


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The DataModule of ``cfg.data``, preprocessed for ``cfg.backbone.name``."""
    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    augment = OmegaConf.to_container(cfg.augment, resolve=True) if "augment" in cfg else None
    try:
        return ImageDataModule(backbone=cfg.backbone.name, seed=cfg.seed, augment=augment, **kwargs)  # type: ignore[arg-type]
    except TypeError as e:
        raise FineTuneError(f"bad data config: {e}") from None
