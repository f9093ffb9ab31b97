"""A network measured as the course measures it (units, weights, connections), and what freezing saves.

**Units** are activations (stored for backprop), **weights** the memory and the capacity to
overfit, **connections** the add-multiplies of one forward pass (about 3 per connection per
training image: 1 forward, 2 backward). For a convolution with output W x H x J, I input
channels and a K x K kernel: W·H·J units, K²·I·J/groups weights, W·H·K²·(I/groups)·J
connections; a fully connected layer M -> N: N units (per token), MN weights, MN connections;
pooling: units x window. Biases are not weights here (as in the course): they are counted apart,
and so are norm layers' parameters.

Everything is read off one real forward pass at batch 1 (hooks on the leaf modules), and
cross-checked against ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from finetune.errors import FineTuneError
from finetune.freezing import FreezePlan
from finetune.stage_groups import backbone_stages

__all__ = ["MULTIPLY", "FreezeCost", "LayerSize", "SizeTable", "freeze_cost", "size_metrics", "size_table",
           "stage_labels", "stage_sums", "trainable_names"]

MULTIPLY = ("convolution", "fully connected")  # the kinds whose connections are multiply-adds


@dataclass(frozen=True)
class LayerSize:
    """One layer (or, from :func:`stage_sums`, one stage) as the course counts it.

    Attributes:
        kind: ``convolution``, ``fully connected``, ``pooling``; ``norm`` rows carry parameters only.
        weights: kernel or matrix entries, biases excluded; counted at a module's first call only.
        other_params: the parameters of a norm layer (``norm``) or of another module (``other``: ViT's
            position embedding, ...), its own only.
        index: position among the measured modules' calls in the forward pass (for what backward reaches).
    """

    name: str
    kind: str
    units: int = 0
    connections: int = 0
    weights: int = 0
    biases: int = 0
    other_params: int = 0
    index: int = 0


@dataclass(frozen=True)
class SizeTable:
    """A model measured at one input size: its layers, and where each module starts in the forward pass."""

    layers: list[LayerSize]
    starts: dict[str, int]
    params: int
    flop_counter_macs: int
    image_size: int

    def total(self, attr: str, kinds: Iterable[str] | None = None) -> int:
        return sum(getattr(r, attr) for r in self.layers if kinds is None or r.kind in kinds)


@dataclass(frozen=True)
class FreezeCost:
    """What a freeze strategy trains and costs, per training image.

    Attributes:
        train_macs: add-multiplies per image per epoch: 1x the frozen prefix, 3x from the first trainable layer on.
        once_macs: with cached features, the frozen prefix's 1x, paid once per image of the dataset.
        full_macs: what training everything costs (3x every connection).
    """

    trainable_weights: int
    weights: int
    units_kept: int
    units: int
    connections_backpropagated: int
    connections: int
    train_macs: int
    once_macs: int
    full_macs: int

    def macs_per_image(self, epochs: int) -> float:
        """Add-multiplies per image per epoch, the cached features' single pass spread over ``epochs``."""
        return self.train_macs + self.once_macs / max(1, epochs)


def _prod(v: Any) -> int:
    return math.prod(v) if isinstance(v, (tuple, list)) else int(v)


def _measure(name: str, mod: nn.Module, inp: Any, out: Any, first: bool) -> LayerSize | None:
    """The row of leaf module ``mod`` for this call, or None when it is not a course layer and holds no parameters."""
    units = out.numel() if isinstance(out, torch.Tensor) else 0
    bias = getattr(mod, "bias", None)
    biases = bias.numel() if first and isinstance(bias, torch.Tensor) else 0
    if isinstance(mod, nn.modules.conv._ConvNd):
        fan_in = _prod(mod.kernel_size) * mod.in_channels // mod.groups
        weights = fan_in * mod.out_channels if first else 0
        if mod.transposed:  # each input unit reaches K²·J/groups outputs
            return LayerSize(name, "convolution", units, inp.numel() * weights // mod.in_channels, weights, biases)
        return LayerSize(name, "convolution", units, units * fan_in, weights, biases)
    if isinstance(mod, nn.Linear):
        m, n = mod.in_features, mod.out_features
        return LayerSize(name, "fully connected", units, units * m, m * n if first else 0, biases)
    # Only the module's own: a norm that wraps its activation (timm's BatchNormAct2d) is no leaf.
    params = sum(p.numel() for p in mod.parameters(recurse=False)) if first else 0
    if "Pool" in type(mod).__name__ and not any(True for _ in mod.parameters()):
        kernel = getattr(mod, "kernel_size", None)  # adaptive pools have none: their window is input / output
        if isinstance(kernel, int):  # nn's pools take k for k x k (x k): one k per spatial dimension
            kernel = (kernel,) * (inp.dim() - 2)
        window = _prod(kernel) if kernel is not None else inp.numel() // max(1, units)
        return LayerSize(name, "pooling", units, units * window)
    if params:
        return LayerSize(name, "norm" if "Norm" in type(mod).__name__ else "other", other_params=params)
    return None


def _first_conv_in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            return m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
    raise FineTuneError("the model has no convolution or linear layer to measure")


def size_table(model: nn.Module, image_size: int, in_chans: int | None = None) -> SizeTable:
    """Units, weights and connections of every layer of ``model`` on one ``image_size`` x ``image_size`` image.

    The model runs once, eagerly (a compiled module is not compiled for this), in eval mode and
    without gradients; each module's train/eval mode is restored after.

    Args:
        in_chans: input channels; None: those of the first convolution (or linear layer).
    """
    if image_size < 1:
        raise FineTuneError(f"image_size must be at least 1, got {image_size}")
    in_chans = in_chans or _first_conv_in_channels(model)
    layers: list[LayerSize] = []
    starts: dict[str, int] = {}
    calls = [0]
    seen: set[str] = set()

    def pre(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: the input stays as it is
            starts.setdefault(name, calls[0])
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            row = _measure(name, mod, args[0] if args else None, out, first=name not in seen)
            seen.add(name)
            if row is not None:
                layers.append(replace(row, index=calls[0]))
            calls[0] += 1
        return hook

    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        if next(mod.children(), None) is None or next(mod.parameters(recurse=False), None) is not None:
            handles.append(mod.register_forward_hook(post(name)))
    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters(), None)
    model.eval()
    try:
        x = torch.zeros(1, in_chans, image_size, image_size,
                        device=first.device if first is not None else None,
                        dtype=first.dtype if first is not None and first.is_floating_point() else None)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            model(x)
    except RuntimeError as e:  # "Output size is too small", or out of memory: the image does not fit the network
        why = str(e).strip().splitlines()[0]
        raise FineTuneError(f"the model cannot run on a {image_size} px image: {why}") from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    params = sum(p.numel() for p in model.parameters())
    return SizeTable(layers, starts, params, counter.get_total_flops() // 2, image_size)


def stage_labels(model: nn.Module) -> dict[str, str]:
    """Parameter name -> stage label: the freeze strategies' stages of ``model.backbone``, and ``head``.

    A model without ``backbone`` and ``head`` children is one backbone (``backbone_stages`` of it).
    """
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if backbone is None or head is None:
        return {n: s.label for s in backbone_stages(model) for n in s.param_names}
    labels = {f"backbone.{n}": s.label for s in backbone_stages(backbone) for n in s.param_names}
    labels.update({f"head.{n}": "head" for n, _ in head.named_parameters()})
    return labels


def stage_sums(table: SizeTable, labels: Mapping[str, str]) -> list[LayerSize]:
    """The course's sums per stage, in forward order; a layer without parameters joins the stage before it."""
    sums: dict[str, LayerSize] = {}
    current = next(iter(labels.values()), "all")
    for r in table.layers:
        current = labels.get(f"{r.name}.weight", current)
        s = sums.get(current, LayerSize(current, "stage"))
        sums[current] = replace(s, units=s.units + r.units, connections=s.connections + r.connections,
                                weights=s.weights + r.weights, biases=s.biases + r.biases,
                                other_params=s.other_params + r.other_params)
    return list(sums.values())


def freeze_cost(table: SizeTable, trainable: Iterable[str], cached: bool = False) -> FreezeCost:
    """What training only the parameters named in ``trainable`` costs.

    Backward stops at the first trainable layer of the forward pass: nothing before it keeps its
    units or costs more than its forward pass (1x); from it on, each connection costs about 3x.

    Args:
        trainable: names of the parameters that train (as ``model.named_parameters()`` gives them).
        cached: the frozen prefix's outputs are computed once per dataset (``cache_features``), so it
            costs 1x once per image instead of 1x per epoch.
    """
    names = set(trainable)
    owners = [table.starts[n.rpartition(".")[0]] for n in names if n.rpartition(".")[0] in table.starts]
    first = min(owners, default=math.inf)
    course = [r for r in table.layers if r.kind != "norm" and r.kind != "other"]
    prefix = sum(r.connections for r in course if r.index < first)
    rest = sum(r.connections for r in course if r.index >= first)
    return FreezeCost(
        trainable_weights=sum(r.weights for r in course if f"{r.name}.weight" in names),
        weights=table.total("weights"),
        units_kept=sum(r.units for r in course if r.index >= first),
        units=table.total("units"),
        connections_backpropagated=rest,
        connections=prefix + rest,
        train_macs=3 * rest + (0 if cached else prefix),
        once_macs=prefix if cached else 0,
        full_macs=3 * (prefix + rest),
    )


def size_metrics(cost: FreezeCost) -> dict[str, int]:
    """The sizes a run records in ``metrics.json`` (``size``) and its summary."""
    out = {
        "units": cost.units, "units_kept_for_backward": cost.units_kept,
        "weights": cost.weights, "trainable_weights": cost.trainable_weights,
        "connections": cost.connections, "connections_backpropagated": cost.connections_backpropagated,
        "train_multiply_adds_per_image": cost.train_macs,
    }
    if cost.once_macs:
        out["feature_extraction_multiply_adds_per_image"] = cost.once_macs
    return out


def trainable_names(model: nn.Module, plan: FreezePlan, epoch: int) -> set[str]:
    """Names of ``model``'s parameters (``backbone.*``, ``head.*``) that train at ``epoch`` under ``plan``."""
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    return head | {f"backbone.{n}" for n, _ in model.backbone.named_parameters() if plan.trains(n, epoch)}
