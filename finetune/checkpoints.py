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
from typing import Any, Mapping

import torch

from finetune.checkpoint_io import load_error_reason, safe_load
from finetune.errors import FineTuneError

__all__ = ["Preprocessing", "check_finite", "class_names", "load_checkpoint", "output_dir_of", "resolve_preprocessing",
           "run_dir_of"]

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
        from finetune.data.transforms import eval_transform  # albumentations: seconds to import, not for --help

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
    Nothing in the file is executed (``weights_only``); a file that is not a checkpoint of this
    package, or whose weights are not finite, is a one-line error naming it, and so is a
    forward pass that gives non-finite logits.
    """
    from finetune.module import FineTuneModule

    if not path:
        raise FineTuneError("ckpt is not set; pass ckpt=PATH (e.g. outputs/DATE/TIME/checkpoints/best.ckpt)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FineTuneError(f"checkpoint '{path}' does not exist")
    raw = safe_load(path, "checkpoint")
    _check_is_ours(raw, path)
    try:
        module = FineTuneModule.load_from_checkpoint(path, map_location="cpu")
    except FineTuneError:
        raise
    except Exception as e:  # noqa: BLE001 - explained in one line
        raise FineTuneError(f"cannot load checkpoint '{path}': {_module_error(e)}") from None
    check_finite(module.state_dict(), f"checkpoint '{path}'")
    module.register_forward_hook(_finite_outputs(path))
    return module.eval(), raw


def _check_is_ours(raw: Any, path: Path) -> None:
    """Refuse, in words, what Lightning would fail on with a bare ``KeyError``."""
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise FineTuneError(f"'{path}' is not a Lightning checkpoint (a plain state dict? "
                            "use backbone.weights=PATH for weights files)")
    if not isinstance(raw, dict) or "state_dict" not in raw or "pytorch-lightning_version" not in raw:
        keys = ", ".join(map(str, list(raw)[:5])) if isinstance(raw, dict) else type(raw).__name__
        raise FineTuneError(f"'{path}' is not a Lightning checkpoint (it holds {keys or 'nothing'}; "
                            "use backbone.weights=PATH for weights files)")
    if "backbone" not in (raw.get("hyper_parameters") or {}):
        raise FineTuneError(f"'{path}' is a Lightning checkpoint, but not one of finetune "
                            "(no backbone in its hyper_parameters)")


def _module_error(e: BaseException) -> str:
    text = str(e)
    if "Error(s) in loading state_dict" in text:
        detail = next((ln.strip() for ln in text.splitlines()[1:] if ln.strip()), "")
        return f"its weights do not fit the model its hyperparameters describe ({detail[:200]})"
    return load_error_reason(e)


def check_finite(state: Mapping[str, Any], what: str) -> None:
    """Raise naming ``what`` and the first floating tensor of ``state`` holding NaN or inf."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise FineTuneError(f"{what} has non-finite weights: {name} holds {nan} NaN and {inf} inf of "
                                f"{t.numel()} values (a corrupted file, or a run that diverged)")


def _finite_outputs(path: Path) -> Any:
    """A forward hook: non-finite logits stop inference instead of writing NaN probabilities."""

    def hook(module: Any, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not bool(torch.isfinite(output).all()):
            raise FineTuneError(f"checkpoint '{path}' gives non-finite outputs (NaN or inf logits) for "
                                "these images: its weights overflow (a corrupted file, or a run that diverged)")

    return hook


def class_names(module: Any) -> list[str]:
    """The checkpoint's class names; numbered names where it was trained without them."""
    names = module.hparams.get("class_names")
    return list(names) if names else [str(i) for i in range(int(module.hparams.num_classes))]


def run_dir_of(ckpt: str | os.PathLike[str]) -> Path | None:
    """The run directory of a checkpoint saved in ``RUN/checkpoints/``, else None."""
    parent = Path(ckpt).expanduser().resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def output_dir_of(ckpt: str | os.PathLike[str]) -> Path:
    """Where a command writes what it derives from ``ckpt`` unless told otherwise (``out=``).

    The one rule of every command: beside the checkpoint's run directory (``RUN/`` for
    ``RUN/checkpoints/x.ckpt``), else beside the checkpoint file; never the working directory.
    """
    return run_dir_of(ckpt) or Path(ckpt).expanduser().resolve().parent


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
