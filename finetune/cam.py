"""Where the model looks: Grad-CAM overlays (the ``grad-cam`` library) of an evaluated split.

``finetune.evaluate ... cam=true`` calls :func:`write_cams` with the split's probabilities: it draws
the misclassified images (the most confident mistakes first, at most :data:`MAX_WRONG`) and the
``per_class`` most confident correct images of each class, each explaining the predicted class,
into ``cam/wrong/`` and ``cam/right/``, and puts them together in ``cam/contact_sheet.png``.

The target layer is the backbone's last stage in timm's ``feature_info``, so it works for
convnets and ViTs alike. ViT tokens are turned into maps with the library's reshape transforms.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.data import ImageDataset
from finetune.errors import FineTuneError

if TYPE_CHECKING:
    from finetune.checkpoints import Preprocessing
    from finetune.data import Split

__all__ = ["MAX_WRONG", "SHEET_TILES", "CamImage", "grad_cams", "select_images", "target_layer", "write_cams"]

MAX_WRONG = 100  # misclassified images drawn, most confident first: each costs a backward pass
SHEET_TILES = 64  # tiles on the contact sheet (mistakes first)


@dataclass(frozen=True)
class CamImage:
    """One image drawn: its index in the split, true and predicted class, the prediction's probability."""

    index: int
    label: int
    pred: int
    prob: float

    @property
    def wrong(self) -> bool:
        return self.label != self.pred


def select_images(probs: torch.Tensor, labels: torch.Tensor, per_class: int) -> list[CamImage]:
    """The misclassified images (most confident first, at most MAX_WRONG), then each class's ``per_class``
    most confident correct ones."""
    conf, pred = probs.max(1)
    order = conf.argsort(descending=True).tolist()
    items = [CamImage(i, int(labels[i]), int(pred[i]), float(conf[i])) for i in order]
    wrong = [it for it in items if it.wrong][:MAX_WRONG]
    right: list[CamImage] = []
    for c in range(probs.shape[1]):
        right += [it for it in items if not it.wrong and it.label == c][:per_class]
    return wrong + right


def target_layer(backbone: nn.Module) -> tuple[nn.Module, str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The layer Grad-CAM reads (the last stage of ``feature_info``), its name, and a reshape transform."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise FineTuneError(f"backbone {type(backbone).__name__} has no timm feature_info: cam=true needs its stages")
    name = info[-1]["module"]
    layer = backbone.get_submodule(name)
    prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
    # With the class token as the pooled feature the last block's patch tokens never reach the
    # logits (zero gradients): read them where they enter that block, as the library advises for ViT.
    if getattr(backbone, "global_pool", None) == "token" and hasattr(layer, "norm1"):
        layer, name = layer.norm1, f"{name}.norm1"
    nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"

    def to_maps(t: torch.Tensor) -> torch.Tensor:
        from pytorch_grad_cam.utils.reshape_transforms import swinT_reshape_transform, vit_reshape_transform

        if t.ndim == 3:  # tokens (B, prefix + H*W, C) of a square crop
            side = math.isqrt(t.shape[1] - prefix)
            if prefix:  # the library's ViT transform drops one class token
                return vit_reshape_transform(t[:, prefix - 1:], height=side, width=side)
            return swinT_reshape_transform(t, height=side, width=side)
        return t.permute(0, 3, 1, 2) if nhwc else t

    return layer, name, to_maps


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)[:60] or "_"


def _rgb(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalized (3, H, W) input back as the float RGB crop the model saw, in [0, 1]."""
    img = x.permute(1, 2, 0).cpu().numpy() * np.asarray(std) + np.asarray(mean)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _write_sheet(tiles: list[tuple[np.ndarray, str, bool]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    cols = min(8, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    fig = Figure(figsize=(1.9 * cols, 2.1 * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (img, caption, wrong) in zip(axes, tiles):
        ax.imshow(img)
        ax.set_title(caption, fontsize=7, color="crimson" if wrong else "black")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # the title's strip stays clear
    fig.savefig(path, dpi=100)


def grad_cams(module: Any, x: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] of images ``x`` for ``classes``, at :func:`target_layer`."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, _, reshape = target_layer(module.backbone)
    # An input that requires grad: a frozen backbone's activations need a graph to carry gradients back.
    x = x.detach().clone().requires_grad_(True)
    with GradCAM(model=module, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def write_cams(
    module: Any, split: Split, prep: Preprocessing, probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str],
    out_dir: Path, per_class: int = 2, batch_size: int = 16,
) -> dict[str, Any]:
    """Grad-CAM overlays of :func:`select_images`' images of ``split`` into ``out_dir``, and the contact sheet.

    ``probs`` and ``labels`` are the split's, in its order, as evaluated with ``prep``; each image is
    explained through ``prep``'s eval crop, the input the model saw. Returns a summary for
    ``evaluation.json``: the folder, the layer, what was drawn.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise FineTuneError("cam=true needs the grad-cam package: pip install 'finetune[explain]'")
    if per_class < 0:
        raise FineTuneError(f"cam_per_class must be at least 0, got {per_class}")
    chosen = select_images(probs, labels, per_class)
    layer_name = target_layer(module.backbone)[1]
    # The map's resolution: a last stage of 1 x 1 cells (a small input) cannot say where, only how much.
    cells = max(1, prep.image_size // int(module.backbone.feature_info[-1]["reduction"]))
    for sub in ("wrong", "right"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for old in (out_dir / sub).glob("*.png"):  # an earlier evaluation's images would mix with these
            old.unlink()
    tiles: list[tuple[np.ndarray, str, bool]] = []
    dataset = ImageDataset(split, prep.transform())
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start:start + batch_size]
        x = torch.stack([dataset[it.index][0] for it in batch])
        for it, xi, m in zip(batch, x, grad_cams(module, x, [it.pred for it in batch])):
            overlay = show_cam_on_image(_rgb(xi, prep.mean, prep.std), m, use_rgb=True)
            true, pred = names[it.label], names[it.pred]
            file = (f"wrong/{it.index:05d}_{_safe(true)}_as_{_safe(pred)}.png" if it.wrong
                    else f"right/{it.index:05d}_{_safe(true)}.png")
            Image.fromarray(overlay).save(out_dir / file)
            caption = f"{true} as {pred} {it.prob:.2f}" if it.wrong else f"{true} {it.prob:.2f}"
            tiles.append((overlay, caption, it.wrong))
    n_wrong = sum(it.wrong for it in chosen)
    sheet = out_dir / "contact_sheet.png"
    if tiles:
        wrong, right = [t for t in tiles if t[2]], [t for t in tiles if not t[2]]
        # Mistakes first, but correct images keep at least half the sheet to compare them with.
        n_wrong_shown = min(len(wrong), SHEET_TILES - min(len(right), SHEET_TILES // 2))
        shown = wrong[:n_wrong_shown] + right[:SHEET_TILES - n_wrong_shown]
        _write_sheet(shown, sheet, f"Grad-CAM at {layer_name} ({cells}x{cells} cells): {n_wrong_shown} of {n_wrong} "
                                   f"misclassified (red, most confident first), {len(shown) - n_wrong_shown} of "
                                   f"{len(right)} correct (the most confident per class)")
    return {"dir": str(out_dir), "target_layer": layer_name, "cells": cells, "misclassified": n_wrong,
            "misclassified_in_split": int((probs.argmax(1) != labels).sum()), "correct": len(chosen) - n_wrong,
            "contact_sheet": str(sheet) if tiles else None}
