"""A trained checkpoint: its module, class names, run directory, and the preprocessing it was evaluated with.

A checkpoint from before ``data_config`` was saved in it does not hold its preprocessing,
so that is recovered, first found wins, from: an explicit ``image_size``; a ``data_config``
in the checkpoint's hyperparameters or Lightning's ``datamodule_hyper_parameters``; the
run's ``config.yaml`` next to its ``checkpoints/`` folder; the backbone's pretrained config.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.data.transforms import eval_transform
from finetune.errors import FineTuneError

__all__ = ["Preprocessing", "class_names", "load_checkpoint", "resolve_preprocessing", "run_dir_of"]

# The data config keys that decide eval preprocessing (ImageDataModule's names).
_PREP_KEYS = ("image_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class Preprocessing:
    """The eval pipeline's settings, and where they were found."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    source: str
    crop_mode: str = "center"

    def transform(self) -> Any:
        """The albumentations eval pipeline of these settings."""
        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation, self.crop_mode)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> str:
        """One line for the commands' output."""
        return (f"preprocessing: {self.image_size} px, crop_pct {self.crop_pct}, {self.interpolation}"
                f"{'' if self.crop_mode == 'center' else f', crop_mode {self.crop_mode}'} (from {self.source})")


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """The FineTuneModule of checkpoint ``path`` in eval mode, on the CPU, and the raw dict.

    The raw dict (memory-mapped, no weights copied) is read for what the module does not keep.
    Inference moves the module to the accelerator itself (:mod:`finetune.inference`).
    """
    from finetune.module import FineTuneModule

    if not path:
        raise FineTuneError("ckpt is not set; pass ckpt=PATH (e.g. outputs/DATE/TIME/checkpoints/best.ckpt)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FineTuneError(f"checkpoint '{path}' does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        module = FineTuneModule.load_from_checkpoint(path, map_location="cpu")
    except FineTuneError:
        raise
    except Exception as e:
        raise FineTuneError(f"cannot load checkpoint '{path}': {' '.join(str(e).split())[:200]}") from None
    return module.eval(), raw


def class_names(module: Any) -> list[str]:
    """The checkpoint's class names; numbered names where it was trained without them."""
    names = module.hparams.get("class_names")
    return list(names) if names else [str(i) for i in range(int(module.hparams.num_classes))]


def run_dir_of(ckpt: str | os.PathLike[str]) -> Path | None:
    """The run directory of a checkpoint saved in ``RUN/checkpoints/``, else None."""
    parent = Path(ckpt).expanduser().resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def _saved_data_config(raw: dict[str, Any], ckpt: Path) -> tuple[dict[str, Any], str] | None:
    """The training run's data preprocessing keys, from the checkpoint or its run's config.yaml."""
    for where, holder in (
        ("checkpoint hparams data_config", (raw.get("hyper_parameters") or {}).get("data_config")),
        ("checkpoint datamodule_hyper_parameters", raw.get("datamodule_hyper_parameters")),
    ):
        if holder and any(holder.get(k) is not None for k in _PREP_KEYS):
            return dict(holder), where
    run_dir = run_dir_of(ckpt)
    config = run_dir / "config.yaml" if run_dir else None
    if config is None or not config.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        data = (loaded.get("data") if isinstance(loaded, dict) else None) or {}
    except Exception:  # an unreadable config.yaml is no reason to refuse: fall back to the backbone's
        return None
    return dict(data), str(config)


def resolve_preprocessing(
    module: Any, raw: dict[str, Any], ckpt: str | os.PathLike[str], image_size: int | None = None
) -> Preprocessing:
    """The eval preprocessing of the run that saved ``ckpt``; see the module docstring for the order."""
    backbone = module.data_config
    saved = _saved_data_config(raw, Path(ckpt))
    data, source = saved if saved else ({}, f"backbone {module.hparams.backbone} defaults")
    if image_size is not None:
        data, source = {**data, "image_size": image_size}, f"image_size={image_size}, rest from {source}"

    def pick(key: str, fallback: Any) -> Any:
        value = data.get(key)
        return fallback if value is None else value

    # A saved data config without the key predates crop_mode: that run center-cropped. A key
    # present but null means "the backbone's", as for the other keys.
    predates = saved is not None and "crop_mode" not in saved[0]
    crop_fallback = "center" if predates else (backbone.get("crop_mode") or "center")
    return Preprocessing(
        image_size=int(pick("image_size", backbone["input_size"][-1])),
        mean=tuple(float(v) for v in pick("mean", backbone["mean"])),
        std=tuple(float(v) for v in pick("std", backbone["std"])),
        crop_pct=float(pick("crop_pct", backbone.get("crop_pct", 0.875))),
        interpolation=str(pick("interpolation", backbone.get("interpolation", "bicubic"))),
        crop_mode=str(pick("crop_mode", crop_fallback)),
        source=source,
    )
