"""Re-planning a budgeted run at its epoch boundaries (``budget=`` with ``budget_replan=true``, the default).

:class:`finetune.callbacks.budget_planner.BudgetPlanner` plans the epochs once, from steps timed before
training. A host whose speed then changes leaves the plan wrong: on this project's 2-core CPU a 60-minute
Fashion-MNIST run timed its steps at 0.414 s, averaged 0.382 s (its epochs fell from 200 s to 132 s), and
ended at 0.85x of its budget with the saved time unused; a host that slows down relies on the safety net,
which cuts the cosine schedule before its end. At the start of each epoch :class:`Replanner` compares the
last epochs' seconds with what the plan gave them, and sets the epochs still to train from that pace and
what the budget's clock says is left. The LR schedule is stretched (or shrunk) to the new end without a
jump: what is left of each group's multiplier is mapped onto the new number of steps (:class:`TimeWarp`),
so warmup and cosine still end on time.

Hysteresis keeps noise from flapping the plan: a run gets more epochs where they fit under the plan's
margin (``budget x 0.95``), and fewer only where its current plan would pass the budget itself; either way
the new plan aims at the margin again.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any, Callable

from torch.optim.lr_scheduler import LambdaLR

from finetune.budget import MARGIN, MAX_EPOCHS, BudgetPlan, epoch_s, optimizer_steps

__all__ = ["Replanner", "TimeWarp", "epochs_that_fit"]

# The pace is of at least this many of the last epochs, and more until they were planned at this many seconds:
# one epoch of one batch (10 images per class) is too short to tell a slower host from a hiccup. No re-plan
# comes before that many epochs have run: on full Fashion-MNIST (60m) the first epoch alone ran at 0.93x its
# plan, the plan grew from 30 to 32 epochs, and the next one, at 0.99x, took it back to 30.
PACE_EPOCHS = 3
PACE_SECONDS = 10.0
PACE_MAX_EPOCHS = 100  # a head on cached features plans thousands of 1 ms epochs: each re-plan stays cheap
# More epochs only where they add at least this share of the epochs left: a plan of thousands of one-batch
# epochs would otherwise move (and say so) at every epoch.
MIN_CHANGE = 0.02


class TimeWarp:
    """A piecewise-linear map from the steps a scheduler counts to the steps of the schedule it was built for.

    Each re-plan adds a knot at the current step: from there the rest of the original schedule is spread over
    the new number of steps, so the multiplier is continuous and the schedule's end lands on the new last step.
    """

    def __init__(self, end: int) -> None:
        self.end = float(end)  # the original schedule's last step
        self.knots: list[tuple[float, float, float]] = [(0.0, 0.0, 1.0)]  # (step, schedule step there, slope)
        self._steps = [0.0]  # the knots' steps, for bisect: each LR lookup of each group reads them

    def __call__(self, step: float) -> float:
        at, mapped, slope = self.knots[max(0, bisect.bisect_right(self._steps, step) - 1)]
        return mapped + (step - at) * slope

    def retarget(self, at_step: int, new_end: int) -> None:
        """From ``at_step`` on, what is left of the original schedule ends at ``new_end`` instead."""
        mapped = self(at_step)
        self.knots = [k for k in self.knots if k[0] < at_step]
        slope = (self.end - mapped) / (new_end - at_step) if new_end > at_step else 1.0
        self.knots.append((float(at_step), mapped, max(0.0, slope)))
        self._steps = [k[0] for k in self.knots]

    def wrap(self, scheduler: LambdaLR) -> None:
        """Put the warp between ``scheduler`` and its multipliers (once)."""

        def warped(f: Callable[[float], float]) -> Callable[[int], float]:
            # A plain function, not a callable object: LambdaLR.state_dict saves an object's __dict__, and the
            # closure in it would not pickle into the checkpoint.
            def g(step: int) -> float:
                return f(self(step))

            return g

        scheduler.lr_lambdas = [warped(f) for f in scheduler.lr_lambdas]


def epochs_that_fit(done: int, left_s: float, epoch_s: float, end_s: float, pace: float) -> int:
    """Epochs in all (``done`` included) such that the rest, at ``pace`` times their planned ``epoch_s`` each,
    and what comes after training (``end_s``, as slow as the pace, never faster than planned) fit ``left_s``."""
    room = left_s - end_s * max(1.0, pace)
    per_epoch = epoch_s * pace
    return done + (max(0, math.floor(room / per_epoch)) if per_epoch > 0 else 0)


class Replanner:
    """Sets ``max_epochs`` at each epoch boundary from the measured pace, and stretches the schedule to it.

    Args:
        budget_s: the run's budget.
        planned_s: the plan's seconds for epoch ``e``: batches, loader start, a share of validation and
            checkpoints (cheaper head-only epochs of an unfreezing strategy).
        end_s: the plan's seconds for what comes after training (final validation, calibration, test).
        steps_per_epoch: optimizer steps per epoch.
        first_epoch: the first epoch at which to re-plan: every group has started, so no unfreeze moves.
        min_epochs: never fewer epochs in all.
        max_epochs: never more.
        elapsed: the budget clock's seconds so far (finetune.budget.clock_elapsed).
    """

    def __init__(self, budget_s: float, planned_s: Callable[[int], float], end_s: float, steps_per_epoch: int,
                 first_epoch: int, min_epochs: int, max_epochs: int, elapsed: Callable[[], float]) -> None:
        self.budget_s, self.planned_s, self.end_s = budget_s, planned_s, end_s
        self.steps_per_epoch, self.first_epoch = steps_per_epoch, max(1, first_epoch)
        self.epoch_s = planned_s(self.first_epoch)  # every epoch re-planned costs this: the trainable set is final
        self.min_epochs, self.max_epochs, self.elapsed = min_epochs, max_epochs, elapsed
        self.clock = time.monotonic
        self.took: list[tuple[float, float]] = []  # (seconds taken, seconds planned) of each epoch
        self.changes: list[dict[str, Any]] = []
        self._start: float | None = None
        self._warp: TimeWarp | None = None

    @classmethod
    def from_plan(cls, plan: BudgetPlan, batch_s: Callable[[int], float], end_s: float, first_epoch: int,
                  min_epochs: int, accumulate: int, elapsed: Callable[[], float]) -> Replanner:
        """The re-planner of ``plan``, whose epoch ``e`` costs ``batch_s(e)`` a batch."""
        val_share = plan.val_s / plan.check_val_every_n_epoch  # validation and its checkpoints, every few epochs

        def planned_s(epoch: int) -> float:
            return epoch_s(plan.batches_per_epoch, batch_s, epoch, plan.epoch_overhead_s) + val_share

        return cls(plan.budget_s, planned_s, end_s, optimizer_steps(plan.batches_per_epoch, accumulate), first_epoch,
                   min_epochs, MAX_EPOCHS, elapsed)

    def pace(self) -> float:
        """Seconds taken over seconds planned, of the last epochs (at least PACE_EPOCHS, and PACE_SECONDS)."""
        took = planned = 0.0
        for n, (t, p) in enumerate(reversed(self.took), 1):
            took, planned = took + t, planned + p
            if n >= PACE_MAX_EPOCHS or (n >= PACE_EPOCHS and planned >= PACE_SECONDS):
                break
        return took / planned if planned > 0 else 1.0

    def decide(self, epoch: int, current: int) -> int:
        """Epochs in all, for a run at the start of ``epoch`` that was to train ``current``."""
        pace = self.pace()
        elapsed = self.elapsed()
        fit = min(self.max_epochs, epochs_that_fit(epoch, self.budget_s * (1 - MARGIN) - elapsed, self.epoch_s,
                                                   self.end_s, pace))
        if fit - current >= max(1.0, MIN_CHANGE * (current - epoch)):
            return fit
        if epochs_that_fit(epoch, self.budget_s - elapsed, self.epoch_s, self.end_s, pace) < current:
            # The current plan would pass the budget itself: back to the plan's margin, so noise does not flap it.
            return max(fit, epoch + 1, self.min_epochs)
        return current

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Record the epoch just ended and, where the pace says so, change ``max_epochs`` and the schedule."""
        now = self.clock()
        if self._start is not None and epoch > 0:
            self.took.append((now - self._start, self.planned_s(epoch - 1)))
        self._start = now
        current = int(trainer.fit_loop.max_epochs)
        if epoch < self.first_epoch or epoch >= current or len(self.took) < PACE_EPOCHS:
            return
        scheduler = _lambda_scheduler(trainer)
        if scheduler is None:
            return
        # Every process must train the same epochs: rank 0's clock decides (a no-op on one device).
        new = int(trainer.strategy.broadcast(self.decide(epoch, current), src=0))
        if new == current:
            return
        if self._warp is None:
            self._warp = TimeWarp(current * self.steps_per_epoch)
            self._warp.wrap(scheduler)
        self._warp.retarget(int(scheduler.last_epoch), new * self.steps_per_epoch)
        trainer.fit_loop.max_epochs = new
        pace = self.pace()
        self.changes.append({"epoch": epoch, "pace": round(pace, 3), "epochs": new})
        if getattr(trainer, "is_global_zero", True):
            print(f"budget: epochs took {pace:.2f}x their planned time; training {new} epochs instead of "
                  f"{current}, the LR schedule stretched to end with them", flush=True)


def _lambda_scheduler(trainer: Any) -> LambdaLR | None:
    """The run's one per-step LambdaLR (finetune.optim.build_scheduler), or None: another schedule is not
    stretched, so its run keeps the plan."""
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    if len(configs) != 1 or configs[0].interval != "step" or not isinstance(configs[0].scheduler, LambdaLR):
        return None
    return configs[0].scheduler
