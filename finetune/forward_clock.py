"""How fast a model passes images forward: its forward calls alone, the first call left out.

The advice's sample pass is the only timing the backbone ranking and the short-budget estimate have.
Timed whole, it charged the first model of the process with one-time costs (kernel selection, memory
growth: its first batch of 64 at 32 px took 1.2x the others) and every candidate with data loading,
a cost they share and training overlaps with its loader workers. So only the forward calls are timed
(hooks, nothing in the model changes), and the first call is left out where there are others.

Measured on a host with another process in random bursts on the same core
(``benchmarks/forward_clock.py --busy``, 10 fresh processes each): the spread of a candidate's
images/s across runs was 8-12% (coefficient of variation), where timing the whole pass gave 9-11%;
the fastest batch per image instead of the mean spread 11-16%. Lite0 measured fastest in every run with either timing.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["ForwardClock"]


class ForwardClock:
    """Times every forward call of ``model`` while the context is open.

    Example::

        with ForwardClock(model) as clock:
            for x in batches:
                model(x)
        clock.images_per_s

    Args:
        model: the module whose calls are timed (its first positional input's first dimension is the batch).
        clock: seconds now; injectable for tests.
    """

    def __init__(self, model: nn.Module, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self.clock = clock
        self.calls: list[tuple[int, float]] = []  # (images, seconds) per forward call
        self._handles: list[Any] = []
        self._started: tuple[int, float] | None = None

    def _before(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        self._started = (len(x) if isinstance(x, torch.Tensor) else 0, self.clock())

    def _after(self, _module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        if self._started is not None:
            images, start = self._started
            self.calls.append((images, self.clock() - start))
            self._started = None

    def __enter__(self) -> ForwardClock:
        self._handles = [self.model.register_forward_pre_hook(self._before),
                         self.model.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def images(self) -> int:
        return sum(n for n, _ in self.calls)

    @property
    def seconds(self) -> float:
        """Time inside the forward calls, all of them."""
        return sum(s for _, s in self.calls)

    @property
    def images_per_s(self) -> float:
        """Images per second inside the forward calls, the first call left out when there are others.

        Raises:
            ValueError: no call with images was timed.
        """
        calls = [(n, s) for n, s in self.calls if n > 0]
        if not calls:
            raise ValueError("ForwardClock timed no forward call with images")
        steady = calls[1:] or calls
        return sum(n for n, _ in steady) / max(sum(s for _, s in steady), 1e-9)
