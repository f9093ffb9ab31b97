"""``+recipe=tune``: stop a trial early when Optuna's pruner says it is hopeless (``tune.pruner``).

Hydra's Optuna sweeper runs each trial as a Hydra job and tells Optuna only the finished value: no
``optuna.Trial`` reaches the job, so Optuna's pruning API cannot be called from inside a trial. The
trials of one sweep leave everything a pruner needs on disk, though: each finished trial is a sibling
run directory in the sweep directory (``hydra.sweep.dir``) with its val/acc per epoch in ``epochs.csv``
and whether it was pruned in ``metrics.json``. So at each validation epoch end :class:`TrialPruner`
rebuilds an in-memory Optuna study from the finished siblings (complete trials with their curves,
pruned ones as PRUNED), asks one trial, reports this run's curve so far and lets the configured Optuna
pruner decide (``trial.should_prune()``). The decision rule is Optuna's own: a MedianPruner compares
against COMPLETE trials only and counts only them toward ``n_startup_trials``, as in an Optuna study.

A pruned run stops after the epoch (``trainer.should_stop``), is still evaluated and checkpointed like
any run, returns its (lower) val accuracy to the sweeper, and records
``pruned: {epoch, value, reason}`` in ``metrics.json`` (epoch as in ``epochs.csv``, from 0).
"""

from __future__ import annotations

import logging
import statistics
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

from finetune.trial_budget import earlier_runs, sweep_job_num

__all__ = ["MONITOR", "TrialPruner", "sibling_trials"]

MONITOR = "val/acc"  # the sweep's objective (finetune.cli returns val_acc), per epoch in epochs.csv


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Without Optuna's "A new study created in memory" at every epoch, and its ExperimentalWarning for
    ``create_trial``/``add_trial`` (stable API since 2.0, still flagged in 2.10, the sweeper's version)."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def sibling_trials(run_dir: Path, job_num: int | None = None) -> list[Any]:
    """The finished runs beside ``run_dir`` as Optuna trials: COMPLETE, or PRUNED where ``metrics.json`` says so.

    Failed and unfinished runs are left out (Optuna's pruners ignore FAIL and RUNNING trials), and so are
    runs without a per-epoch curve: they would tell the pruner nothing at any epoch. With ``job_num``
    (``hydra.job.num``) only runs numbered below it count: not what an earlier sweep left in the directory.
    """
    from optuna.trial import TrialState, create_trial

    trials = []
    for run in earlier_runs(run_dir, job_num):
        if run.status != "ok" or not run.val_acc_by_epoch:
            continue
        curve = dict(run.val_acc_by_epoch)
        pruned = "pruned" in run.metrics
        value = run.metrics.get("val_acc", curve[max(curve)])
        trials.append(create_trial(value=float(value), intermediate_values=curve,
                                   state=TrialState.PRUNED if pruned else TrialState.COMPLETE))
    return trials


class TrialPruner(Callback):
    """Ask an Optuna pruner, at each validation epoch end, whether to stop this trial of the sweep.

    Args:
        pruner: an ``optuna.pruners.BasePruner`` (``tune.pruner``, built from its ``_target_``; a step is an
            epoch, from 0); None: never prune.
    """

    def __init__(self, pruner: Any = None) -> None:
        self.pruner = pruner
        self.curve: dict[int, float] = {}  # this run's val/acc by epoch
        self.pruned: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = {int(k): float(v) for k, v in state_dict.get("curve", {}).items()}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or MONITOR not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch
        self.curve[epoch] = float(trainer.callback_metrics[MONITOR])
        if self.pruner is None or self.pruned is not None:
            return
        with _quiet_optuna():
            siblings = sibling_trials(Path(trainer.default_root_dir), sweep_job_num())
            prune = self.should_prune(siblings)
        # Every rank stops together (as EarlyStopping does); all ranks read the same sibling files.
        if not trainer.strategy.reduce_boolean_decision(prune, all=False):
            return
        trainer.should_stop = True
        self.pruned = {"epoch": epoch, "value": round(self.curve[epoch], 5), "reason": self._reason(siblings, epoch)}
        from finetune.callbacks.run_recorder import RunRecorder

        for c in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(c, RunRecorder):
                c.results["pruned"] = self.pruned

    def should_prune(self, siblings: list[Any]) -> bool:
        """Optuna's answer for this run's curve so far, in a study of ``siblings`` (``optuna.trial.FrozenTrial``)."""
        import optuna

        study = optuna.create_study(direction="maximize", pruner=self.pruner)
        for t in siblings:
            study.add_trial(t)
        trial = study.ask()
        for step, value in sorted(self.curve.items()):
            trial.report(value, step)
        return bool(trial.should_prune())

    def _reason(self, siblings: list[Any], epoch: int) -> str:
        """What the pruner saw, for the reader of metrics.json: this run's best so far and the finished trials'."""
        from optuna.trial import TrialState

        at_epoch = [t.intermediate_values[epoch] for t in siblings
                    if t.state == TrialState.COMPLETE and epoch in t.intermediate_values]
        median = f", their median {statistics.median(at_epoch):.4f}" if at_epoch else ""
        return (f"{type(self.pruner).__name__}: best {MONITOR} so far {max(self.curve.values()):.4f}; "
                f"{len(at_epoch)} completed trials reached epoch {epoch}{median}")
