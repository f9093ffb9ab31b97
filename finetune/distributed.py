"""Runs started as several processes (torchrun, srun, Lightning's DDP): who writes, where, and what a sweep may start.

Lightning finds its place in a multi-process launch from the environment (``RANK`` and ``WORLD_SIZE``
from torchrun, ``SLURM_PROCID`` and ``SLURM_NTASKS`` from srun, ``LOCAL_RANK`` and ``NODE_RANK`` in the
children of its own ``strategy=ddp``), but only once ``trainer.fit`` sets up the process group. Before
that, each process is a Hydra app of its own that claims a run directory, writes its config and the
advice: only global rank 0 may do that, so the rank is read here from the same variables.

Each process also resolves its own ``hydra.run.dir``: the default holds the start time, which differs
between processes (microseconds, and seconds between nodes), so a multi-process launch must name the
directory (``hydra.run.dir=outputs/$SLURM_JOB_ID``). The children of Lightning's ``strategy=ddp`` are
given the parent's directory by Lightning itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Sampler

from finetune.errors import FineTuneError

__all__ = [
    "check_default_run_dir", "check_launch", "check_script_launcher", "gather_strided", "is_launch_rank_zero",
    "launched_processes", "process_group_rank", "shard_order",
]

# Every variable a launcher sets to place a process; global rank 0 is the process where each one present is 0.
_RANK_VARS = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "JSM_NAMESPACE_RANK")


def _env_int(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 of its launch (the only process when nothing launched several)."""
    return all(_env_int(name) == 0 for name in _RANK_VARS)


def launched_processes() -> int:
    """How many processes the launcher started for this run (torchrun's WORLD_SIZE, srun's SLURM_NTASKS); 1: none."""
    # torchrun sets RANK with WORLD_SIZE; Lightning's own launcher sets WORLD_SIZE without RANK (in its parent too,
    # which resolves hydra.run.dir again to hand it to its children).
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return max(1, _env_int("WORLD_SIZE", 1))
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:  # a task of srun, not the batch script
        return max(1, _env_int("SLURM_NTASKS", 1))
    return 1


def check_default_run_dir(run_dir: str) -> str:
    """``run_dir``, the timestamped default; refused in a multi-process launch: every process would pick its own."""
    if launched_processes() > 1:
        raise FineTuneError(
            f"this process is one of {launched_processes()} (torchrun/srun): each would make its own timestamped "
            "run directory; give the same hydra.run.dir=DIR to every process, e.g. hydra.run.dir=outputs/$SLURM_JOB_ID"
        )
    return run_dir


def check_launch(in_sweep: bool) -> None:
    """Refuse a Hydra sweep (--multirun) inside a multi-process launch: every process would run the whole sweep."""
    if in_sweep and launched_processes() > 1:
        raise FineTuneError("--multirun under torchrun/srun runs the whole sweep in every process; launch one run "
                            "per torchrun/srun, or sweep with hydra/launcher=submitit_slurm (docs/distributed.md)")


def check_script_launcher(trainer: Any) -> None:
    """Refuse Lightning's script launcher (``strategy=ddp`` with several devices) inside a Hydra sweep.

    Lightning starts each DDP child by running the script again with the parent's argv: within
    ``--multirun`` every child would run the whole sweep again (into sweep directories of its own),
    joining the parent's runs out of step. ``ddp_spawn`` starts its children without the argv.
    """
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    # Under torchrun/srun (or in Lightning's own children) the strategy has no launcher: it starts nothing.
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.num_processes < 2 or not _in_hydra_sweep():
        return
    raise FineTuneError(f"trainer.strategy ({type(trainer.strategy).__name__}, {launcher.num_processes} devices) starts "
                        "its processes by re-running the command, which in a --multirun sweep reruns the sweep in "
                        "each; use trainer.strategy=ddp_spawn in sweeps")


def _in_hydra_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def shard_order(sampler: Sampler[int], trainer: Any) -> Sampler[int]:
    """Under DDP, this rank's share of ``sampler``'s order: its positions ``rank, rank + world, ...``.

    Lightning would wrap ``sampler`` itself, but shuffles its order again with a seed of its own, so
    the global batch ``k`` (every rank's batch ``k``) would hold other images than batch ``k`` of a
    one-process run with the same global batch size. Strided, the two runs see the same images in
    the same steps, and a seed gives the same order whatever the number of processes.
    """
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    connector = getattr(trainer, "_accelerator_connector", None)
    if world < 2 or not getattr(connector, "use_distributed_sampler", True):
        return sampler
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    # A DistributedSampler already: Lightning leaves it as it is. Not divisible: the first items pad the last batch.
    return DistributedSamplerWrapper(sampler, num_replicas=world, rank=trainer.global_rank, shuffle=False)


def process_group_rank() -> tuple[int, int]:
    """``(rank, world size)`` in torch.distributed's default group; ``(0, 1)`` where none is set up.

    Read from the group, not the trainer: after ``ddp_spawn`` the main process's trainer still says
    2 devices, but it has no group to gather with.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_strided(rows: torch.Tensor, n: int, device: torch.device | str = "cpu", chunk: int = 8192) -> torch.Tensor:
    """Every rank's ``rows`` (rank ``r`` holds items ``r, r + world, ...`` of ``n``) as one ``(n, ...)`` CPU table.

    Gathered ``chunk`` rows per rank at a time, on ``device`` (NCCL gathers CUDA tensors only), so the
    device holds ``world x chunk`` rows, not the table. Shards differ by at most one row: the shorter
    are padded, and the padding dropped.
    """
    import torch.distributed as dist

    rank, world = process_group_rank()
    if world == 1:
        return rows
    m = -(-n // world)  # the longest shard
    padded = rows.new_zeros((m, *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = []
    for start in range(0, m, chunk):
        mine = padded[start:start + chunk].to(device)
        out = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(out, mine)
        parts.append(torch.stack([o.cpu() for o in out], dim=1))  # (rows, world, ...): row j of rank r is item j*world+r
    return torch.cat(parts).flatten(0, 1)[:n]
