"""Which memory format a backbone runs in: ``backbone.channels_last`` (timm's ``--channels-last``).

``None`` (the default) chooses by the network: channels-last for convolutional backbones, the
default (contiguous) layout for those whose only convolution is a patch embedding (ViT, Swin,
DeiT). Why, measured on this project's 2-core CPU with torch 2.14 (``python benchmarks/channels_last.py``,
training images/s of channels-last over the default, best of 3 rounds each): PyTorch's
contiguous-layout CPU kernel for depthwise convolutions is slow, and channels-last sends them to
oneDNN. EfficientNet-Lite0 2.58x at 32 px (batch 128; evaluation 4.09x) and 1.51x at 224 px,
MobileNetV3 1.31x at 64 px, ConvNeXt-Atto 1.01x, ResNet18 1.19x at 224 px but 0.94x at 64 px. A
ViT has nothing to gain (0.99x). End to end, ``data=fashion_mnist data.train_per_class=500
trainer.max_epochs=2`` took 41 s instead of 103 s, at the same test accuracy (78.01% and 78.08%).
On GPUs channels-last is what NVIDIA and timm recommend for convolutions under mixed precision
(tensor cores read NHWC); not measured here.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_channels_last", "is_convolutional", "resolve_channels_last"]


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` has more than one 2-D convolution (a ViT's patch embedding alone does not count)."""
    convs = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            convs += 1
            if convs > 1:
                return True
    return False


def resolve_channels_last(setting: bool | None, model: nn.Module) -> bool:
    """``setting`` where given, else whether ``model`` is convolutional (see the module's docstring)."""
    if setting is None:
        return is_convolutional(model)
    return bool(setting)


def apply_channels_last(model: nn.Module, setting: bool | None) -> bool:
    """Resolve ``setting`` for ``model`` and, where that says channels-last, convert it in place; returns the choice.

    Inputs must follow (``x.contiguous(memory_format=torch.channels_last)``): the caller holds the batches.
    """
    channels_last = resolve_channels_last(setting, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return channels_last
