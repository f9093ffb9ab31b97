"""Temperature scaling (Guo et al. 2017) and the numbers that say how well probabilities are calibrated.

One scalar ``T`` divides the logits: ``softmax(logits / T)``. ``T`` is fitted on held-out
(val) logits by minimizing the negative log-likelihood; being one positive scalar, it never
changes which class is on top, so accuracy is untouched while over-confident probabilities
(``T > 1``) are softened. :class:`finetune.callbacks.CalibrateTemperature` fits it at the end
of every run and stores it in the checkpoints; ``FineTuneModule.predict_step`` applies it.

The measures are those of Guo et al.: NLL, expected calibration error over 15 equal-width
confidence bins (torchmetrics' ``MulticlassCalibrationError``) and the (multiclass) Brier score.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from finetune.errors import FineTuneError

__all__ = [
    "ECE_BINS", "TEMPERATURE_RANGE", "calibration_metrics", "check_temperature", "fit_temperature",
    "format_calibration", "write_reliability_png",
]

ECE_BINS = 15  # Guo et al.'s bins
# With a val set classified without a single error, the NLL keeps falling as T -> 0 (ever more
# confident); the bound stops that at "100x sharper" instead of at one-hot probabilities.
TEMPERATURE_RANGE = (0.01, 100.0)


def check_temperature(value: Any, what: str = "temperature") -> float:
    """``value`` as a float, or a :class:`FineTuneError` unless it is finite and positive."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise FineTuneError(f"{what} must be a positive number, got '{value}'") from None
    if not (math.isfinite(t) and t > 0):
        raise FineTuneError(f"{what} must be a positive finite number, got {t}")
    return t


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The ``T`` minimizing ``cross_entropy(logits / T, labels)``: LBFGS on ``log T`` from ``T = 1``.

    Args:
        logits: ``(N, C)`` uncalibrated logits of held-out images.
        labels: ``(N,)`` their classes.
        max_iter: LBFGS iterations (one scalar: it converges in a handful).

    Raises:
        FineTuneError: no images, or logits that are not finite.
    """
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().to("cpu", torch.long)
    if z.ndim != 2 or not len(z) or len(z) != len(y):
        raise FineTuneError(f"temperature scaling needs (N, C) logits and N labels with N > 0, got "
                            f"{tuple(z.shape)} and {tuple(y.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise FineTuneError("temperature scaling: the val logits are not finite (a run that diverged)")
    lo, hi = (math.log(b) for b in TEMPERATURE_RANGE)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit inside no_grad (Lightning's hooks)
        optimizer.step(closure)
    return float(log_t.detach().clamp(lo, hi).exp())


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    # A probability that underflowed to 0 counts as float32's smallest, not as an infinite loss.
    p = probs.gather(1, labels[:, None]).squeeze(1).double().clamp_min(torch.finfo(torch.float32).tiny)
    return float(-p.log().mean())


def _brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    # Brier's multiclass score (no torchmetrics metric): squared distance to the one-hot label, summed over classes.
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, float | None]:
    """NLL, ECE (``n_bins`` equal-width bins of top-1 confidence, torchmetrics) and Brier score of ``probs``.

    All None for an empty split.
    """
    probs, labels = torch.as_tensor(probs).float(), torch.as_tensor(labels).long()
    if not len(labels):
        return {"nll": None, "ece": None, "brier": None}
    from torchmetrics.classification import MulticlassCalibrationError  # seconds to import: not for --help

    ece = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1")(probs, labels)
    return {"nll": _nll(probs, labels), "ece": float(ece), "brier": _brier(probs, labels)}


def format_calibration(temperature: float, before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """``calibration  T 1.52: NLL 0.210 -> 0.150   ECE 3.10% -> 1.20%   Brier 0.0500 -> 0.0450``."""
    if before.get("nll") is None:
        return f"calibration  T {temperature:.3g} (no images to measure it on)"

    def pair(key: str, fmt: str) -> str:
        return f"{format(before[key], fmt)} -> {format(after[key], fmt)}"

    head = f"calibration  T {temperature:.3g}" + (" (not calibrated)" if temperature == 1.0 else "")
    return f"{head}: NLL {pair('nll', '.4f')}   ECE {pair('ece', '.2%')}   Brier {pair('brier', '.4f')}"


def _bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> tuple[list[float], list[float], list[int]]:
    """Per equal-width confidence bin: mean confidence, accuracy, count (the bins torchmetrics' ECE uses)."""
    conf, pred = probs.max(1)
    hit = (pred == labels).float()
    # torchmetrics' bins (bucketize(right=True) on linspace(0, 1, n_bins + 1), minus one), except that a
    # confidence of exactly 1, a bin of its own there, is drawn in the last bar.
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins)
    mean_conf = torch.bincount(idx, conf, minlength=n_bins) / count.clamp_min(1)
    acc = torch.bincount(idx, hit, minlength=n_bins) / count.clamp_min(1)
    return mean_conf.tolist(), acc.tolist(), count.tolist()


def write_reliability_png(
    panels: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str, n_bins: int = ECE_BINS
) -> None:
    """A reliability diagram per panel (``name -> (probs, labels)``): accuracy against confidence per bin.

    Bars are each bin's accuracy, the red outline the gap to its mean confidence; a calibrated
    model's bars follow the diagonal. Each panel's title gives its ECE.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(4.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 1.0 / n_bins
    centers = [(i + 0.5) * width for i in range(n_bins)]
    for ax, (name, (probs, labels)) in zip(axes, panels.items()):
        probs, labels = torch.as_tensor(probs).float(), torch.as_tensor(labels).long()
        conf, acc, count = _bins(probs, labels, n_bins)
        shown = [c > 0 for c in count]
        ax.bar([x for x, s in zip(centers, shown) if s], [a for a, s in zip(acc, shown) if s], width=width,
               color="tab:blue", edgecolor="white", label="accuracy")
        ax.bar([x for x, s in zip(centers, shown) if s], [c - a for c, a, s in zip(conf, acc, shown) if s],
               bottom=[a for a, s in zip(acc, shown) if s], width=width, fill=False, edgecolor="tab:red",
               hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        ece = calibration_metrics(probs, labels, n_bins)["ece"]
        ax.set_title(f"{name}: ECE {ece:.2%}" if ece is not None else name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
