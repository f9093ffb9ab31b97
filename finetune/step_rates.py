"""How fast a model trains and evaluates, measured on one small batch before any training.

The short-budget estimate (finetune/short_budget.py) needs what an epoch costs before the run has
taken a step. It used to scale the advice's sample pass by a rule of thumb, a training image three
forward passes (the backward pass about two: Kaplan et al. 2020). On this project's CPU both parts of
that were off, in opposite directions (tf_efficientnet_lite0, one thread, batches of 16 to 128):

- The sample pass is slowed by its own BatchNorm statistics hooks (finetune/similarity.py): 155
  images/s at 64 px where a plain evaluation forward passes 402, 307 against 461 at 32 px.
- A training step (train-mode BatchNorm, autograd) cost 3.2-5.3 plain forward passes per image, not 3.

Together the estimate came out 1.5-1.8x short of the epochs the planner then fitted (digits and
Fashion-MNIST, docs/auto-budget.md). So both rates are timed here, on a copy of the model (its
weights and BatchNorm statistics stay as they are): a training step's forward and backward in
train mode, and an evaluation forward under ``torch.no_grad``. On a batch of the run's batch size
where that is cheap (:func:`timing_batch_size`): as many pixels as 8 images at 224 px, so 8 images at
224 px and up to 64 (the advice's sample batch) at 32-64 px. It used to be 8 images at every size, which
channels-last (finetune.memory_format) made misleading: EfficientNet-Lite0 at 32 px trains 96 images/s
in batches of 8 and 458 in batches of 128 (2 threads), and the full Fashion-MNIST estimate fell 3.7x
short of the epochs the planner fitted (7.5 against 28). The first call of each is left out
(one-time costs), as :class:`finetune.forward_clock.ForwardClock` does.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from finetune.budget import val_interval

__all__ = ["StepRates", "measure_step_rates", "timing_batch_size"]

# Pixels timed per step: 8 images at 224 px, a few seconds of training steps on a CPU.
TIMING_PIXELS = 8 * 224 * 224


@dataclass(frozen=True)
class StepRates:
    """Images per second of a training step (forward and backward) and of an evaluation forward."""

    train: float
    eval: float

    def scaled(self, factor: float) -> StepRates:
        """Both rates times ``factor``: another backbone's, from the ratio of the two models' forward speeds."""
        return StepRates(train=self.train * factor, eval=self.eval * factor)

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) for k, v in asdict(self).items()}

    def run_seconds(self, data: Any, epochs: float) -> float:
        """Seconds of ``epochs`` epochs of ``data`` (a :class:`~finetune.data.DataSplits`): its training images at
        the training rate, its validation images at the evaluation rate as often as a budgeted run validates
        (every epoch, or every few where that would crowd out training: :func:`finetune.budget.val_interval`),
        and its test images once."""
        n = {split: len(items) for split, items in data.splits.items()}
        train_s, val_s = n.get("train", 0) / self.train, n.get("val", 0) / self.eval
        return epochs * (train_s + val_s / val_interval(val_s, train_s)) + n.get("test", 0) / self.eval


def _output_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def timing_batch_size(run_batch: int, height: int, width: int, available: int) -> int:
    """Images to time a step on: the run's batch, at most :data:`TIMING_PIXELS` of pixels (8 images at least,
    where available) and at most ``available``."""
    affordable = max(8, TIMING_PIXELS // max(1, height * width))
    return max(1, min(int(run_batch), affordable, int(available)))


def measure_step_rates(
    model: nn.Module, batch: torch.Tensor, repeats: int = 2, clock: Callable[[], float] = time.perf_counter
) -> StepRates:
    """Time ``repeats`` training steps and evaluation forwards of a copy of ``model`` on ``batch``.

    Args:
        model: the backbone (every parameter trains in the copy: the cost of ``freeze=none``).
        batch: a few input images, as the run's loader gives them.
        repeats: timed calls of each, after one untimed call.
        clock: seconds now; injectable for tests.
    """
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.requires_grad_(True)

    def evaluate() -> None:
        net.eval()
        with torch.no_grad():
            net(batch)

    def train_step() -> None:
        net.train()
        # Any scalar of the output backpropagates through every layer as the loss would.
        _output_tensor(net(batch)).float().mean().backward()
        net.zero_grad(set_to_none=True)

    seconds = {"train": 0.0, "eval": 0.0}
    with torch.enable_grad():
        for call in range(repeats + 1):
            for name, fn in (("train", train_step), ("eval", evaluate)):
                start = clock()
                fn()
                if call:
                    seconds[name] += clock() - start
    images = len(batch) * repeats
    return StepRates(train=images / max(seconds["train"], 1e-9), eval=images / max(seconds["eval"], 1e-9))
