"""Averaging in weight space: interpolation (WiSE-FT) and uniform averages (model soups) of checkpoints.

Both need models that share every parameter name and shape (same backbone, head and classes);
:func:`mismatch` says in words why two do not. Floating tensors, BatchNorm running statistics
included, are averaged; integer buffers (``num_batches_tracked``) are taken from one model, since
an average of step counts means nothing. Used by ``python -m finetune.interpolate``
(:mod:`finetune.interpolate`), ``wise_ft=true`` (:class:`finetune.callbacks.wise_ft.WiseFT`) and
``python -m finetune.compare DIR --soup`` (:mod:`finetune.soup`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from finetune.errors import FineTuneError

__all__ = [
    "DEFAULT_ALPHAS", "choose_alpha", "check_alphas", "loader_probabilities", "lerp_state", "mean_state", "mismatch",
    "plot_curve", "scores", "sweep_alphas", "weights_checkpoint",
]

State = Mapping[str, torch.Tensor]

# WiSE-FT's grid (Wortsman et al. 2022): 0 is the starting point, 1 the fine-tuned weights.
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))

# What a saved average keeps of its template checkpoint: enough to load and predict, nothing to resume
# (its optimizer state belongs to other weights).
_KEPT = ("pytorch-lightning_version", "hyper_parameters", "hparams_name", "datamodule_hyper_parameters",
         "datamodule_hparams_name", "epoch", "global_step")


def check_alphas(alphas: Iterable[Any]) -> list[float]:
    """The grid as sorted unique floats in [0, 1], or a FineTuneError."""
    try:
        values = sorted({float(a) for a in alphas})
    except (TypeError, ValueError):
        raise FineTuneError(f"alphas must be numbers in [0, 1], got {list(alphas)}") from None
    if not values or any(not (0.0 <= a <= 1.0) for a in values):
        raise FineTuneError(f"alphas must be one or more numbers in [0, 1], got {values}")
    return values


def _hp(hparams: Mapping[str, Any], key: str) -> Any:
    value = hparams.get(key)
    return list(value) if isinstance(value, (list, tuple)) else value


def mismatch(a: tuple[Mapping[str, Any], State], b: tuple[Mapping[str, Any], State]) -> str | None:
    """Why two ``(hyper_parameters, state_dict)`` cannot be averaged key by key, in words; None when they can."""
    (hp_a, sa), (hp_b, sb) = a, b
    for key, what in (("backbone", "backbone"), ("num_classes", "number of classes"), ("class_names", "classes")):
        if _hp(hp_a, key) != _hp(hp_b, key):
            return f"{what} differ ({_short(_hp(hp_a, key))} vs {_short(_hp(hp_b, key))})"
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a or only_b:
        side, names = ("the first", only_a) if only_a else ("the second", only_b)
        return (f"different parameters: {len(names)} only in {side} (e.g. {names[0]}; freeze=lora adds adapters, "
                "head= changes the head)")
    for k in sa:
        if tuple(sa[k].shape) != tuple(sb[k].shape):
            return f"{k} has shape {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}"
    return None


def _short(value: Any, limit: int = 4) -> str:
    if isinstance(value, list) and len(value) > limit:
        return "[" + ", ".join(map(str, value[:limit])) + f", ... ({len(value)})]"
    return str(value)


def lerp_state(start: State, end: State, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` per floating tensor; others from ``end``.

    ``torch.lerp`` is exact at both ends: alpha 0 gives ``start`` and 1 gives ``end`` bit for bit.
    """
    out = {}
    for k, b in end.items():
        a = start[k]
        out[k] = torch.lerp(a.to(b.dtype), b, float(alpha)) if b.is_floating_point() else b.clone()
    return out


def mean_state(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """The uniform average of ``states`` per floating tensor; others from the first (one state: itself, exactly)."""
    if not states:
        raise FineTuneError("nothing to average")
    first = states[0]
    out = {}
    for k, t in first.items():
        if t.is_floating_point():
            total = sum((s[k].to(torch.float64) for s in states[1:]), t.to(torch.float64))
            out[k] = (total / len(states)).to(t.dtype)
        else:
            out[k] = t.clone()
    return out


@torch.no_grad()
def loader_probabilities(module: torch.nn.Module, loader: Iterable[Any], context: Any = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncalibrated softmax probabilities and labels of ``loader``'s ``(x, y)`` batches (eval mode, on the CPU).

    For use inside a run (a callback), where ``Trainer.predict`` would take the module from its trainer.
    ``context``: the trainer's precision context (``precision_plugin.forward_context()``).
    """
    was_training = module.training
    module.eval()
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    device = next(module.parameters()).device
    try:
        # Iterating a loader draws its base seed from the global RNG: forked, so training's randomness is unchanged.
        with torch.random.fork_rng(devices=[]), (context or contextlib.nullcontext()):
            for x, y in loader:
                probs.append(module(x.to(device)).float().softmax(-1).cpu())
                labels.append(torch.as_tensor(y).cpu())
    finally:
        module.train(was_training)
    if not probs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(labels)


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Top-1 accuracy and mean negative log-likelihood (cross-entropy) of probabilities; None for no images."""
    if not len(labels):
        return {"acc": None, "loss": None}
    p = probs.double().clamp_min(torch.finfo(torch.float32).tiny)  # an underflowed 0 is not an infinite loss
    return {"acc": float((probs.argmax(1) == labels).double().mean()),
            "loss": float(F.nll_loss(p.log(), labels.long()))}


def choose_alpha(curve: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The point with the best val accuracy; ties (common on a small val set) go to the lower val loss."""
    if not curve or curve[0].get("val_acc") is None:
        raise FineTuneError("choosing alpha needs val images; the data has no val split")
    return max(curve, key=lambda p: (p["val_acc"], -p["val_loss"]))


Measured = Mapping[str, "tuple[torch.Tensor, torch.Tensor]"]


def sweep_alphas(module: torch.nn.Module, start: State, end: State, alphas: Sequence[float],
                 measure: Callable[[], Measured]) -> tuple[list[dict[str, Any]], Mapping[str, Any], Measured]:
    """Load each interpolation into ``module`` and ``measure()`` it (split -> probabilities, labels).

    Returns:
        The curve (``alpha``, ``val_acc``, ``val_loss``, ``test_acc``, ... per point), the chosen point
        (:func:`choose_alpha`) and what was measured at it. ``module`` is left holding the last alpha's weights.
    """
    curve: list[dict[str, Any]] = []
    measured: dict[float, Measured] = {}
    for alpha in alphas:
        module.load_state_dict(lerp_state(start, end, alpha))
        measured[alpha] = measure()
        point: dict[str, Any] = {"alpha": alpha}
        for split, (probs, labels) in measured[alpha].items():
            point.update({f"{split}_{k}": v for k, v in scores(probs, labels).items()})
        curve.append(point)
    chosen = choose_alpha(curve)
    return curve, chosen, measured[chosen["alpha"]]


def weights_checkpoint(template: Mapping[str, Any], state: State, temperature: float, info: Mapping[str, Any]
                       ) -> dict[str, Any]:
    """A checkpoint of ``state`` that ``FineTuneModule.load_from_checkpoint`` loads, built on ``template``'s hparams.

    ``info`` (plain values) is stored under ``weight_averaging``; no optimizer state: it is not a point to resume.
    """
    out = {k: template[k] for k in _KEPT if k in template}
    out["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    out["temperature"] = float(temperature) if math.isfinite(temperature) and temperature > 0 else 1.0
    out["weight_averaging"] = dict(info)
    return out


def plot_curve(curve: Sequence[Mapping[str, Any]], chosen: float, path: Path, title: str) -> None:
    """Accuracy (val, test) and val loss against alpha, the chosen alpha marked."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    alphas = [p["alpha"] for p in curve]
    for key, label in (("val_acc", "val"), ("test_acc", "test")):
        if all(p.get(key) is not None for p in curve):
            ax_acc.plot(alphas, [100 * p[key] for p in curve], marker="o", ms=4, label=f"{label} top-1")
    ax_loss.plot(alphas, [p["val_loss"] for p in curve], marker="o", ms=4, color="tab:red", label="val loss")
    for ax in (ax_acc, ax_loss):
        ax.axvline(chosen, color="gray", linestyle="--", linewidth=1, label=f"chosen alpha {chosen:g}")
        ax.set_xlabel("alpha (0: start, 1: end)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_acc.set_ylabel("top-1 (%)")
    ax_loss.set_ylabel("cross-entropy")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
