"""Classification metrics of predicted probabilities (torchmetrics), their printed report and picture.

Per-class precision and recall are torchmetrics', except where they are undefined: a class
never predicted has precision None (not torchmetrics' 0), a class without images has recall None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["format_report", "metrics_of", "percent", "write_confusion_png"]


def metrics_of(probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-5 (more than 5 classes), the confusion matrix (rows: true) and per-class recall/precision.

    Args:
        probs: ``(N, C)`` class probabilities.
        labels: ``(N,)`` true class indices.
        names: the ``C`` class names.
    """
    n = len(names)
    probs, labels = torch.as_tensor(probs).float(), torch.as_tensor(labels).long()
    if not len(labels):
        confusion = torch.zeros(n, n, dtype=torch.long)
        top1 = top5 = None
        precision = recall = torch.zeros(n)
    else:
        from torchmetrics.classification import (  # seconds to import: not for --help
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassPrecision,
            MulticlassRecall,
        )

        confusion = MulticlassConfusionMatrix(n)(probs, labels)
        precision = MulticlassPrecision(n, average=None)(probs, labels)
        recall = MulticlassRecall(n, average=None)(probs, labels)
        top1 = float(MulticlassAccuracy(n, top_k=1, average="micro")(probs, labels))
        top5 = float(MulticlassAccuracy(n, top_k=5, average="micro")(probs, labels)) if n > 5 else None
    support, predicted = confusion.sum(1).tolist(), confusion.sum(0).tolist()
    per_class = [
        {
            "class": name,
            "support": support[c],
            "recall": float(recall[c]) if support[c] else None,  # the class's accuracy
            "precision": float(precision[c]) if predicted[c] else None,
        }
        for c, name in enumerate(names)
    ]
    return {
        "images": int(len(labels)),
        "top1": top1,
        "top5": top5,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def percent(v: float | None) -> str:
    """``v`` as a percentage with two decimals, ``-`` for None."""
    return "-" if v is None else f"{100 * v:.2f}%"


def format_report(m: dict[str, Any], split: str) -> str:
    width = max([5, *(len(r["class"]) for r in m["per_class"])])
    lines = [f"{split}: {m['images']} images   top-1 {percent(m['top1'])}   top-5 {percent(m['top5'])}", ""]
    lines.append(f"{'class':<{width}}  {'support':>7}  {'accuracy':>9}  {'precision':>9}")
    for r in m["per_class"]:
        recall, precision = percent(r["recall"]), percent(r["precision"])
        lines.append(f"{r['class']:<{width}}  {r['support']:>7}  {recall:>9}  {precision:>9}")
    return "\n".join(lines)


def write_confusion_png(confusion: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """The confusion matrix, rows normalized to the true class (counts written in where they fit)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    n = len(names)
    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    side = min(4 + 0.4 * n, 30)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, label="share of the true class")
    ticks = np.arange(n)
    ax.set_xticks(ticks, [str(s) for s in names], rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(ticks, [str(s) for s in names], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
