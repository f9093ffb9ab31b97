"""A tune trial's budget hands on what the finished trials left unused (finetune/trial_budget.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import compose
from finetune.trial_budget import in_sequential_sweep, trial_share


def _finished(sweep: Path, name: str, took_s: float | None, status: str = "ok") -> None:
    d = sweep / name
    d.mkdir(parents=True)
    budget = {"took_s": took_s} if took_s is not None else {}
    (d / "metrics.json").write_text(json.dumps({"status": status, **({"budget": budget} if budget else {})}))


def test_unused_time_of_finished_trials_is_split_over_the_trials_left(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _finished(sweep, "0", 20.0)  # pruned early: 40 s of its 60 unused
    _finished(sweep, "1", 50.0)
    (sweep / "2").mkdir()  # this trial
    t = trial_share(60.0, 4, sweep / "2")  # 240 s in all, 70 spent, 2 trials left: 85 s each
    assert t == {"budget_s": 85.0, "share_s": 60.0, "handed_on_s": 25.0, "finished_trials": 2, "spent_s": 70.0}


def test_the_first_trial_and_trials_without_a_clock_get_the_plain_share(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    assert trial_share(60.0, 4, sweep / "0")["budget_s"] == 60.0  # nothing beside it
    _finished(sweep, "1", None, status="failed")  # failed before planning: counted as still to come
    assert trial_share(60.0, 4, sweep / "0")["finished_trials"] == 0
    _finished(sweep, "2", 75.0)  # an overrun is taken back from the trials left
    assert trial_share(60.0, 4, sweep / "0")["budget_s"] == pytest.approx((240 - 75) / 3)


def test_a_trial_plans_to_the_handed_on_budget_and_metrics_record_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.trial_budget as tb
    from finetune.builders import _run_callbacks
    from finetune.callbacks.budget_planner import BudgetPlanner

    sweep = tmp_path / "sweep"
    _finished(sweep, "0", 30.0)
    (sweep / "1").mkdir()
    cfg = compose(["+recipe=tune", "budget=4m", "tune.n_trials=4"])  # 60 s a trial
    assert in_sequential_sweep() is None  # in-process, outside a Hydra sweep: the plain share
    plain = [c for c in _run_callbacks(cfg, sweep / "1") if isinstance(c, BudgetPlanner)][0]
    assert plain.budget_s == 60.0 and plain.record == {}
    monkeypatch.setattr(tb, "in_sequential_sweep", lambda: 1)
    planner = [c for c in _run_callbacks(cfg, sweep / "1") if isinstance(c, BudgetPlanner)][0]
    assert planner.budget_s == 70.0 and planner.record["trial"]["handed_on_s"] == 10.0  # (240 - 30) / 3


def test_only_the_trials_numbered_before_this_one_count(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _finished(sweep, "0", 30.0)
    _finished(sweep, "2", 5.0)  # left by an earlier sweep into the same directory
    (sweep / "1").mkdir()
    assert trial_share(60.0, 3, sweep / "1", job_num=1)["budget_s"] == 75.0  # (180 - 30) / 2
    assert trial_share(60.0, 3, sweep / "1")["finished_trials"] == 2  # without the number every sibling counts
