"""A run under a time budget (``budget=10m``): parsing the budget, and planning epochs to fit it.

Pure functions, so the plan is testable with a made-up step time: :func:`plan_epochs` turns measured
costs (seconds per training batch, per-epoch overhead, what is already spent, what the end of the run
needs) into a number of epochs and batches per epoch whose learning-rate schedule ends on time: the
schedule is built from the planned length (``trainer.estimated_stepping_batches``), so warmup and
cosine complete instead of being cut by a wall clock. The measuring is
:class:`finetune.callbacks.budget_planner.BudgetPlanner`.

The clock of a run starts in :func:`budget_clock` (the CLI enters it before ``+recipe=auto``'s advice,
``train()`` before it builds the data), so the advice and the data scan are counted too.
"""

from __future__ import annotations

import contextvars
import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from finetune.errors import FineTuneError

__all__ = [
    "LOOP_BATCH_S", "LOOP_EPOCH_S", "MAX_EPOCHS", "BudgetPlan", "budget_clock", "budget_left_s", "clock_elapsed",
    "epoch_s", "format_seconds", "images_in_budget", "optimizer_steps", "parse_budget", "plan_epochs", "run_budget_s",
    "val_interval", "validations",
]

# The plan aims this far under the budget: step times on a shared machine wander by a few percent.
MARGIN = 0.05
# A run ends at most this far over its budget (the promise), should the plan be wrong.
OVERRUN = 0.10
# The safety net (a Lightning Timer) stops training where the run would end this far over the budget: half
# of OVERRUN, the other half for the error of its estimate of the evaluation after training. Aimed at
# OVERRUN itself, a run whose epochs ran 1.2x slower than planned ended at 1.12x (Fashion-MNIST, 3m).
NET_AIM = 0.05
# Under a budget, validating may take at most this share of the time of the training steps; where an epoch
# validates longer than that (a few batches of training against a larger val split), the planner validates
# every few epochs instead (Lightning's ``check_val_every_n_epoch``). A judgment, not fitted: validation
# only picks the checkpoint, and each second of it is taken from training. On Fashion-MNIST at 10/class
# (one batch an epoch, 1,200 val images) validating every epoch took 9.6 of a 1-minute run's 11.1 s of
# training; at 1,000/class it took 6% of each epoch, and nothing changes there.
VAL_MAX_SHARE = 0.25
# What Lightning's loop adds to each batch (hooks, logging, the optimizer closure, metrics) and to each
# epoch, on top of the step the planner times outside the loop (finetune/callbacks/step_timing.py). It
# matters only where steps take a millisecond: a head on cached features, where leaving it out planned
# 10,000 one-batch epochs of 0.8 ms into a minute; 155 trained, and the safety net read the loop as a 4x
# slower host and stopped at 0.38x of the budget with the LR schedule barely begun. Measured on this
# project's 2-core CPU, cached head-only Fashion-MNIST without a budget: 2,000 one-batch epochs in 15.4 s
# (7.7 ms each, 0.8 of them compute) and 100 epochs of 32 batches in 7.9 s (0.3 ms of compute a batch):
# 2 ms a batch and 5 ms an epoch. A faster CPU spends less, so there a run of such steps ends early rather
# than late.
LOOP_BATCH_S = 0.002
LOOP_EPOCH_S = 0.005

# No plan trains more epochs (one-batch epochs of a head on cached features in a long budget).
MAX_EPOCHS = 10_000

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_PATTERN = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_budget(value: Any) -> float | None:
    """Seconds of a budget: ``90s``, ``10m``, ``1h``, ``1h30m``, or a plain number of seconds; None/''/null: no budget.

    Raises:
        FineTuneError: for anything else, zero or negative (one line, the command exits 2).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    text = str(value).strip().lower()
    seconds: float | None = None
    try:
        seconds = float(text)
    except ValueError:
        m = _PATTERN.match(text.replace(" ", ""))
        if m and any(m.groups()):
            seconds = sum(float(g) * _UNITS[u] for g, u in zip(m.groups(), "hms") if g)
    if seconds is None or not math.isfinite(seconds):
        raise FineTuneError(f"budget must be a duration like 90s, 10m, 1h or 1h30m (or seconds), got '{value}'")
    if seconds <= 0:
        raise FineTuneError(f"budget must be more than zero, got '{value}'")
    return seconds


def format_seconds(seconds: float) -> str:
    """``130`` -> ``2m10s``: the budget's own notation, so an error's suggestion can be pasted back."""
    s = int(math.ceil(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def run_budget_s(cfg: Any) -> float | None:
    """The seconds this run may take: ``budget``, or its share of it in ``+recipe=tune`` (budget / tune.n_trials)."""
    total = parse_budget(cfg.get("budget"))
    if total is None:
        return None
    tune = cfg.get("tune")
    trials = int(tune.n_trials) if cfg.get("recipe") == "tune" and tune is not None else 1
    return total / max(1, trials)


_STARTED: contextvars.ContextVar[float | None] = contextvars.ContextVar("finetune_budget_started", default=None)


@contextmanager
def budget_clock(budget: Any = None) -> Iterator[None]:
    """Start the run's clock (kept if an outer caller started it); checks ``budget`` first, before anything slow."""
    parse_budget(budget)
    token = _STARTED.set(time.perf_counter()) if _STARTED.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _STARTED.reset(token)


def clock_elapsed() -> float:
    """Seconds since :func:`budget_clock` started the run (0 outside one)."""
    start = _STARTED.get()
    return time.perf_counter() - start if start is not None else 0.0


def budget_left_s(cfg: Any) -> float | None:
    """What is left of this run's budget (:func:`run_budget_s`) by its clock; None without a budget."""
    budget_s = run_budget_s(cfg)
    return None if budget_s is None else max(0.0, budget_s - clock_elapsed())


def optimizer_steps(batches: int, accumulate: int = 1) -> int:
    """Optimizer steps in an epoch of ``batches``: Lightning steps after every ``accumulate`` batches and at the
    epoch's last batch."""
    return math.ceil(batches / max(1, accumulate))


def val_interval(val_s: float, epoch_train_s: float, max_share: float = VAL_MAX_SHARE) -> int:
    """Every how many epochs to validate so that validation (``val_s`` a time) takes at most ``max_share`` of
    the training steps' time (``epoch_train_s`` an epoch): 1 where every epoch can afford it."""
    if val_s <= max_share * epoch_train_s or epoch_train_s <= 0:
        return 1
    return math.ceil(val_s / (max_share * epoch_train_s))


def validations(epochs: int, every: int) -> int:
    """Validations in ``epochs`` epochs validating every ``every`` and at the last (the planner adds it)."""
    return epochs // every + (1 if epochs % every else 0)


def images_in_budget(budget_s: float, seconds_per_image: float, reserve_s: float = 0.0) -> int:
    """Training images (forward and backward) a budget pays for at a measured cost: for weighing backbones.

    E.g. a candidate at 4 ms/image with a 10-minute budget and 60 s reserved: 135,000 images, i.e.
    about 2.7 epochs of 50,000. Uses the same margin as :func:`plan_epochs`.
    """
    if seconds_per_image <= 0:
        raise ValueError("seconds_per_image must be positive")
    return max(0, int((budget_s * (1 - MARGIN) - reserve_s) / seconds_per_image))


@dataclass
class BudgetPlan:
    """What :func:`plan_epochs` decided, and from which figures (all seconds); ``metrics.json`` reports it.

    Attributes:
        epochs: epochs to train (``trainer.max_epochs``).
        batches_per_epoch: training batches of each epoch (``trainer.limit_train_batches``); fewer than the
            data has where the budget ends mid-epoch and the strategy allows partial epochs.
        full_batches_per_epoch: batches in a whole epoch.
        steps: optimizer steps in all (what the LR schedule spans).
        whole_epochs: the strategy unfreezes at epoch boundaries, so epochs are not cut.
        training_s: predicted training time, validation and checkpoints of each epoch included.
        check_val_every_n_epoch: training validates every this many epochs, and at its last.
        val_s: one validation with its checkpoints, where not part of ``epoch_overhead_s``.
        reserved_s: spent before the plan (advice, data, calibration) and kept for after (final evaluation).
        predicted_total_s: what the plan expects the run to take.
    """

    budget_s: float
    epochs: int
    batches_per_epoch: int
    full_batches_per_epoch: int
    steps: int
    whole_epochs: bool
    step_s: float
    epoch_overhead_s: float
    training_s: float
    reserved_s: dict[str, float] = field(default_factory=dict)
    predicted_total_s: float = 0.0
    check_val_every_n_epoch: int = 1
    val_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 4 if k == "step_s" else 2)
        out["reserved_s"] = {k: round(v, 2) for k, v in self.reserved_s.items()}
        return out


def epoch_s(batches: int, batch_s: Callable[[int], float], epoch: int, overhead: float) -> float:
    """Seconds of training epoch ``epoch``: its batches and its fixed overhead (validation not included)."""
    return batches * batch_s(epoch) + overhead


def plan_epochs(
    budget_s: float,
    batches_per_epoch: int,
    batch_s: Callable[[int], float],
    epoch_overhead_s: float,
    spent_s: float,
    end_s: float,
    whole_epochs: bool,
    min_epochs: int = 1,
    accumulate: int = 1,
    reserved: dict[str, float] | None = None,
    margin: float = MARGIN,
    max_epochs: int = MAX_EPOCHS,
    val_s: float = 0.0,
    val_every: int = 1,
) -> BudgetPlan:
    """The longest training that ends, with the final evaluation, ``margin`` under the budget.

    Args:
        budget_s: the run's budget.
        batches_per_epoch: training batches in a whole epoch.
        batch_s: seconds per training batch in epoch ``e`` (an unfreezing strategy's head-only epochs are cheaper).
        epoch_overhead_s: each epoch's fixed cost: loader start, and validation and checkpoints where not ``val_s``.
        spent_s: seconds already gone when planning (advice, data scan, the measurement itself).
        end_s: what comes after training (final validation, test, calibration) and before it (the LR finder).
        whole_epochs: never cut an epoch (schedules that unfreeze at epoch ``k``); else the last planned epochs are
            shortened evenly (``limit_train_batches``), so every epoch still validates and checkpoints.
        min_epochs: fewer is no plan at all (e.g. ``lp_ft``'s head-only epochs plus one with the backbone).
        accumulate: ``trainer.accumulate_grad_batches``.
        reserved: the parts of ``spent_s`` and ``end_s``, for the report.
        val_s: one validation with its checkpoints, paid every ``val_every`` epochs and at the last.
        val_every: ``check_val_every_n_epoch`` (:func:`val_interval`).

    Raises:
        FineTuneError: the budget cannot pay for ``min_epochs`` epochs; the message names the smallest that could.
    """
    avail = budget_s * (1 - margin) - spent_s - end_s
    full = max(1, int(batches_per_epoch))
    every = max(1, int(val_every))

    def cost(epochs: int, batches: int) -> float:
        steps = sum(epoch_s(batches, batch_s, e, epoch_overhead_s) for e in range(epochs))
        return steps + val_s * validations(epochs, every)

    epochs, steps_s = 0, 0.0  # the training epochs' own cost, summed as they are added
    while epochs < max_epochs:
        steps_s += epoch_s(full, batch_s, epochs, epoch_overhead_s)
        if steps_s + val_s * validations(epochs + 1, every) > avail:
            break
        epochs += 1
    if epochs < max(1, min_epochs):
        need = spent_s + end_s + cost(max(1, min_epochs), full)
        smallest = format_seconds(need / (1 - margin))
        what = f"{min_epochs} epochs" if min_epochs > 1 else "one epoch"
        raise FineTuneError(
            f"budget={format_seconds(budget_s)} is too small: {what} of this plan needs about {format_seconds(need)} "
            f"({spent_s:.0f}s spent before training, {(need - spent_s - end_s):.0f}s training, {end_s:.0f}s "
            f"evaluation); the smallest budget that would work is budget={smallest}"
        )
    batches = full
    if not whole_epochs and epochs < max_epochs:
        # One more, shorter epoch each: more steps in all where the leftover pays for them despite the extra overhead.
        more = epochs + 1
        left = avail - more * epoch_overhead_s - val_s * validations(more, every)
        per_batch = sum(batch_s(e) for e in range(more))
        shorter = int(left / per_batch) if left > 0 and per_batch > 0 else 0
        if 0 < shorter < full and shorter * more > full * epochs:
            epochs, batches = more, shorter
    used = cost(epochs, batches)
    steps = epochs * optimizer_steps(batches, accumulate)
    return BudgetPlan(
        budget_s=budget_s, epochs=epochs, batches_per_epoch=batches, full_batches_per_epoch=full, steps=steps,
        whole_epochs=whole_epochs, step_s=batch_s(epochs - 1), epoch_overhead_s=epoch_overhead_s, training_s=used,
        reserved_s=dict(reserved or {"spent": spent_s, "end": end_s}), predicted_total_s=spent_s + end_s + used,
        check_val_every_n_epoch=every, val_s=val_s,
    )
