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
