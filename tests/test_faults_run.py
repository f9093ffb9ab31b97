"""Faults around a run: kill -9 then resume, Ctrl-C, two runs in one directory, reused directories, unknown keys."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import run_cli

# A tiny model on digits at 16 px: an epoch is a second or two.
TINY = ["backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=16", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]
TESTS = str(Path(__file__).parent)


class KillAt(pl.Callback):
    """kill -9 this very process at batch ``FINETUNE_KILL_AT=EPOCH:BATCH`` (unset: do nothing), mid-epoch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = os.environ.get("FINETUNE_KILL_AT")
        if at and (trainer.current_epoch, batch_idx) == tuple(int(v) for v in at.split(":")):
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAt(pl.Callback):
    """Ctrl-C (SIGINT to this process) at ``FINETUNE_INT_AT=EPOCH:BATCH``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = os.environ.get("FINETUNE_INT_AT")
        if at and (trainer.current_epoch, batch_idx) == tuple(int(v) for v in at.split(":")):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal arrives as KeyboardInterrupt here


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **env}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=full_env)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # lp_ft unfreezes the backbone at epoch 1, the epoch the kill interrupts: the schedule peers get wrong on resume.
    # (gradual passed the same test; its in-process resume is tested in test_freezing.py.)
    args = [*TINY, "freeze=lp_ft", "freeze.unfreeze_at_epoch=1", "trainer.max_epochs=3", "augment=medium", "+callbacks.kill._target_=test_faults_run.KillAt"]
    full = _cli([*args, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _cli([*args, f"hydra.run.dir={tmp_path / 'cut'}"], tmp_path, FINETUNE_KILL_AT="1:3")
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    resumed = _cli([f"resume={tmp_path / 'cut'}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert b["status"] == "ok" and b["epochs"] == a["epochs"] == 3
    for key in ("val_acc", "test_acc", "trainable_params", "trainable_params_first_epoch"):
        assert b[key] == a[key], key
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = list(csv.DictReader((tmp_path / "cut" / "epochs.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # the epochs before the kill are still reported


def test_ctrl_c_leaves_a_run_directory_that_says_interrupted_and_resumes(tmp_path: Path) -> None:
    args = [*TINY, "trainer.max_epochs=2", "+callbacks.stop._target_=test_faults_run.InterruptAt",
            f"hydra.run.dir={tmp_path / 'run'}"]
    r = _cli(args, tmp_path, FINETUNE_INT_AT="1:2")
    assert r.returncode != 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["epochs_completed"] == 1
    assert m["resume"] == f"python -m finetune resume={tmp_path / 'run'}"
    assert not (tmp_path / "run" / ".lock").exists()
    r = _cli([f"resume={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "ok"


def test_a_directory_held_by_a_live_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{holder.pid} {os.uname().nodename}\n")
        r = run_cli([*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}"], cwd=tmp_path)
        assert r.returncode == 2
        assert r.stderr.strip() == (f"error: run directory '{run}' is in use by a running process (pid {holder.pid}, "
                                    f"lock {run / '.lock'}); choose another hydra.run.dir")
        # Nothing of the refused run was written (Hydra's own log file aside, empty).
        assert {p.name for p in run.iterdir()} <= {".lock", "cli.log"} and not (run / "cli.log").read_text()
        assert (run / ".lock").read_text().split()[0] == str(holder.pid)  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and the next run takes the directory.
    r = run_cli([*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "metrics.json").exists() and not (run / ".lock").exists()


def test_two_runs_started_together_get_their_own_directories(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "finetune", *TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=2"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    runs = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 2 and all(json.loads((r / "metrics.json").read_text())["status"] == "ok" for r in runs)


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path: Path, cli) -> None:
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", f"hydra.run.dir={run}"]
    assert cli(args, cwd=tmp_path).returncode == 0
    before = (run / "metrics.json").read_text()
    r = cli(args, cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "overwrite=true" in r.stderr
    assert (run / "metrics.json").read_text() == before  # untouched
    r = cli([*args, "overwrite=true"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt


@pytest.mark.parametrize("args, message", [
    (["+ckpt_path=x.ckpt"], "unknown config key(s) ckpt_path: nothing reads them; to continue a run use resume=RUN_DIR"),
    (["+optim.momentum=0.9"], "unknown config key(s) optim.momentum: nothing reads them"),
])
def test_unknown_keys_are_refused_before_anything_runs(args: list[str], message: str) -> None:
    from finetune.builders import check_run_config
    from finetune.config import compose
    from finetune.errors import FineTuneError

    with pytest.raises(FineTuneError) as e:
        check_run_config(compose([*TINY, *args]))
    assert str(e.value) == message


def test_unknown_keys_and_bad_resumes_are_one_line_errors_on_the_command_line(tmp_path: Path, cli) -> None:
    r = cli([*TINY, "+ckpt_path=x.ckpt"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: unknown config key(s) ckpt_path: nothing reads them; to continue a run use resume=RUN_DIR"), r.stderr
    r = cli(["resume=/no/such/run"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: resume: run directory '/no/such/run' does not exist"
    assert not Path("/no/such/run").exists()  # checked before Hydra creates its run directory
