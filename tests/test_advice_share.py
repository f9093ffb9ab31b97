"""+recipe=auto under torchrun/srun: rank 0 measures and writes advice.json, the other ranks follow it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import finetune.advise as advise_module
from finetune.advice_share import share_advice
from finetune.advise import follow_advice
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.rundir import claim_run_dir

_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")
ME = f"{os.getpid()} {socket.gethostname()}"


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)


def _as_rank_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


def _rank_zero_wrote(run: Path, content: dict, writer: str = ME, holder: str = ME) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(holder + "\n")
    (run / "advice.json").write_text(json.dumps({**content, "written_by": writer}))


def _never(*_a, **_k):
    pytest.fail("a rank other than 0 measured")


def test_rank_one_follows_rank_zeros_advice_without_measuring(monkeypatch, tmp_path: Path) -> None:
    _as_rank_one(monkeypatch)
    monkeypatch.setattr(advise_module, "advise_or_fallback", _never)
    # A recipe and backbone this data would not get from a measurement: rank 1 can only have read them.
    _rank_zero_wrote(tmp_path, {"recipe": "large_similar", "reason": "rank 0 said so",
                                "backbones": {"chosen": "test_efficientnet", "reason": "rank 0's ranking"}})
    cfg, extra, features = follow_advice(compose(["+recipe=auto", "backbone.name=test_resnet"]),
                                         ["+recipe=auto", "backbone.name=test_resnet"], tmp_path)
    assert cfg.recipe == "large_similar" and cfg.backbone.name == "test_efficientnet"
    assert extra["advised_recipe"] == "large_similar" and extra["advised_backbone"] == "test_efficientnet"
    assert features == []


@pytest.mark.parametrize("writer, holder", [
    ("1 some-host-of-an-earlier-run", ME),  # an earlier run's file in a directory this run now holds
    (ME, ""),  # rank 0 has not taken the lock yet
    (f"999999999 {socket.gethostname()}", f"999999999 {socket.gethostname()}"),  # both left by a dead process
], ids=["earlier-run", "lock-not-taken", "dead-process"])  # fixed ids: pytest-xdist's workers must collect the same
def test_an_earlier_runs_advice_is_not_followed(monkeypatch, tmp_path: Path, writer: str, holder: str) -> None:
    _as_rank_one(monkeypatch)
    _rank_zero_wrote(tmp_path, {"recipe": "large_similar"}, writer=writer, holder=holder)
    with pytest.raises(FineTuneError, match=r"waited 0.2 s for rank 0's advice .*filesystem every node shares"):
        share_advice(tmp_path, _never, timeout_s=0.2, poll_s=0.05)


def test_rank_zeros_failure_stops_the_others_with_its_reason(tmp_path: Path, monkeypatch) -> None:
    def fails() -> dict:
        raise FineTuneError("the training split has 1 class(es) with images; need 2")

    with claim_run_dir(tmp_path / "run"), pytest.raises(FineTuneError, match="need 2"):
        share_advice(tmp_path / "run", fails, timeout_s=5)  # rank 0: raises, and leaves the reason
    # Rank 1 reads it while rank 0 still holds the directory (as it does until its process exits).
    (tmp_path / "run" / ".lock").write_text(ME + "\n")
    _as_rank_one(monkeypatch)
    start = time.monotonic()
    with pytest.raises(FineTuneError, match=r"^rank 0 could not measure the advice: the training split has 1 class"):
        share_advice(tmp_path / "run", _never, timeout_s=60)
    assert time.monotonic() - start < 5  # not after the timeout


_RANK_ONE = """
import json, sys
from finetune.advice_share import share_advice
def measure():
    raise SystemExit("rank 1 measured")
print(json.dumps(share_advice(sys.argv[1], measure, timeout_s=120, poll_s=0.1)))
"""


def test_two_processes_rank_one_waits_for_rank_zero(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in _VARS}
    rank_one = subprocess.Popen([sys.executable, "-c", _RANK_ONE, str(run)], env={**env, "RANK": "1", "WORLD_SIZE": "2"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # rank 1 starts first and waits
    with claim_run_dir(run):
        assert share_advice(run, lambda: {"recipe": "small_similar", "reason": "r0"}, timeout_s=1) == {
            "recipe": "small_similar", "reason": "r0"}
        out, err = rank_one.communicate(timeout=120)
    assert rank_one.returncode == 0, err[-2000:]
    assert json.loads(out) == {"recipe": "small_similar", "reason": "r0"}
