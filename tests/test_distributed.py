"""Multi-process launches without starting any: rank from the environment, run directories, sweeps, data order."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.data.samplers import EpochSampler
from finetune.distributed import is_launch_rank_zero, shard_order
from finetune.rundir import claim_run_dir

TINY = ["backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32", "data.num_workers=0",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("env, zero", [
    ({}, True),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),
    ({"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "2"}, False),  # torchrun, second node
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, False),  # a child of Lightning's strategy=ddp
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # Lightning's ddp on the second node: local rank 0 is not rank 0
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, False),
])
def test_rank_zero_from_the_launchers_variables(monkeypatch: pytest.MonkeyPatch, env: dict, zero: bool) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert is_launch_rank_zero() is zero


def test_other_ranks_neither_create_nor_lock_the_run_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")  # rank 0 would refuse this (a finished run)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with claim_run_dir(tmp_path / "new"):
        pass
    with claim_run_dir(tmp_path / "done"):
        pass
    assert not (tmp_path / "new").exists() and not (tmp_path / "done" / ".lock").exists()


def test_torchrun_without_a_run_dir_is_refused_before_any_directory(cli, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli([*TINY], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: this process is one of 2 (torchrun/srun)")
    assert "hydra.run.dir" in r.stderr and not (tmp_path / "outputs").exists()


def test_multirun_under_torchrun_is_refused(cli, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli(["-m", *TINY, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert r.stderr.count("error: --multirun under torchrun/srun") == 2  # each run refused, none trained
    assert not (tmp_path / "sweep" / "0" / "epochs.csv").exists()


def test_ddp_that_reruns_the_command_is_refused_in_a_sweep(cli, tmp_path: Path) -> None:
    # Lightning would start the second process with this argv: a second sweep, out of step with this one.
    r = cli(["-m", *TINY, "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert "use trainer.strategy=ddp_spawn in sweeps" in r.stderr
    assert '"status": "failed"' in (tmp_path / "sweep" / "0" / "metrics.json").read_text()


@pytest.mark.parametrize("n, world, batch", [(24, 2, 4), (10, 3, 2)])
def test_ranks_share_each_global_batch_of_the_one_process_order(n: int, world: int, batch: int) -> None:
    one = list(EpochSampler(n, seed=7, epoch=1))
    shards = []
    for rank in range(world):
        s = shard_order(EpochSampler(n, seed=7), SimpleNamespace(world_size=world, global_rank=rank))
        s.set_epoch(1)  # Lightning's call each epoch reaches the wrapped sampler
        shards.append(list(s))
    steps = -(-len(shards[0]) // batch)
    for k in range(steps):
        together = sorted(i for shard in shards for i in shard[k * batch:(k + 1) * batch])
        padded = (one + one)[k * batch * world:(k + 1) * batch * world]  # the last step repeats the first items
        assert together == sorted(padded)
    assert set().union(*map(set, shards)) == set(range(n))  # every image every epoch


def test_one_process_keeps_its_sampler() -> None:
    s = EpochSampler(8, seed=0)
    assert shard_order(s, SimpleNamespace(world_size=1, global_rank=0)) is s and shard_order(s, None) is s
