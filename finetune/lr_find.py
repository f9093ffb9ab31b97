"""``optim.lr=find``: Lightning's learning-rate range test, with the run's freeze strategy and LR ratios kept.

:class:`FindLR` is Lightning's ``LearningRateFinder`` callback (what ``Tuner(trainer).lr_find`` runs),
at the start of fit, with three changes:

- Lightning's finder sets every parameter group to the same LR (``_exchange_scheduler`` writes
  ``lr_min`` into each group, and its schedule raises them alike). Our groups have ratios: the head
  at ``lr``, the backbone at ``lr * backbone_lr_mult`` (times layer decay), groups that start later at
  0. A step pre-hook on the optimizer scales each group by its ratio for the step and a post-hook
  undoes it, so the test sweeps the head LR with every ratio in force; groups frozen at epoch 0 stay
  frozen (their parameters have no gradient and their ratio is 0).
- The suggestion is :func:`valley_lr`, not Lightning's steepest gradient (see there why).
- The found LR becomes the module's ``lr`` and the optimizer and LR schedule are built again from
  it, so each group keeps its ratio (Lightning's ``update_attr`` would write one LR into every group).

``metrics.json`` gets ``lr_find``: the LR chosen, Lightning's own suggestion beside it, the steps and seconds.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateFinder

from finetune.errors import FineTuneError

__all__ = ["FIND", "FindLR", "check_lr", "find_lr", "valley_lr"]

FIND = "find"


def check_lr(value: Any) -> None:
    """``optim.lr`` is a positive number or ``find``."""
    if value == FIND:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FineTuneError(f"optim.lr must be a positive number or 'find', got '{value}'")


def valley_lr(lrs: Sequence[float], losses: Sequence[float], divergence: float = 4.0) -> tuple[float, int]:
    """fastai's "valley" rule on a finder's curve: robust to early spikes, stops at NaN or divergence.

    The curve is cut at the first non-finite loss and where the loss exceeds ``divergence`` times the lowest
    so far (larger LRs only diverge further). Then the longest decreasing subsequence of the loss is the valley,
    and the LR a third and a half into it (fastai's ``valley``, since v2.4) is the suggestion.

    Why not Lightning's rule (the steepest gradient of the loss against the LR): its gradient is taken against the
    LR itself, on an exponential sweep, so the tiny spacing at small LRs magnifies any early wiggle; and the
    losses are an exponential moving average, so an early spike (a bad batch) becomes a bump that decays
    for dozens of steps, the steepest descent on the curve. Lightning picks an LR on that decay (#1767;
    fastai's old ``steep`` rule had the same trouble, #3477); the valley spans the bump and the real descent
    alike, and its middle lies in the real descent.

    Returns:
        The suggested LR and its index in ``lrs``.

    Raises:
        FineTuneError: the loss never fell for three points in a row (no valley).
    """
    n = 0
    best = math.inf
    for loss in losses:
        if not math.isfinite(loss) or (best < math.inf and loss > divergence * best):
            break
        best = min(best, loss)
        n += 1
    n = min(n, len(lrs))
    # Longest decreasing subsequence, O(n^2) as fastai's (n is the number of finder steps, ~100).
    length = [1] * n
    start = [0] * n
    for i in range(n):
        start[i] = i
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i], start[i] = length[j] + 1, start[j]
    if n == 0 or max(length) < 3:
        raise FineTuneError(f"optim.lr=find: the loss did not fall over {n} finite finder steps "
                            f"(LR {lrs[0] if lrs else '?'} to {lrs[n - 1] if n else '?'}); set optim.lr=VALUE")
    end = max(range(n), key=lambda i: (length[i], -i))
    first = start[end]
    sections = (end - first) / 3
    idx = first + int(sections) + int(sections / 2)
    return float(lrs[idx]), idx


class FindLR(LearningRateFinder):
    """Run the LR range test at the start of fit and train with the :func:`valley_lr` suggestion.

    Args:
        min_lr: first head LR tried.
        max_lr: last head LR tried.
        num_training_steps: steps of the test (Lightning's default).
        early_stop_threshold: stop when the smoothed loss exceeds this times its lowest value.
        budget_share: under ``budget=``: the planner skips the test (the module's ``lr`` trains) when it would
            take more than this share of the budget (``optim.find_share``); None: the test always runs.
    """

    def __init__(self, min_lr: float = 1e-6, max_lr: float = 1.0, num_training_steps: int = 100,
                 early_stop_threshold: float = 4.0, budget_share: float | None = None) -> None:
        super().__init__(min_lr=min_lr, max_lr=max_lr, num_training_steps=num_training_steps, mode="exponential",
                         early_stop_threshold=early_stop_threshold, update_attr=False)
        self.result: dict[str, Any] = {}
        self.budget_share = budget_share
        self.skipped: str | None = None  # why the planner left the test out

    def _publish(self, trainer: pl.Trainer) -> None:
        from finetune.callbacks.run_recorder import RunRecorder

        for c in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(c, RunRecorder):
                c.results["lr_find"] = self.result

    def reserve_s(self, batch_s: float, batches_per_epoch: int, epoch_overhead_s: float) -> float:
        """Seconds the test will take (for :class:`finetune.callbacks.budget_planner.BudgetPlanner`)."""
        epochs = math.ceil(self._num_training_steps / max(1, batches_per_epoch))
        return self._num_training_steps * batch_s + epochs * epoch_overhead_s

    def lr_find(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:  # resumed: the checkpoint's optimizer already holds the LR found before
            self.result = {"lr": None, "note": "resumed: the LR found at the start of the run is kept"}
            return
        if self.skipped:
            self.result = {"lr": None, "skipped": self.skipped, "trained_lr": float(pl_module.hparams.lr)}
            self._publish(trainer)
            return
        start = time.perf_counter()
        optimizer = trainer.optimizers[0]
        head_lr = float(pl_module.hparams.lr)
        # Each group's LR relative to the head's (0 for a group that does not train at epoch 0).
        ratios = [g.get("initial_lr", g["lr"]) / head_lr if g.get("start_epoch", 0) == 0 else 0.0
                  for g in optimizer.param_groups]
        seen: dict[str, Any] = {}

        def scale(opt: Any, args: Any, kwargs: Any) -> None:
            for g, r in zip(opt.param_groups, ratios):
                g["finder_lr"] = g["lr"]
                g["lr"] = g["lr"] * r

        def unscale(opt: Any, args: Any, kwargs: Any) -> None:
            if not seen:  # after the first step (Lightning's closure runs backward inside step()): what it trained
                seen["trained_params"] = sum(p.numel() for g in opt.param_groups for p in g["params"]
                                             if p.grad is not None)
                seen["group_lrs"] = {str(g.get("name", i)): g["lr"] for i, g in enumerate(opt.param_groups)}
            for g in opt.param_groups:
                g["lr"] = g.pop("finder_lr", g["lr"])

        # The test may span several epochs of a small data set; the run's own epoch count comes back after.
        max_epochs = trainer.fit_loop.max_epochs
        batches = trainer.num_training_batches if math.isfinite(trainer.num_training_batches) else 1
        trainer.fit_loop.max_epochs = max(max_epochs or 1, math.ceil(self._num_training_steps / max(1, batches)) + 1)
        handles = [optimizer.register_step_pre_hook(scale), optimizer.register_step_post_hook(unscale)]
        early, self._early_exit = self._early_exit, False  # on_fit_start exits, after the suggestion below
        # Lightning restores its checkpoint of the weights (trainer.ckpt_path then names it), deletes it, then builds
        # the train loader again, whose sampler reads trainer.ckpt_path for the epoch to start from: the deletion
        # waits until the loader is built.
        pending: list[Any] = []
        trainer.strategy.remove_checkpoint = pending.append  # type: ignore[method-assign]
        try:
            super().lr_find(trainer, pl_module)
        finally:
            del trainer.strategy.remove_checkpoint  # the class's own method again
            for path in pending:
                trainer.strategy.remove_checkpoint(path)
            trainer.ckpt_path = None  # not resuming (checked above)
            self._early_exit = early
            for h in handles:
                h.remove()
            trainer.fit_loop.max_epochs = max_epochs
        found = self.optimal_lr
        if found is None:
            raise FineTuneError("optim.lr=find: Lightning's finder did not run (trainer.fast_dev_run is set)")
        lrs, losses = list(found.results["lr"]), list(found.results["loss"])
        lr, idx = valley_lr(lrs, losses, self._early_stop_threshold or math.inf)
        pl_module.hparams.lr = lr
        trainer.strategy.setup_optimizers(trainer)  # every group again from the new head LR, with its ratio
        self.result = {"lr": lr, "rule": "valley", "lightning_suggestion": found.suggestion(),
                       "steps": len(losses), "min_lr": self._min_lr, "max_lr": self._max_lr,
                       "seconds": round(time.perf_counter() - start, 2), **seen}
        self._publish(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr_find(trainer, pl_module)
        if self._early_exit:
            from pytorch_lightning.utilities.exceptions import _TunerExitException

            raise _TunerExitException()


def find_lr(module: pl.LightningModule, datamodule: pl.LightningDataModule, num_training_steps: int = 100,
            **trainer_kwargs: Any) -> dict[str, Any]:
    """The LR test alone (no training after it): the module's weights are as before, ``hparams.lr`` is the suggestion.

    Returns:
        ``lr`` (the suggestion), ``lightning_suggestion``, ``steps``, ``trained_params`` (what the test trained:
        the strategy's set at epoch 0) and ``group_lrs`` (each group's LR at the first step).
    """
    finder = FindLR(num_training_steps=num_training_steps)
    finder._early_exit = True
    import tempfile

    kwargs = {"max_epochs": 1, "logger": False, "default_root_dir": tempfile.gettempdir(), "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, **trainer_kwargs}
    trainer = pl.Trainer(callbacks=[finder], **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return finder.result
