"""How fast a model passes images forward, measured so that one noisy moment does not decide it.

The advice's sample pass is the only timing the backbone ranking and the short-budget estimate have.
Timed whole, it charged the first model of the process with one-time costs (kernel selection, memory
growth) and every candidate with data loading and whatever else the host ran at that moment: on a
loaded host one run measured Lite1 faster than Lite0 and chose it as "the fastest". So each forward
call is timed on its own (hooks, nothing in the model changes), the first call is left out where
there are others, and the rate is that of the fastest batch per image, as ``timeit`` advises for the
same reason: slower repeats measure interference, not the code.
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
        self._handles = [self.model.register_forward_pre_hook(self._before), self.model.register_forward_hook(self._after)]
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
        """Images per second of the fastest call per image, the first call left out when there are others.

        Raises:
            ValueError: no call with images was timed.
        """
        calls = [(n, s) for n, s in self.calls if n > 0]
        if not calls:
            raise ValueError("ForwardClock timed no forward call with images")
        steady = calls[1:] or calls
        return max(n / max(s, 1e-9) for n, s in steady)
