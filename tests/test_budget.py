"""budget=: parsing, the plan from made-up step times, and a run that trains exactly what was planned."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import pytest
import pytorch_lightning as pl

from finetune.budget import LOOP_BATCH_S, LOOP_EPOCH_S, format_seconds, images_in_budget, parse_budget, plan_epochs
from finetune.builders import check_run_config
from finetune.config import compose
from finetune.errors import FineTuneError

from conftest import run_cli


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("600", 600),
                                          ("2.5m", 150), (None, None), ("null", None)])
def test_parse_budget(text: str | None, seconds: float | None) -> None:
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["-1", "abc", "0s", "0", "10x", "m"])
def test_bad_budget_is_one_line_before_anything_runs(text: str) -> None:
    with pytest.raises(FineTuneError) as e:
        check_run_config(compose([f"budget={text}"]))
    assert "\n" not in str(e.value) and "budget" in str(e.value)


def test_bad_budget_exits_2_from_the_command(tmp_path: Path) -> None:
    r = run_cli(["budget=-1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: budget must be more than zero, got '-1'"


def test_plan_fills_the_budget_without_passing_it() -> None:
    # 10 batches an epoch at 1 s, 2 s per epoch of validation and checkpoints, 10 s spent, 5 s for the end.
    plan = plan_epochs(100, 10, lambda e: 1.0, 2.0, spent_s=10, end_s=5, whole_epochs=False)
    assert plan.predicted_total_s <= 100 * 0.95
    # Whole epochs would stop at 6 (72 s of 80); a 7th, shorter epoch each buys more steps.
    assert (plan.epochs, plan.batches_per_epoch, plan.steps) == (7, 9, 63)
    # One more batch per epoch would not fit.
    assert 10 + 5 + plan.epochs * (plan.batches_per_epoch + 1 + 2.0) > 95
    whole = plan_epochs(100, 10, lambda e: 1.0, 2.0, spent_s=10, end_s=5, whole_epochs=True)
    assert (whole.epochs, whole.batches_per_epoch, whole.steps) == (6, 10, 60)


def test_plan_counts_cheaper_head_only_epochs_and_accumulation() -> None:
    # lp_ft: two head-only epochs at 0.2 s per batch, then 1 s per batch.
    plan = plan_epochs(60, 10, lambda e: 0.2 if e < 2 else 1.0, 1.0, spent_s=0, end_s=0, whole_epochs=True,
                       min_epochs=3, accumulate=2)
    assert plan.epochs == 6  # 3 + 3 + 4 x 11 = 50 s of 57; a 7th would need 61
    assert plan.steps == 6 * 5


def test_too_small_a_budget_names_the_smallest_that_works() -> None:
    with pytest.raises(FineTuneError) as e:
        plan_epochs(20, 10, lambda e: 1.0, 2.0, spent_s=10, end_s=5, whole_epochs=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith("budget=20s is too small: one epoch")
    smallest = re.search(r"smallest budget that would work is budget=(\S+)$", message).group(1)
    assert plan_epochs(parse_budget(smallest), 10, lambda e: 1.0, 2.0, 10, 5, False).epochs == 1
    with pytest.raises(FineTuneError):
        plan_epochs(parse_budget(smallest) - 1, 10, lambda e: 1.0, 2.0, 10, 5, False)


def test_format_and_images_in_budget() -> None:
    assert format_seconds(5400) == "1h30m" and format_seconds(130.2) == "2m11s"
    assert images_in_budget(600, 0.004, reserve_s=60) == 127_500


def _fake_timings(batch_s: float, eval_batch_s: float = 0.1):  # noqa: ANN202
    from finetune.callbacks.budget_planner import Timings

    def measure(trainer, module, epochs, *args):  # noqa: ANN001, ANN202
        t = Timings()
        t.batch_s = {e: batch_s for e in epochs}
        t.eval_batch_s, t.checkpoint_s, t.seconds = eval_batch_s, 0.1, 1.0
        return t

    return measure


def test_a_run_trains_the_planned_epochs_and_its_schedule_ends_on_time(
    make_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step times made up (10 s a batch, 5 s already spent): slower than any real step of this tiny model, so the
    plan is known whatever the machine's load and the safety-net Timer never fires."""
    import finetune.callbacks.budget_planner as bp
    from finetune.builders import build_datamodule, build_fit_datamodule, build_module, build_trainer

    monkeypatch.setattr(bp, "measure", _fake_timings(10.0))
    monkeypatch.setattr(bp, "clock_elapsed", lambda: 5.0)
    root = make_folder(classes=2, per_class=8)
    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
                   "data.image_size=32", "data.batch_size=4", "data.val_fraction=0.25", "trainer.max_epochs=50",
                   "trainer.enable_progress_bar=false", "calibrate=false", "budget=5m",
                   "budget_replan=false"])  # the made-up plan stands (tests/test_replan.py re-plans)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dm = build_datamodule(cfg)
    model = build_module(cfg, dm)
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(model, datamodule=build_fit_datamodule(cfg, dm, model))
    planner = next(c for c in trainer.callbacks if isinstance(c, bp.BudgetPlanner))
    plan = planner.plan
    assert plan.epochs > 1 and plan.predicted_total_s <= 300 * 0.95
    assert trainer.current_epoch == plan.epochs and trainer.global_step == plan.steps
    # The schedule was built for the planned length: cosine is at zero after the last step.
    head_lr = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    assert head_lr < 1e-6 * cfg.optim.lr
    assert planner.report["steps"] == plan.steps and planner.report["budget"] == "5m"


def _fit_with_slow_validation(make_folder, tmp_path: Path, monkeypatch, eval_batch_s: float, budget: str,
                              calibrate: bool = False):  # noqa: ANN001, ANN202
    """A tiny fit whose made-up timings make validation dear: an epoch trains 3 batches of 10 s; a validation
    is 1 batch of ``eval_batch_s`` and 2 checkpoints of 0.1 s. Returns the plan and the epochs validated."""
    import finetune.callbacks.budget_planner as bp
    from finetune.builders import build_datamodule, build_fit_datamodule, build_module, build_trainer

    monkeypatch.setattr(bp, "measure", _fake_timings(10.0, eval_batch_s=eval_batch_s))
    monkeypatch.setattr(bp, "clock_elapsed", lambda: 5.0)
    root = make_folder(classes=2, per_class=8)
    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
                   "data.image_size=32", "data.batch_size=4", "data.val_fraction=0.25", "trainer.max_epochs=50",
                   "trainer.enable_progress_bar=false", f"calibrate={str(calibrate).lower()}", f"budget={budget}",
                   "budget_replan=false"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dm = build_datamodule(cfg)
    model = build_module(cfg, dm)
    trainer = build_trainer(cfg, run_dir)
    validated: list[int] = []

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            if not trainer.sanity_checking:
                validated.append(trainer.current_epoch)

    trainer.callbacks.append(Record())
    trainer.fit(model, datamodule=build_fit_datamodule(cfg, dm, model))
    return next(c for c in trainer.callbacks if isinstance(c, bp.BudgetPlanner)).plan, validated, run_dir


def test_where_validation_would_crowd_out_training_it_runs_every_few_epochs_and_at_the_last(
    make_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune.checkpoint_io import safe_load

    # A validation takes 20.2 s, over VAL_MAX_SHARE of an epoch's 30 s of training: every ceil(20.2 / 7.5) = 3
    # epochs. 5m20s leaves 278.7 s after 5 s spent and 20.3 s of sanity check and checkpoints (evaluate=last: the
    # last epoch's validation is the final one): 7 epochs (210 s and 3 validations).
    plan, validated, run_dir = _fit_with_slow_validation(make_folder, tmp_path, monkeypatch, 20.0, "5m20s")
    # Each eval batch also pays Lightning's loop around it (LOOP_BATCH_S, not in the timed step).
    assert (plan.epochs, plan.check_val_every_n_epoch, plan.val_s) == (7, 3, pytest.approx(20.2 + LOOP_BATCH_S))
    # Training batches and epochs pay it too: without it, a head on cached features (0.8 ms steps) planned 10,000 epochs.
    assert (plan.step_s, plan.epoch_overhead_s) == (pytest.approx(10.0 + LOOP_BATCH_S), pytest.approx(LOOP_EPOCH_S))
    assert validated == [2, 5, 6]  # every third epoch, and the last, which the interval would have skipped
    assert safe_load(run_dir / "checkpoints" / "last.ckpt", "checkpoint")["epoch"] == 6
    # Validating every epoch, the same budget would have trained 5: 5 x (30 + 20.2) = 251 s, 6 would be 301.2 s.
    assert plan_epochs(320, 3, lambda e: 10.0, 0.0, 5.0, 20.3, whole_epochs=True, val_s=20.2).epochs == 5


@pytest.mark.parametrize(("eval_batch_s", "budget", "epochs", "calibration_s"), [
    # Every 9th epoch: 9 epochs validate once, at the last, whose logits calibration reuses: nothing reserved,
    # and 9 epochs fit (330.2 s of the 349.9 s left); a pass reserved for it would have left 289.9 s, 7 epochs.
    (60.0, "7m17s", 9, 0.0),
    # Every 3rd: with none reserved, 8 epochs would fit but validate 3 times, and an earlier best checkpoint is
    # calibrated on a pass of its own: one reserved, 7 epochs.
    (20.0, "6m", 7, 20.0),
])
def test_calibration_reserves_a_val_pass_only_where_an_earlier_epoch_could_be_best(
    make_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    eval_batch_s: float, budget: str, epochs: int, calibration_s: float,
) -> None:
    plan, validated, _ = _fit_with_slow_validation(make_folder, tmp_path, monkeypatch, eval_batch_s, budget,
                                                   calibrate=True)
    loop = LOOP_BATCH_S if calibration_s else 0.0  # the pass's one batch, with Lightning's loop around it
    assert plan.epochs == epochs and plan.reserved_s["calibration"] == pytest.approx(calibration_s + loop)
    assert validated[-1] == epochs - 1


def test_the_safety_net_makes_the_epoch_it_stops_validate() -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    from finetune.callbacks.budget_planner import _SafetyNet

    def trainer(every: int | None):  # noqa: ANN202
        return SimpleNamespace(should_stop=False, check_val_every_n_epoch=every,
                               strategy=SimpleNamespace(broadcast=lambda x: x))

    net = _SafetyNet(duration=timedelta(seconds=1000.0), interval="step", verbose=False)
    net.on_train_start(trainer(3), None)
    running = trainer(3)
    net.on_train_batch_end(running, None, None, None, 0)
    assert not running.should_stop and running.check_val_every_n_epoch == 3  # time left: the interval stands
    net._duration = 0.0
    net.on_train_batch_end(running, None, None, None, 0)
    assert running.should_stop and running.check_val_every_n_epoch == 1
    by_batches = trainer(None)  # Lightning validating by batches: left as it is
    net.on_train_batch_end(by_batches, None, None, None, 0)
    assert by_batches.should_stop and by_batches.check_val_every_n_epoch is None


def test_budget_in_metrics_json(make_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.callbacks.budget_planner as bp
    from finetune.train import train

    monkeypatch.setattr(bp, "measure", _fake_timings(2.0))
    monkeypatch.setattr(bp, "clock_elapsed", lambda: 5.0)
    root = make_folder(classes=2, per_class=8)
    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
                   "data.image_size=32", "data.batch_size=4", "data.val_fraction=0.25",
                   "trainer.enable_progress_bar=false", "calibrate=false", "budget=3s", "budget_replan=false"])
    with pytest.raises(FineTuneError, match=r"budget=3s is too small: .* the smallest budget that would work is budget="):
        train(cfg, tmp_path / "small")
    cfg.budget = "1m"
    metrics = train(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["budget"]["epochs_trained"] == metrics["epochs"] >= 1
    assert 0 < written["budget"]["took_s"] and set(written["budget"]["reserved_s"]) >= {"before_training", "test"}


def test_steps_slower_than_planned_stop_training_earlier_by_the_slower_evaluation() -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import Timer

    from finetune.callbacks.budget_planner import BudgetPlanner

    planner = BudgetPlanner(100.0)
    planner.plan = plan_epochs(100.0, 40, lambda e: 0.25, 0.0, spent_s=10.0, end_s=20.0, whole_epochs=True)
    assert planner.plan.epochs == 6 and planner.plan.step_s == 0.25  # 40 batches of 0.25 s an epoch
    planner._timer_base_s, planner._after_training_s = 100.0, 20.0  # budget x 1.05 - spent; evaluation after training
    planner.timer = Timer(duration=timedelta(seconds=80.0), interval="step")
    assert planner.tighten(1.0) == 1.0 and planner.timer._duration == 80.0  # on plan: unchanged
    assert planner.tighten(2.0) == 2.0 and planner.timer._duration == 60.0  # twice as slow: 40 s kept for evaluation
    assert planner.report["slowdown"] == 2.0
    assert planner.tighten(0.8) == 1.0 and planner.timer._duration == 80.0  # faster again: the plan's net, no looser

    # The pace is of the last quarter epoch (10 batches here), validation left out: on plan, then twice as slow.
    now = [0.0]
    planner.clock, planner._training = (lambda: now[0]), True
    trainer = SimpleNamespace(callbacks=[], current_epoch=0, max_epochs=6, check_val_every_n_epoch=1,
                              sanity_checking=False)

    def epoch(batch_seconds: list[float], start_s: float = 0.0) -> None:
        """An epoch: ``start_s`` of loader start, then batches taking these seconds each (loading included)."""
        planner.on_train_epoch_start(trainer, None)
        now[0] += start_s
        for i, seconds in enumerate(batch_seconds):
            planner.on_train_batch_start(trainer, None, None, i)
            now[0] += seconds
            planner.on_train_batch_end(trainer, None, None, None, i)

    epoch([0.25] * 10 + [0.5] * 9)
    assert planner.timer._duration == 80.0  # nine slow batches are not yet a window
    epoch([0.5])  # the tenth, in the next epoch: windows run on across epochs
    assert planner.timer._duration == pytest.approx(60.0)
    planner.on_validation_end(trainer, None)
    now[0] += 30.0  # a validation pass, and a slow start of the next epoch's loader, are not training steps
    epoch([0.25] * 10, start_s=5.0)
    assert planner.timer._duration == 80.0
    # An unfreezing strategy: head-only epochs were planned at 0.1 s a batch. At 0.2 s they are twice as slow as
    # their plan, though faster than the final 0.25 s: the net moves.
    planner._planned_batch_s = lambda epoch: 0.1 if epoch == 0 else 0.25
    epoch([0.2] * 10)
    assert planner.timer._duration == pytest.approx(60.0)
    # Epochs of one batch (10 images per class): a window spans five of them; their starts do not count.
    planner.plan = plan_epochs(100.0, 1, lambda e: 0.2, 0.05, spent_s=10.0, end_s=20.0, whole_epochs=True)
    planner._planned_batch_s = lambda epoch: 0.2
    for _ in range(5):
        epoch([0.2], start_s=1.0)  # on plan, however slow Lightning's epoch start
    assert planner.timer._duration == pytest.approx(80.0)
    for _ in range(5):
        epoch([0.4])  # twice as slow
    assert planner.timer._duration == pytest.approx(60.0)


def test_the_net_counts_from_what_the_budget_clock_says_is_left_when_training_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import Timer

    import finetune.callbacks.budget_planner as bp

    planner = bp.BudgetPlanner(100.0)
    planner.plan = plan_epochs(100.0, 10, lambda e: 1.0, 0.0, spent_s=10.0, end_s=20.0, whole_epochs=True)
    planner._timer_base_s, planner._after_training_s = 95.0, 20.0  # as planned: budget x 1.05 - 10 s spent
    planner.timer = Timer(duration=timedelta(seconds=75.0), interval="step")
    # The sanity check and the LR finder took 20 s more than the plan knew of when it set the net.
    monkeypatch.setattr(bp, "clock_elapsed", lambda: 30.0)
    planner.on_train_start(SimpleNamespace(callbacks=[]), None)
    assert planner.timer._duration == pytest.approx(105.0 - 30.0 - 20.0)
    # Twice as slow after it: the evaluation's 20 s become 40 s, taken off the rebased net.
    assert planner.tighten(2.0) == 2.0 and planner.timer._duration == pytest.approx(105.0 - 30.0 - 40.0)
