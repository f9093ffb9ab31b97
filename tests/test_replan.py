"""budget_replan: the epochs re-planned at epoch boundaries from the measured pace, the LR schedule stretched."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from finetune.optim import lr_lambda
from finetune.replan import Replanner, TimeWarp, epochs_that_fit

from test_budget import _fake_timings


def test_the_warp_stretches_what_is_left_of_the_schedule_without_a_jump() -> None:
    f = lr_lambda("cosine", total_steps=100, warmup_steps=10)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [f])
    warp = TimeWarp(100)
    warp.wrap(sched)
    assert [sched.lr_lambdas[0](s) for s in range(0, 100, 7)] == [f(s) for s in range(0, 100, 7)]  # unwarped
    warp.retarget(40, 160)  # 60 steps left become 120
    g = sched.lr_lambdas[0]
    assert g(39) == f(39) and g(40) == f(40)
    assert g(100) == pytest.approx(f(70)) and g(160) == pytest.approx(0.0, abs=1e-12)
    assert all(g(s) >= g(s + 1) for s in range(40, 160))  # still a cosine's decline
    warp.retarget(100, 130)  # a later re-plan shrinks it: continuous again, ends at the new end
    assert g(100) == pytest.approx(f(70)) and g(115) == pytest.approx(f(85)) and g(130) == pytest.approx(0.0, abs=1e-12)
    assert g(40) == f(40)  # the steps before a re-plan keep their multipliers
    # A plain function: LambdaLR's state_dict saves None for it rather than a closure that does not pickle.
    assert sched.state_dict()["lr_lambdas"] == [None]


def test_epochs_that_fit() -> None:
    # 100 s left, 20 s of evaluation: 8 more epochs of 10 s; twice as slow, 40 s of evaluation leave 3 of 20 s.
    assert epochs_that_fit(3, 100.0, 10.0, 20.0, 1.0) == 11
    assert epochs_that_fit(3, 100.0, 10.0, 20.0, 2.0) == 6
    assert epochs_that_fit(3, 100.0, 10.0, 20.0, 0.5) == 19  # faster: evaluation kept at its planned 20 s
    assert epochs_that_fit(3, 10.0, 10.0, 20.0, 1.0) == 3  # past the budget already: nothing more


def _replanner(elapsed: list[float], **kw) -> Replanner:  # noqa: ANN003
    args = dict(budget_s=1000.0, planned_s=lambda e: 100.0, end_s=50.0, steps_per_epoch=10,
                first_epoch=1, min_epochs=1, max_epochs=10_000, elapsed=lambda: elapsed[0])
    args.update(kw)
    return Replanner(**args)


def test_faster_epochs_get_more_epochs_slower_ones_fewer_and_noise_none() -> None:
    """Budget 1000 s, epochs planned at 100 s, 50 s of evaluation: the plan was 8 epochs (plus 100 s spent)."""
    elapsed = [400.0]  # three epochs after 100 s spent
    r = _replanner(elapsed)
    r.took = [(80.0, 100.0)] * 3  # 0.8x: 950 - 400 - 50 = 500 s left hold 6 epochs of 80 s, 3 + 6 = 9
    assert r.decide(3, 8) == 9
    r.took = [(103.0, 100.0)] * 3  # 3% slower: 8 still fits in the budget itself (1000 s), so no change
    assert r.decide(3, 8) == 8
    r.took = [(150.0, 100.0)] * 3  # 1.5x: 600 - 75 s of evaluation hold 3 more epochs of 150 s
    assert r.decide(3, 8) == 6
    r.took = [(500.0, 100.0)] * 3  # 5x: none fit; the current epoch is the last
    assert r.decide(3, 8) == 4
    least = _replanner(elapsed, min_epochs=5)  # an unfreezing strategy's least
    least.took = r.took
    assert least.decide(3, 8) == 5
    # The pace is of the last epochs: an early slow one no longer counts once three more have run.
    r.took = [(300.0, 100.0)] + [(80.0, 100.0)] * 3
    assert r.pace() == pytest.approx(0.8)
    # One-batch epochs: as many of the last as were planned at 10 s.
    r.took = [(1.0, 1.0)] * 20 + [(0.5, 1.0)] * 10
    assert r.pace() == pytest.approx(0.5)


def test_the_epoch_boundary_sets_max_epochs_and_stretches_the_schedule() -> None:
    f = lr_lambda("cosine", total_steps=80, warmup_steps=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [f])
    trainer = SimpleNamespace(
        fit_loop=SimpleNamespace(max_epochs=8), strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
        lr_scheduler_configs=[SimpleNamespace(interval="step", scheduler=sched)])
    now, elapsed = [0.0], [100.0]
    r = _replanner(elapsed)
    r.clock = lambda: now[0]
    for epoch in range(4):
        r.on_epoch_start(trainer, epoch)
        assert trainer.fit_loop.max_epochs == 8  # on plan: nothing changes
        for _ in range(10):
            opt.step()
            sched.step()
        now[0] += 100.0
        elapsed[0] += 100.0
    fresh, then = _replanner([200.0]), [0.0]
    fresh.clock = lambda: then[0]
    for epoch_, seconds in enumerate([50.0, 50.0]):  # fast, but only two epochs yet: no pace to go on
        fresh.on_epoch_start(trainer, epoch_)
        then[0] += seconds
    fresh.on_epoch_start(trainer, 2)
    assert trainer.fit_loop.max_epochs == 8 and not fresh.changes
    for _ in range(3):  # three epochs at 0.5x
        r.on_epoch_start(trainer, epoch + 1)
        epoch += 1
        for _ in range(10):
            opt.step()
            sched.step()
        now[0] += 50.0
        elapsed[0] += 50.0
    assert trainer.fit_loop.max_epochs > 8
    new = trainer.fit_loop.max_epochs
    assert r.changes[0]["epoch"] == 5 and r.changes[-1]["epochs"] == new  # from the first epoch the pace moved
    steps = new * 10
    while sched.last_epoch < steps:
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # the cosine ends with the new last epoch
    # Another schedule than a per-step LambdaLR is not stretched, so its run keeps the plan.
    other = SimpleNamespace(fit_loop=SimpleNamespace(max_epochs=8), strategy=trainer.strategy,
                            lr_scheduler_configs=[SimpleNamespace(interval="epoch", scheduler=sched)])
    r.on_epoch_start(other, epoch + 1)
    assert other.fit_loop.max_epochs == 8


@pytest.mark.parametrize("batch_s,budget,longer", [(0.5, "20s", True), (0.0005, "8s", False)])
def test_a_run_whose_steps_differ_from_the_plan_replans_and_ends_its_schedule(
    make_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_s: float, budget: str,
    longer: bool,
) -> None:
    """Steps timed at 0.5 s a batch, far slower than this tiny model's even on a loaded machine: the run trains more
    epochs than planned. Timed at 0.5 ms, far faster: fewer. Either way the cosine ends at the last step
    and the net never fires."""
    import finetune.callbacks.budget_planner as bp
    from finetune.config import compose
    from finetune.train import train

    fake = _fake_timings(batch_s)

    def measure(*args):  # noqa: ANN002, ANN202
        t = fake(*args)
        t.eval_batch_s = t.checkpoint_s = min(batch_s, 0.01)  # the plan's time is in its training steps
        return t

    monkeypatch.setattr(bp, "measure", measure)
    root = make_folder(classes=2, per_class=8)
    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
                   "data.image_size=32", "data.batch_size=4", "data.val_fraction=0.25", "data.num_workers=0",
                   "trainer.enable_progress_bar=false", "calibrate=false", f"budget={budget}"])
    metrics = train(cfg, tmp_path / "run")
    budget = metrics["budget"]
    assert budget["replanned"], json.dumps(budget)
    final = budget["replanned"][-1]["epochs"]
    assert (final > budget["epochs"]) if longer else (final < budget["epochs"])
    assert budget["epochs_trained"] == final and not budget["stopped_by_timer"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    lrs = [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]]
    assert max(lrs) < 1e-3 * cfg.optim.lr and math.isfinite(sum(lrs))
