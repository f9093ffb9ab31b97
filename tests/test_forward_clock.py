"""ForwardClock: per-call timing, the first call left out, images over seconds of the rest."""

import pytest
import torch
from torch import nn

from finetune.forward_clock import ForwardClock


class _Ticks:
    """A clock that advances by the given step at each read, so each call's seconds are set by the test."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.reads = 0.0, list(durations), 0

    def __call__(self) -> float:
        # reads alternate: start of a call (no advance), end of a call (advance by that call's duration)
        if self.reads % 2:
            self.now += self.durations[self.reads // 2]
        self.reads += 1
        return self.now


def test_first_call_does_not_set_the_rate():
    model = nn.Linear(4, 2)
    # 64 images each: a slow first call (one-time costs), then three steady ones
    ticks = _Ticks([2.0, 0.5, 0.4, 0.45])
    with ForwardClock(model, clock=ticks) as clock:
        for _ in range(4):
            model(torch.zeros(64, 4))
    assert [n for n, _ in clock.calls] == [64, 64, 64, 64]
    assert clock.seconds == pytest.approx(3.35)
    assert clock.images_per_s == pytest.approx(3 * 64 / 1.35)
    model(torch.zeros(8, 4))  # the hooks are gone after the context
    assert len(clock.calls) == 4


def test_partial_batch_counts_its_images_and_one_call_counts():
    model = nn.Linear(4, 2)
    ticks = _Ticks([1.0, 0.5, 0.1])
    with ForwardClock(model, clock=ticks) as clock:
        for n in (64, 64, 10):
            model(torch.zeros(n, 4))
    assert clock.images == 138
    assert clock.images_per_s == pytest.approx(74 / 0.6)
    single = ForwardClock(model, clock=_Ticks([0.25]))
    with single:
        model(torch.zeros(32, 4))
    assert single.images_per_s == pytest.approx(128)  # with one call only, that call counts


def test_no_call_is_an_error():
    with ForwardClock(nn.Linear(4, 2)) as clock:
        pass
    with pytest.raises(ValueError, match="no forward call"):
        clock.images_per_s
