"""Training and evaluation rates timed on a copy of the model (finetune/step_rates.py)."""

from __future__ import annotations

import torch
from torch import nn

from finetune.step_rates import StepRates, measure_step_rates

NOW = [0.0]  # the fake clock: a training call takes 3 s, an evaluation call 1 s


class _Timed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        NOW[0] += 3.0 if self.training else 1.0
        return self.bn(self.conv(x)).mean((2, 3))


def test_each_rate_is_timed_in_its_own_mode_with_the_first_call_left_out() -> None:
    model = _Timed().eval()
    rates = measure_step_rates(model, torch.randn(8, 3, 8, 8), repeats=2, clock=lambda: NOW[0])
    # 16 images each: training in 2 x 3 s, evaluation in 2 x 1 s (with the first call counted: 9 s and 3 s).
    assert rates == StepRates(train=16 / 6, eval=16 / 2)
    assert rates.scaled(0.5) == StepRates(train=16 / 12, eval=16 / 4)
    assert rates.to_dict() == {"train": 2.7, "eval": 8.0}


def test_the_model_is_left_as_it_was() -> None:
    model = _Timed().eval()
    model.conv.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_step_rates(model, torch.randn(8, 3, 8, 8) * 5 + 2)  # train-mode BatchNorm would move running stats
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not model.conv.weight.requires_grad and model.bn.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_the_timing_batch_is_the_runs_batch_within_8_images_at_224_px_of_pixels() -> None:
    from finetune.step_rates import timing_batch_size

    assert timing_batch_size(32, 224, 224, 64) == 8  # a step on 8 images at 224 px, as before
    assert timing_batch_size(128, 32, 32, 64) == 64  # small images: as many as the sample batch holds
    assert timing_batch_size(16, 32, 32, 64) == 16  # never more than the run's batch
    assert timing_batch_size(128, 64, 64, 64) == 64 and timing_batch_size(128, 112, 112, 64) == 32
    assert timing_batch_size(128, 512, 512, 64) == 8  # 8 images at least: one is not a batch
    assert timing_batch_size(128, 32, 32, 5) == 5  # a sample of 5 images gives 5
