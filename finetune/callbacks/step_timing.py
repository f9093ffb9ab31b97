"""What the budget planner measures before it plans: training steps, evaluation batches, a checkpoint write.

Timed on the run's own module, data and device, which are put back as they were afterwards
(weights, BatchNorm statistics, trainable set, train mode and every RNG), so the run trains as it
would have without the measurement.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.seed import isolate_rng

__all__ = ["Timings", "measure"]


class Timings:
    """Seconds measured on the run's own module, data and device."""

    def __init__(self) -> None:
        self.batch_s: dict[int, float] = {}  # epoch whose trainable set was timed -> seconds per training batch
        self.train_startup_s = 0.0
        self.eval_batch_s = 0.0
        self.eval_startup_s = 0.0
        self.checkpoint_s = 0.0
        self.seconds = 0.0  # the measuring itself


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(loader: Iterable[Any], n: int) -> Iterable[tuple[Any, float, bool]]:
    """``n`` batches (the loader restarted as often as needed), each with its fetch time and whether it restarted."""
    it, restarted = iter(loader), False
    for _ in range(n):
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it, restarted = iter(loader), True
            t = time.perf_counter()
            batch = next(it)
        yield batch, time.perf_counter() - t, restarted
        restarted = False


def _time_training(trainer: pl.Trainer, module: Any, loader: Iterable[Any], warmup: int, timed: int) -> tuple[float, float]:
    """Seconds per training batch (data wait included) after ``warmup`` steps, and the loader's start-up seconds."""
    from hydra.utils import instantiate

    device = trainer.strategy.root_device
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = instantiate(dict(module.hparams.optimizer), _convert_="all")(params, lr=0.0)
    module.train()
    fetch: list[float] = []
    compute: list[float] = []
    first = 0.0
    for i, (batch, fetched, restarted) in enumerate(_batches(loader, warmup + timed)):
        t = time.perf_counter()
        x, y = batch[0].to(device), batch[1].to(device)
        with trainer.precision_plugin.forward_context():
            loss = module.criterion(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i == 0:
            first = fetched
        if i >= warmup:
            compute.append(time.perf_counter() - t)
            if not restarted:
                fetch.append(fetched)
    optimizer.zero_grad(set_to_none=True)
    wait = sum(fetch) / len(fetch) if fetch else 0.0
    return sum(compute) / len(compute) + wait, max(0.0, first - wait)


@torch.no_grad()
def _time_eval(trainer: pl.Trainer, module: Any, loader: Iterable[Any], timed: int) -> tuple[float, float]:
    device = trainer.strategy.root_device
    module.eval()
    times: list[float] = []
    first = 0.0
    for i, (batch, fetched, _) in enumerate(_batches(loader, 1 + timed)):
        t = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            module(batch[0].to(device))
        _sync(device)
        if i == 0:
            first = fetched
        else:
            times.append(fetched + time.perf_counter() - t)
    per = sum(times) / len(times) if times else 0.0
    return per, max(0.0, first - per)


def measure(trainer: pl.Trainer, module: Any, epochs_to_time: Iterable[int], warmup: int = 2, timed: int = 5) -> Timings:
    """Time training steps (for each trainable set in ``epochs_to_time``), evaluation batches and a checkpoint.

    The module is left as it was: weights and buffers (BatchNorm statistics), trainable set, train mode and
    every RNG (so the run trains as it would have without the measurement).
    """
    start = time.perf_counter()
    dm = trainer.datamodule
    out = Timings()
    module.to(trainer.strategy.root_device)  # Lightning moves it only after setup; a GPU run is timed on the GPU
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        with isolate_rng():
            train_loader = dm.train_dataloader()
            for epoch in epochs_to_time:
                module.apply_freeze(epoch)
                out.batch_s[epoch], startup = _time_training(trainer, module, train_loader, warmup, timed)
                out.train_startup_s = max(out.train_startup_s, startup)
            out.eval_batch_s, out.eval_startup_s = _time_eval(trainer, module, dm.val_dataloader(), timed)
            # A real file beside the run's checkpoints (a BytesIO misses the disk: digits head_only, 0.09 s vs ~1 s).
            path = Path(trainer.default_root_dir) / "budget-probe.pt"
            t = time.perf_counter()
            try:
                torch.save({"state_dict": module.state_dict()}, path)
            finally:
                path.unlink(missing_ok=True)
            out.checkpoint_s = time.perf_counter() - t
    finally:
        module.load_state_dict(saved)
        module.apply_freeze(0)
        module.train()
    out.seconds = time.perf_counter() - start
    return out
