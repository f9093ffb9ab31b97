"""Hydra launcher plugins (the ``cluster`` extra): a sweep's runs in parallel processes or as submitit jobs.

Each sweep's comparison report (written by finetune.compare.CompareCallback in the process that ran
the sweep) must hold the same rows as the sequential sweep's, timings aside.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow  # three sweeps of two runs, each in fresh interpreters: ~3 min on a shared 2-core CPU

SWEEP = ["-m", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32", "data.num_workers=0",
         "+trainer.limit_train_batches=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "freeze=none,head_only"]
# Measured per process and machine load: not part of what must agree.
_TIMED = ("train_time_s", "train_images_per_s", "peak_memory_mb")


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "comparison.csv").open(newline="") as f:
        rows = [{k: v for k, v in row.items() if k not in _TIMED} for row in csv.DictReader(f)]
    return sorted(rows, key=lambda r: str(sorted(r.items())))


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("seq")
    r = run_cli([*SWEEP, f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "sweep"


@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
])
def test_launched_sweep_reports_what_the_sequential_one_does(
    sequential: Path, tmp_path: Path, launcher: list[str]
) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    par = tmp_path / "par"
    r = run_cli([*SWEEP, *launcher, f"hydra.sweep.dir={par}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(par)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    assert rows == _rows(sequential)
