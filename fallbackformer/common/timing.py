"""Wall time of a job's steps (train, distill, calibrate, evaluate, a benchmark section...).

One :class:`Stopwatch` per job: :meth:`Stopwatch.step` times a ``with`` block into ``seconds``
under its name, :meth:`Stopwatch.elapsed` is the time since the watch started. (The median time of
a module over repeated calls, what latency profiles and benchmarks need, is
:func:`fallbackformer.runtime.clock.median_ms`.)

>>> watch = Stopwatch()
>>> with watch.step("load"):
...     pass
>>> list(watch.seconds), watch.seconds["load"] >= 0.0
(['load'], True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Stopwatch"]


class Stopwatch:
    """Seconds per named step of a job (``time.perf_counter``), and since the start."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        #: seconds per step, in the order the steps ended
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the ``with`` block into ``seconds[name]`` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0

    def elapsed(self) -> float:
        """Seconds since the watch was made."""
        return time.perf_counter() - self.started
