"""``+recipe=tune budget=T``: a trial's share of the budget, with what earlier trials left unused handed on.

Each trial is planned to its share (finetune/budget.py: ``T / tune.n_trials``). A trial that Optuna's
pruner stopped (finetune/callbacks/prune.py), or whose plan ended early (whole epochs that did not fill
the share), leaves time unused; without handing it on a pruned sweep saves epochs but not one second
for the trials that follow. So a trial's planner budget is what is left of ``T`` by the finished trials'
own clocks (``metrics.json``'s ``budget.took_s``), split evenly over the trials still to run, this one
included: ``(T - spent) / (n_trials - finished)``. An earlier overrun is taken back the same way.

Only where this is sound: a trial of a sweep whose trials run one after another (the tune recipe's
``hydra.sweeper.n_jobs: 1``), found through Hydra's ``HydraConfig``; only trials numbered below this one
count, so what an earlier sweep left in the same directory does not. Elsewhere, and for the first trial,
the share is the plain one. A finished trial without ``took_s`` (failed before its plan, or interrupted)
counts as still to come: its share is not handed on, which can only end the sweep early, never late.
``metrics.json``'s ``budget.trial`` records the share, what was handed on and from how many trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.comparison.runs import Run, collect_runs
from finetune.errors import FineTuneError

__all__ = ["earlier_runs", "in_sequential_sweep", "sweep_job_num", "trial_share"]


def sweep_job_num(sequential_only: bool = False) -> int | None:
    """This job's number (``hydra.job.num``) when it is a job of a Hydra sweep (one that runs one trial at a time,
    with ``sequential_only``), else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN" or (sequential_only and int(hc.sweeper.get("n_jobs", 1) or 1) != 1):
        return None
    return int(hc.job.num)


def in_sequential_sweep() -> int | None:
    """This job's number when it is a trial of a sweep that runs one trial at a time."""
    return sweep_job_num(sequential_only=True)


def earlier_runs(run_dir: Path, job_num: int | None) -> list[Run]:
    """The runs beside ``run_dir`` in its sweep directory; with ``job_num``, only those numbered below it (an earlier
    sweep into the same directory may have left higher-numbered ones, which this sweep has not run yet)."""
    try:
        runs = collect_runs(run_dir.parent)
    except FineTuneError:  # nothing beside this trial yet
        return []
    return [r for r in runs if r.path.resolve() != run_dir.resolve()
            and (job_num is None or (r.path.name.isdigit() and int(r.path.name) < job_num))]


def trial_share(share_s: float, n_trials: int, run_dir: Path, job_num: int | None = None) -> dict[str, Any]:
    """The budget of the trial in ``run_dir``, from the finished trials beside it (its sweep directory).

    Args:
        share_s: the plain share, ``T / n_trials``.
        n_trials: the sweep's trials.
        run_dir: this trial's directory; its siblings are the sweep's other trials.
        job_num: this trial's ``hydra.job.num``: then only the directories numbered below it count (an earlier
            sweep into the same directory may have left higher-numbered ones).

    Returns:
        ``budget_s`` (what this trial plans to, at least 1 s), ``share_s``, ``handed_on_s`` (budget_s - share_s),
        ``finished_trials`` and their ``spent_s``.
    """
    before = earlier_runs(run_dir, job_num)
    took = [float(r.metrics["budget"]["took_s"]) for r in before
            if (r.metrics.get("budget") or {}).get("took_s") is not None]
    left = n_trials - len(took)
    budget_s = share_s if not took or left < 1 else max(1.0, (share_s * n_trials - sum(took)) / left)
    return {"budget_s": round(budget_s, 2), "share_s": round(share_s, 2), "handed_on_s": round(budget_s - share_s, 2),
            "finished_trials": len(took), "spent_s": round(sum(took), 2)}
