"""The callback that fits a run to its time budget (``budget=10m``): measure, plan, stop on time.

At ``setup("fit")``, before Lightning asks the module for its optimizer and LR schedule, it times
(:mod:`finetune.callbacks.step_timing`) a few training steps and validation batches on the real data and
device (on the module itself, whose weights, buffers, trainable set and RNG states are put back
afterwards), plans the epochs with :func:`finetune.budget.plan_epochs`, and sets ``max_epochs`` and
``limit_train_batches`` on the trainer: ``estimated_stepping_batches`` then gives the schedule its planned
length. At epoch boundaries :class:`finetune.replan.Replanner` corrects the plan from the pace measured
since (``budget_replan``). A Lightning ``Timer`` is the safety net only (the budget plus 5%, less what the
end of the run needs, so that the run ends within 10% even where that need is misjudged), set from the
pace of the last steps. ``metrics.json`` gets ``budget``: the plan, the figures it came from, its changes
and ``took_s``.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Timer

from finetune.budget import (
    LOOP_BATCH_S, LOOP_EPOCH_S, NET_AIM, BudgetPlan, clock_elapsed, format_seconds, plan_epochs, val_interval,
    validations,
)
from finetune.callbacks.step_timing import Timings, measure
from finetune.errors import FineTuneError
from finetune.replan import Replanner

__all__ = ["BudgetPlanner", "Timings"]


def _limited(n: int, limit: Any) -> int:
    """Batches Lightning runs of ``n`` under ``limit_*_batches`` (an int: at most; a float: a fraction)."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(n, limit)
    return n if limit is None or float(limit) >= 1.0 else int(n * float(limit))


def _start_epochs(module: Any) -> tuple[int | None, int]:
    """First epoch in which the backbone trains (None: never), and the epoch from which the trainable set is final."""
    plan = module.freeze_plan
    starts = [plan.group_start_epoch(n) for n in plan.start_epoch]
    finite = [s for s in starts if s is not None]
    return (min(finite) if finite else None), (max(finite) if finite else 0)


def _validate_this_epoch(trainer: pl.Trainer) -> None:
    """The current epoch validates and writes its checkpoints, whatever ``check_val_every_n_epoch`` says: the
    last one, planned or stopped by the safety net, so that ``last.ckpt`` holds the final weights."""
    if trainer.check_val_every_n_epoch is not None:
        trainer.check_val_every_n_epoch = 1


class _SafetyNet(Timer):
    """Lightning's ``Timer``; where it stops training in an epoch that would not validate, that epoch validates."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        if trainer.should_stop:
            _validate_this_epoch(trainer)


class BudgetPlanner(Callback):
    """Plan ``max_epochs`` and ``limit_train_batches`` of a fit so that the run ends within ``budget_s``.

    Args:
        budget_s: seconds the whole run may take, counted from :func:`finetune.budget.budget_clock`.
        warmup_steps: training steps not timed (allocation, cuDNN autotuning, ``torch.compile``).
        timed_steps: training steps (and validation batches) timed.
        record: more entries for ``metrics.json``'s ``budget`` (a tune trial's share: finetune.trial_budget).
        validates_best: ``evaluate=best``: a final validation of ``best.ckpt`` is kept time for.
        replan: at each epoch boundary, set the epochs left from the pace so far and stretch the LR schedule
            to them (finetune.replan); False: the plan made before training stands, the safety net aside.
    """

    def __init__(self, budget_s: float, warmup_steps: int = 2, timed_steps: int = 5,
                 record: dict[str, Any] | None = None, validates_best: bool = False, replan: bool = True) -> None:
        self.budget_s = float(budget_s)
        self.replan = replan
        self.replanner: Replanner | None = None
        self.validates_best = validates_best  # evaluate=best: the final validation and test load best.ckpt
        self.record = record or {}
        self.warmup_steps = warmup_steps
        self.timed_steps = timed_steps
        self.plan: BudgetPlan | None = None
        self.report: dict[str, Any] = {}
        self.timer: Timer | None = None
        self._timer_base_s = 0.0  # the Timer's duration before what comes after training is taken off
        self._after_training_s = 0.0  # final validation, calibration, test: as measured when planning
        self._training = False  # the fit's own training, not the LR finder's test (its loop calls the same hooks)
        # (seconds taken, batches, their planned seconds) of the training batches the pace is measured over
        self._window: tuple[float, int, float] = (0.0, 0, 0.0)
        self._batch_start: float | None = None
        self._last_batch_end: float | None = None
        self._planned_batch_s: Any = None  # epoch -> the plan's seconds per batch (head-only epochs are cheaper)
        self.clock = time.monotonic

    def _counts(self, trainer: pl.Trainer) -> tuple[int, int, int]:
        dm = trainer.datamodule
        images = getattr(dm, "images", dm)
        train = _limited(len(dm.train_dataloader()), trainer.limit_train_batches)
        val = _limited(len(dm.val_dataloader()), trainer.limit_val_batches)
        test = 0
        if getattr(dm, "has_test", False):
            test = _limited(math.ceil(len(images.data.splits["test"]) / dm.batch_size), trainer.limit_test_batches)
        return train, val, test

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.ckpt_path:
            raise FineTuneError("budget= plans a run from its start; a resumed run keeps the epochs it was given "
                                "(resume without budget=, or start a new run)")
        first_backbone, final = _start_epochs(pl_module)
        dynamic = pl_module.strategy.is_dynamic
        timings = measure(trainer, pl_module, sorted({0, final}) if dynamic else [0], self.warmup_steps,
                          self.timed_steps)
        train_b, val_b, test_b = self._counts(trainer)
        eval_batch_s = timings.eval_batch_s + LOOP_BATCH_S  # Lightning's loop around each step, timed outside it
        val_pass = timings.eval_startup_s + val_b * eval_batch_s
        calibrates = any(getattr(c, "enabled", False) and type(c).__name__ == "CalibrateTemperature"
                         for c in trainer.callbacks)
        end = {
            # The last epoch's validation is of the final weights: only a best checkpoint is validated again.
            "final_validation": val_pass if self.validates_best else 0.0,
            # Calibration fits on that validation's logits where the final weights are calibrated, and passes val
            # for a best checkpoint of an earlier epoch (finetune/callbacks/calibrate.py).
            "calibration": val_pass if calibrates else 0.0,
            "test": (timings.eval_startup_s + test_b * eval_batch_s) if test_b else 0.0,
            "checkpoints": 3 * timings.checkpoint_s,
            "sanity_check": min(val_b, trainer.num_sanity_val_steps or 0) * eval_batch_s,
        }
        images = getattr(trainer.datamodule, "images", None)
        if images is not None and images.has_test:  # cached features: the test split is still to extract
            per_image = trainer.datamodule.extraction_time_s / max(1, sum(
                len(images.data.splits[s]) for s in ("train", "val")) - trainer.datamodule.reused_features)
            end["test_feature_extraction"] = per_image * len(images.data.splits["test"])
        finder = self._finder(trainer)
        if finder is not None:
            cost = finder.reserve_s(timings.batch_s[0] + LOOP_BATCH_S, train_b, timings.train_startup_s + val_pass)
            share = getattr(finder, "budget_share", None)
            if share is not None and cost > share * self.budget_s:  # optim.find_share: no room, the given lr trains
                finder.skipped = (f"the LR finder would take {cost:.0f}s, more than {share:g} of the "
                                  f"{format_seconds(self.budget_s)} budget")
            else:
                end["lr_find"] = cost
        spent = clock_elapsed() or timings.seconds
        whole = dynamic
        min_epochs = 1 + first_backbone if dynamic and first_backbone is not None else 1

        def batch_s(epoch: int) -> float:
            # An unfreezing strategy: head-only epochs at their own cost, the rest at the final trainable set's.
            return LOOP_BATCH_S + (timings.batch_s[0] if not dynamic or pl_module.freeze_plan.backbone_frozen_at(epoch)
                                   else timings.batch_s[final])

        val_s = val_pass + 2 * timings.checkpoint_s  # a validation and the checkpoints written after it
        every = trainer.check_val_every_n_epoch
        if every == 1:  # Lightning's default: where validating every epoch would crowd out training, less often
            every = val_interval(val_s, train_b * batch_s(final if dynamic else 0))

        def plan(end: dict[str, float]) -> BudgetPlan:
            return plan_epochs(
                self.budget_s, train_b, batch_s, timings.train_startup_s + LOOP_EPOCH_S, spent, sum(end.values()),
                whole, min_epochs,
                accumulate=trainer.accumulate_grad_batches,
                reserved={"before_training": spent, "measuring": timings.seconds, **end},
                val_s=val_s, val_every=every or 1,  # None: Lightning validates by batches, counted as each epoch
            )

        # A run that validates only at its last epoch has no earlier best checkpoint to calibrate.
        self.plan = plan({**end, "calibration": 0.0} if calibrates and every else end)
        if calibrates and every and validations(self.plan.epochs, every) > 1:
            self.plan = plan(end)
        end = {k: v for k, v in self.plan.reserved_s.items() if k not in ("before_training", "measuring")}
        end_s = sum(end.values())
        self._planned_batch_s = batch_s
        trainer.fit_loop.max_epochs = self.plan.epochs
        trainer.limit_train_batches = self.plan.batches_per_epoch
        trainer.check_val_every_n_epoch = every
        self._timer_base_s = self.budget_s * (1 + NET_AIM) - spent - end.get("lr_find", 0.0)
        self._after_training_s = end_s - end.get("lr_find", 0.0)
        self.timer = _SafetyNet(duration=timedelta(seconds=max(1.0, self._timer_base_s - self._after_training_s)),
                                interval="step")
        trainer.callbacks.append(self.timer)
        if self.replan:
            start = time.monotonic()
            self.replanner = Replanner.from_plan(
                self.plan, batch_s, self._after_training_s, first_epoch=(final if dynamic else 0) + 1,
                min_epochs=min_epochs, accumulate=trainer.accumulate_grad_batches,
                # Outside train() no budget clock runs: count from this plan, as planning did.
                elapsed=lambda: clock_elapsed() or spent + time.monotonic() - start)
        self.report = {"budget": format_seconds(self.budget_s), **self.record, **self.plan.to_dict(),
                       "measured": {"train_batch_s": {str(k): round(v, 4) for k, v in timings.batch_s.items()},
                                    "eval_batch_s": round(timings.eval_batch_s, 4),
                                    "loader_startup_s": round(timings.train_startup_s, 3),
                                    "checkpoint_s": round(timings.checkpoint_s, 3),
                                    # not measured: finetune.budget's allowance for Lightning's loop
                                    "loop_batch_s": LOOP_BATCH_S, "loop_epoch_s": LOOP_EPOCH_S}}
        self._publish(trainer)
        print(f"budget {format_seconds(self.budget_s)}: {self.plan.epochs} epochs of {self.plan.batches_per_epoch} "
              f"batches ({self.plan.steps} steps at {self.plan.step_s:.3f}s), {spent:.0f}s spent, "
              f"{end_s:.0f}s kept for evaluation", flush=True)

    def _publish(self, trainer: pl.Trainer) -> None:
        from finetune.callbacks.run_recorder import RunRecorder

        for c in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(c, RunRecorder):
                c.results["budget"] = self.report

    @staticmethod
    def _finder(trainer: pl.Trainer) -> Any:
        """The LR finder among the callbacks (finetune.lr_find.FindLR, found by what it offers), or None."""
        return next((c for c in trainer.callbacks if hasattr(c, "reserve_s")), None)

    def _finding(self, trainer: pl.Trainer) -> bool:
        """Whether the LR finder's test is running: its loop calls the training hooks too."""
        finder = self._finder(trainer)
        return finder is not None and not finder.result and not finder.skipped

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = not self._finding(trainer)
        if not self._training:
            return
        elapsed = clock_elapsed()
        if elapsed > 0 and self.timer is not None:
            # What the plan could only estimate is spent now (the LR finder, the sanity check, moving the model):
            # the net counts from what the budget's clock says is left.
            self._timer_base_s = self.budget_s * (1 + NET_AIM) - elapsed
            self.timer._duration = max(1.0, self._timer_base_s - self._after_training_s)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_batch_end = None  # the epoch's first batch is timed from its own start: not the loader's
        if self._training and self.replanner is not None:  # first: the epoch it makes the last must validate
            self.replanner.on_epoch_start(trainer, trainer.current_epoch)
        if self._training and trainer.current_epoch == trainer.max_epochs - 1:
            _validate_this_epoch(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_batch_end = None  # validation in the middle of an epoch is not a training step either

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = self.clock()
        since, self._last_batch_end = (self._last_batch_end if self._last_batch_end is not None
                                       else self._batch_start), now
        if not self._training or self.plan is None or self._finding(trainer) or since is None:
            return
        # The pace is of training batches alone (each with its loading, from the previous batch's end), summed
        # across epochs: an epoch of one batch would never fill a window. Epoch starts and validation are left
        # out: they are not the host's speed, and the Timer bounds them anyway.
        step_s = self._planned_batch_s(trainer.current_epoch) if self._planned_batch_s else self.plan.step_s
        took, batches, planned = self._window[0] + now - since, self._window[1] + 1, self._window[2] + step_s
        # A window of a quarter epoch (5 to 20 batches): one slow batch is not a slower host.
        if batches < max(5, min(20, self.plan.batches_per_epoch // 4)):
            self._window = (took, batches, planned)
            return
        self.tighten(took / planned if planned > 0 else 1.0)
        self._window = (0.0, 0, 0.0)

    def tighten(self, slowdown: float) -> float:
        """Training steps ``slowdown`` times slower than planned (another process took the CPU after the plan
        measured it): evaluation will be slower too, so the safety net stops training earlier by as much.

        Set from the pace of the last few steps, not of the whole run: a host that slowed in the middle of a
        two-epoch plan ran its second epoch and its test 2x slower while the run's mean said 1.2x, and the run
        ended at 1.19x of its budget. Returns the slowdown the net is set for (1: on plan or faster; the
        net is never looser than the plan's).
        """
        if self.timer is None:
            return 1.0
        slowdown = max(1.0, slowdown)
        # Lightning's Timer reads _duration at every check and has no setter for it.
        self.timer._duration = max(1.0, self._timer_base_s - self._after_training_s * slowdown)
        if slowdown > 1.0:
            self.report["slowdown"] = round(max(slowdown, self.report.get("slowdown", 1.0)), 2)
        return slowdown

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report:
            self.report["epochs_trained"] = trainer.current_epoch
            if self.replanner is not None:
                self.report["replanned"] = self.replanner.changes  # [{epoch, pace, epochs}] where the plan changed
            self.report["stopped_by_timer"] = trainer.current_epoch < (trainer.max_epochs or 0)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After fit, validate and test: the last one before metrics.json is written has the final figure.
        if self.report:
            self.report["took_s"] = round(clock_elapsed(), 2)
