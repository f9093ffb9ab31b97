"""+recipe=tune: Hydra's Optuna sweeper over LR, backbone LR multiplier, freeze strategy, augmentation and mixup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from omegaconf import OmegaConf

from finetune.budget import run_budget_s
from finetune.compare import collect_runs
from finetune.config import compose

from conftest import run_cli

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the tune extra (hydra-optuna-sweeper)")

SEARCHED = {"optim.lr", "optim.backbone_lr_mult", "freeze", "augment", "augment.mixup"}


@pytest.mark.slow  # 89 s on the shared 2-core machine (two trials, each a process-free job, plus the sweep's start)
def test_two_trial_search_writes_the_report_naming_the_best_checkpoint(
    make_folder: Callable[..., Path], tmp_path: Path
) -> None:
    root = make_folder(classes=2, per_class=10)
    sweep = tmp_path / "sweep"
    r = run_cli(["+recipe=tune", "tune.n_trials=2", "backbone.name=test_resnet", "backbone.pretrained=false",
                 "data=folder", f"data.root={root}", "data.image_size=32", "data.batch_size=4", "trainer.max_epochs=1",
                 "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = collect_runs(sweep)
    assert [run.name for run in runs] == ["0", "1"]
    for run in runs:
        assert set(run.overrides) >= SEARCHED  # each trial got its own draw of every searched knob
        assert run.metrics["status"] == "ok" and run.metrics["recipe"] == "tune"
    assert runs[0].overrides["optim.lr"] != runs[1].overrides["optim.lr"]
    best = max(runs, key=lambda run: run.metrics["val_acc"])
    md = (sweep / "comparison.md").read_text()
    assert f"Best val accuracy: run {best.name} " in md and f"`{best.name}/checkpoints/last.ckpt`" in md
    assert (sweep / best.name / "checkpoints" / "last.ckpt").is_file()
    # Optuna's own answer agrees on the best value.
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(best.metrics["val_acc"])
    assert (sweep / "comparison.csv").is_file() and json.loads((sweep / "0" / "metrics.json").read_text())


def test_each_trial_gets_its_share_of_the_budget() -> None:
    cfg = compose(["+recipe=tune", "budget=10m", "tune.n_trials=4"])
    assert run_budget_s(cfg) == 150
    assert run_budget_s(compose(["budget=10m"])) == 600  # any other run has the whole budget
