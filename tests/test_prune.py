"""+recipe=tune's trial pruning: Optuna's pruner, fed the finished sibling trials of the sweep dir, stops a run."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import pytest
import torch
from pytorch_lightning.trainer.states import TrainerFn

from finetune.callbacks.run_recorder import RunRecorder
from finetune.comparison.render import markdown
from finetune.comparison.runs import collect_runs, report_rows
from finetune.config import compose

optuna = pytest.importorskip("optuna", reason="the tune extra (hydra-optuna-sweeper)")

from finetune.callbacks.prune import TrialPruner  # noqa: E402  (after the skip: it needs optuna)

# Three finished trials: at epoch 2 their val/acc median is 0.70 and their mean 0.75.
SIBLINGS = [[0.3, 0.5, 0.6], [0.3, 0.5, 0.7], [0.3, 0.5, 0.95]]


def write_trial(path: Path, curve: Sequence[float], status: str = "ok", pruned_at: int | None = None) -> Path:
    """A finished trial's run directory: ``epochs.csv`` (val/acc per epoch) and ``metrics.json``."""
    path.mkdir(parents=True)
    with (path / "epochs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train/loss", "val/acc"])
        writer.writeheader()
        writer.writerows({"epoch": e, "train/loss": 1.0, "val/acc": acc} for e, acc in enumerate(curve))
    metrics = {"status": status, "val_acc": curve[-1], "epochs": len(curve)}
    if pruned_at is not None:
        metrics["pruned"] = {"epoch": pruned_at, "value": curve[pruned_at], "reason": "fabricated"}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def sweep_with(tmp_path: Path, curves: Sequence[Sequence[float]]) -> Path:
    """A sweep dir with finished trials 0..n-1 and the running trial n (no files yet); returns the running one."""
    for i, curve in enumerate(curves):
        write_trial(tmp_path / "sweep" / str(i), curve)
    run_dir = tmp_path / "sweep" / str(len(curves))
    run_dir.mkdir(parents=True)
    return run_dir


def fake_trainer(run_dir: Path) -> SimpleNamespace:
    """What TrialPruner reads of a Trainer during fit."""
    return SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING), sanity_checking=False, callback_metrics={}, current_epoch=0,
        default_root_dir=str(run_dir), strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d),
        callbacks=[RunRecorder()], should_stop=False,
    )


def run_epochs(pruner: TrialPruner, run_dir: Path, curve: Sequence[float]) -> tuple[SimpleNamespace, list[int]]:
    """Validation epoch ends with ``curve`` as val/acc, as Lightning would call them; the epochs it stopped after."""
    trainer = fake_trainer(run_dir)
    stopped = []
    for epoch, acc in enumerate(curve):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/acc": torch.tensor(acc)}
        pruner.on_validation_end(trainer, None)
        if trainer.should_stop:
            stopped.append(epoch)
            break
    return trainer, stopped


def median_pruner(n_startup_trials: int = 3, n_warmup_steps: int = 2) -> TrialPruner:
    return TrialPruner(optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps))


def test_a_run_below_the_siblings_median_after_the_warmup_is_stopped_and_records_it(tmp_path: Path) -> None:
    run_dir = sweep_with(tmp_path, SIBLINGS)
    pruner = median_pruner()
    # Far below at epochs 0 and 1 (the warmup: not judged), just below the median 0.70 at epoch 2.
    trainer, stopped = run_epochs(pruner, run_dir, [0.1, 0.2, 0.65, 0.99])
    assert stopped == [2]
    recorded = RunRecorder.of(trainer).results["pruned"]  # what metrics.json gets
    assert recorded["epoch"] == 2 and recorded["value"] == pytest.approx(0.65)
    assert "MedianPruner" in recorded["reason"] and "median 0.7000" in recorded["reason"]


def test_a_run_above_the_median_is_not_stopped(tmp_path: Path) -> None:
    # 0.72: above the median (0.70), below the mean (0.75): only the median rule lets it go on.
    run_dir = sweep_with(tmp_path, SIBLINGS)
    trainer, stopped = run_epochs(median_pruner(), run_dir, [0.1, 0.2, 0.72])
    assert stopped == [] and "pruned" not in RunRecorder.of(trainer).results


def test_fewer_completed_siblings_than_n_startup_trials_never_prune(tmp_path: Path) -> None:
    run_dir = sweep_with(tmp_path, SIBLINGS[:2])
    assert run_epochs(median_pruner(), run_dir, [0.0, 0.0, 0.0, 0.0])[1] == []
    # A pruned and a failed sibling are no completed trials: as in an Optuna study, they do not count.
    write_trial(tmp_path / "sweep" / "p", [0.3, 0.5, 0.9], pruned_at=2)
    write_trial(tmp_path / "sweep" / "f", [0.3, 0.5, 0.9], status="failed")
    assert run_epochs(median_pruner(), run_dir, [0.0, 0.0, 0.0, 0.0])[1] == []
    write_trial(tmp_path / "sweep" / "c", [0.3, 0.5, 0.9])  # the third completed one: now it is judged
    assert run_epochs(median_pruner(), run_dir, [0.0, 0.0, 0.0, 0.0])[1] == [2]


def test_trials_an_earlier_sweep_left_in_the_directory_are_not_siblings(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.callbacks.prune as prune

    run_dir = sweep_with(tmp_path, SIBLINGS[:2])  # trials 0, 1 finished; this is trial 2
    write_trial(tmp_path / "sweep" / "3", [0.3, 0.5, 0.9])  # an earlier sweep's trial 3: not run by this one yet
    assert len(prune.sibling_trials(run_dir)) == 3 and len(prune.sibling_trials(run_dir, job_num=2)) == 2
    monkeypatch.setattr(prune, "sweep_job_num", lambda: 2)  # as in a Hydra sweep: 2 completed, under n_startup_trials
    assert run_epochs(median_pruner(), run_dir, [0.0, 0.0, 0.0, 0.0])[1] == []
    monkeypatch.setattr(prune, "sweep_job_num", lambda: None)  # every sibling counts: 3 completed, judged
    assert run_epochs(median_pruner(), run_dir, [0.0, 0.0, 0.0, 0.0])[1] == [2]


def test_no_pruner_never_stops(tmp_path: Path) -> None:
    run_dir = sweep_with(tmp_path, SIBLINGS)
    assert run_epochs(TrialPruner(None), run_dir, [0.0, 0.0, 0.0, 0.0])[1] == []


def test_the_comparison_report_shows_which_trials_were_pruned_and_when(tmp_path: Path) -> None:
    write_trial(tmp_path / "sweep" / "0", [0.3, 0.5, 0.9])
    write_trial(tmp_path / "sweep" / "1", [0.2, 0.3, 0.35], pruned_at=2)
    columns, rows = report_rows(collect_runs(tmp_path / "sweep"))
    assert [r["pruned_at_epoch"] for r in rows] == ["", 2]
    md = markdown(columns, rows, {})
    assert "pruned at epoch" in md.splitlines()[2]
    assert "1 of 2 runs were pruned (stopped early as hopeless, then evaluated): 1 after epoch 2." in md
    # A sweep without pruning keeps its table as before.
    assert "pruned_at_epoch" not in report_rows(collect_runs(tmp_path / "sweep" / "0"))[0]


def test_a_pruned_tune_trial_stops_and_is_still_evaluated(make_folder: Callable[..., Path], tmp_path: Path) -> None:
    """The recipe's wiring end to end: a real tiny run, judged from epoch 1, among siblings at 100%."""
    from finetune.train import train

    root = make_folder(classes=4, per_class=8, splits=("train", "val", "test"))
    run_dir = sweep_with(tmp_path, [[1.0] * 4] * 3)
    # lr 1e-7: the run stays near chance (25%), below the siblings' 100% whatever the draw.
    cfg = compose(["+recipe=tune", "backbone.name=test_resnet", "backbone.pretrained=false", "data=folder",
                   f"data.root={root}", "data.image_size=32", "data.batch_size=8", "trainer.max_epochs=4",
                   "trainer.enable_progress_bar=false", "calibrate=false", "optim.lr=1e-7",
                   "tune.pruner.n_warmup_steps=1"])
    metrics = train(cfg, run_dir)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["pruned"]["epoch"] == 1 and written["epochs"] == 2 and written["status"] == "ok"
    assert "val_acc" in written and "test_acc" in written and metrics["val_acc"] < 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with (run_dir / "epochs.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
    # Without a pruner (tune.pruner=null) the same trial trains all its epochs.
    cfg.tune.pruner = None
    unpruned = tmp_path / "sweep" / "unpruned"
    assert train(cfg, unpruned)["epochs"] == 4 and "pruned" not in json.loads((unpruned / "metrics.json").read_text())


@pytest.mark.slow  # 45 s on the shared machine: a 5-trial sweep of 3 epochs each
def test_a_tune_sweep_prunes_trials_and_reports_them(make_folder: Callable[..., Path], tmp_path: Path,
                                                     cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """In-process ``+recipe=tune``: each trial is judged against the trials before it, as Optuna would."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the tune extra (hydra-optuna-sweeper)")
    root = make_folder(classes=4, per_class=10)
    sweep = tmp_path / "sweep"
    r = cli(["+recipe=tune", "tune.n_trials=5", "tune.pruner.n_startup_trials=1", "tune.pruner.n_warmup_steps=0",
             "backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
             "data.image_size=32", "data.batch_size=8", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
             "calibrate=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = collect_runs(sweep)
    assert [run.name for run in runs] == ["0", "1", "2", "3", "4"]
    assert "pruned" not in runs[0].metrics  # the first trial has no completed trial to be compared with
    pruned = [run for run in runs if "pruned" in run.metrics]
    for run in runs:
        stop = run.metrics["pruned"]["epoch"] if run in pruned else 2
        assert run.metrics["status"] == "ok" and run.metrics["epochs"] == stop + 1 == len(run.val_acc_by_epoch)
        # Optuna's median rule, checked against the files: a pruned trial's best so far is below the median of
        # the completed trials before it at that epoch; a completed one never was at any epoch.
        before = [r for r in runs[:runs.index(run)] if "pruned" not in r.metrics]
        for epoch in range(stop + 1):
            others = sorted(dict(r.val_acc_by_epoch)[epoch] for r in before)
            if not others:
                continue
            median = (others[(len(others) - 1) // 2] + others[len(others) // 2]) / 2
            best = max(acc for e, acc in run.val_acc_by_epoch if e <= epoch)
            assert (best < median) == (run in pruned and epoch == stop), (run.name, epoch)
    # With this seed's draws, trial 2 reaches 25% at epoch 0, below the median of trials 0 and 1 (12.5%, 75%).
    assert [run.name for run in pruned] == ["2"]
    md = (sweep / "comparison.md").read_text()
    assert "1 of 5 runs were pruned (stopped early as hopeless, then evaluated): 2 after epoch 0." in md
