"""Clocks and stage timers: every deadline in the runtime reads time through one of these.

Three pieces:

* :class:`Clock` (protocol): anything with ``now_ns() -> int`` (monotonic nanoseconds). The runtime
  also uses three optional methods when a clock has them: ``sleep(ms)``, ``wait_until(event,
  deadline_ns) -> bool`` and ``worker_busy(thread_id)`` / ``worker_idle(thread_id)``. The module
  functions :func:`sleep` and :func:`wait_until` fall back to real time for clocks without them.
* :class:`MonotonicClock` (``time.perf_counter_ns``) for serving, and :class:`FakeClock` for
  deterministic tests of deadlines, hedging and breakers. :class:`ScriptedDelay` wraps a module (a
  stage, a student) so that each call takes a scripted time on whichever clock it is given, or raises,
  or hangs.
* :class:`CudaStageTimer`: CUDA events recorded on a stage's stream and polled with
  ``event.query()``, so timing a GPU stage never synchronises the device in the hot path.

How a :class:`FakeClock` keeps concurrent tests deterministic (discrete-event time):

* A thread that is not registered as a worker *drives* time: its ``sleep(ms)`` advances the clock.
* A worker thread (a hedging worker; the hedger calls ``worker_busy``/``worker_idle``) is passive:
  its ``sleep(ms)`` blocks until someone else has moved the clock past its wake-up time.
* Before and after a driver moves the clock it waits (in real time, bounded by ``settle_timeout_s``)
  until every busy worker is asleep or idle, and it moves from one sleeping worker's wake-up to the
  next on the way, so what a worker did "by" a fake instant is fixed, not a race. ``wait_until(event, deadline_ns)`` jumps the clock from wake-up to wake-up of the
  sleeping workers and returns ``True`` as soon as the event is set, or ``False`` at the deadline.

>>> clock = FakeClock()
>>> clock.advance(2.5)
>>> clock.now_ns()
2500000
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

NS_PER_MS = 1_000_000

__all__ = [
    "Clock",
    "MonotonicClock",
    "FakeClock",
    "ScriptedDelay",
    "HANG",
    "CudaStageTimer",
    "StageTiming",
    "cuda_timing_available",
    "sleep",
    "wait_until",
    "ms_since",
]


@runtime_checkable
class Clock(Protocol):
    """A monotonic time source in nanoseconds."""

    def now_ns(self) -> int:
        """Return monotonic time in nanoseconds (only differences are meaningful)."""
        ...


def ms_since(clock: Clock, start_ns: int) -> float:
    """Milliseconds elapsed on ``clock`` since ``start_ns``."""
    return (clock.now_ns() - start_ns) / NS_PER_MS


def median_ms(fn: Callable[[], Any], repeats: int, discard: int = 0) -> float:
    """Median real wall time (ms) of ``fn()`` over ``repeats`` calls, after ``discard`` untimed ones."""
    for _ in range(discard):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / NS_PER_MS)
    return statistics.median(samples)


def _ms_to_ns(ms: float) -> int:
    if math.isnan(ms) or ms < 0:
        raise ValueError(f"a duration must be a number >= 0 ms; got {ms!r}")
    return math.inf if math.isinf(ms) else round(ms * NS_PER_MS)  # type: ignore[return-value]


class MonotonicClock:
    """Real time: ``time.perf_counter_ns`` (monotonic, the best resolution the OS offers)."""

    def now_ns(self) -> int:
        return time.perf_counter_ns()

    def sleep(self, ms: float) -> None:
        """Sleep ``ms`` milliseconds of real time (``inf`` is refused: use an event to hang)."""
        ns = _ms_to_ns(ms)
        if ns == math.inf:
            raise ValueError("MonotonicClock.sleep(inf) would never return; block on an event instead")
        time.sleep(ns / 1e9)

    def wait_until(self, event: threading.Event, deadline_ns: int) -> bool:
        """Wait until ``event`` is set (``True``) or the deadline passes (``False``)."""
        remaining = deadline_ns - time.perf_counter_ns()
        if remaining > 0:
            return event.wait(remaining / 1e9)
        return event.is_set()

    def __repr__(self) -> str:
        return "MonotonicClock()"


@dataclass
class _Worker:
    state: str = "running"  # "running" | "sleeping"
    wake_ns: float = math.inf


class FakeClock:
    """A manual clock for deterministic tests; thread-safe.

    Time moves only when asked: :meth:`advance`, :meth:`set_ns`, a driving thread's :meth:`sleep`, or a
    driver's :meth:`wait_until` (which jumps to the next wake-up of a sleeping worker, or to the
    deadline). See the module docstring for the rules that make concurrent tests deterministic.

    Args:
        start_ns: initial time.
        settle_timeout_s: how long (real seconds) a driver waits for busy workers to go back to sleep
            after it moved the clock; past it the driver goes on and ``settle_timeouts`` counts it.

    >>> clock = FakeClock()
    >>> clock.sleep(3)          # the calling thread drives time
    >>> clock.now_ns() / 1e6
    3.0
    """

    def __init__(self, start_ns: int = 0, settle_timeout_s: float = 10.0) -> None:
        if start_ns < 0:
            raise ValueError(f"FakeClock start_ns must be >= 0; got {start_ns!r}")
        self._now = int(start_ns)
        self._cond = threading.Condition(threading.Lock())
        self._workers: dict[int, _Worker] = {}
        self.settle_timeout_s = float(settle_timeout_s)
        self.settle_timeouts = 0

    # -- reading -----------------------------------------------------------------------------
    def now_ns(self) -> int:
        with self._cond:
            return self._now

    def now_ms(self) -> float:
        """Current time in milliseconds (for assertions)."""
        return self.now_ns() / NS_PER_MS

    # -- moving time -------------------------------------------------------------------------
    def advance(self, ms: float) -> None:
        """Move the clock forward by ``ms`` milliseconds (finite, >= 0), then let workers settle."""
        ns = _ms_to_ns(ms)
        if ns == math.inf:
            raise ValueError("FakeClock.advance(inf) is not a time; advance by a finite amount")
        self.advance_ns(ns)

    def advance_ns(self, ns: int) -> None:
        """Move the clock forward by ``ns`` nanoseconds (>= 0), then let workers settle."""
        if ns < 0:
            raise ValueError(f"FakeClock only moves forward; got advance_ns({ns!r})")
        with self._cond:
            self._advance_to_locked(self._now + int(ns))

    def set_ns(self, t_ns: int) -> None:
        """Move the clock to ``t_ns`` (must not be in the past)."""
        with self._cond:
            if t_ns < self._now:
                raise ValueError(f"FakeClock only moves forward: set_ns({t_ns}) < now {self._now}")
            self._advance_to_locked(int(t_ns))

    def sleep(self, ms: float) -> None:
        """Take ``ms`` milliseconds of fake time.

        On a driving thread this advances the clock; on a busy worker thread it blocks until the
        clock has reached the wake-up time (``inf``: until :meth:`release_workers`).
        """
        ns = _ms_to_ns(ms)
        tid = threading.get_ident()
        with self._cond:
            worker = self._workers.get(tid)
            if worker is None:
                if ns == math.inf:
                    raise ValueError(
                        "FakeClock.sleep(inf) on a driving thread would never return; hang on a worker"
                    )
                self._advance_to_locked(self._now + ns)
                return
            worker.wake_ns = self._now + ns
            worker.state = "sleeping"
            self._cond.notify_all()
            while self._now < worker.wake_ns:
                self._cond.wait()
            worker.state = "running"
            worker.wake_ns = math.inf

    def release_workers(self) -> None:
        """Wake every sleeping worker now (ends scripted hangs; use in test teardown)."""
        with self._cond:
            for worker in self._workers.values():
                if worker.state == "sleeping":
                    worker.wake_ns = self._now
            self._cond.notify_all()

    def wait_until(self, event: threading.Event, deadline_ns: int) -> bool:
        """Drive time until ``event`` is set (``True``) or the clock reaches ``deadline_ns`` (``False``)."""
        with self._cond:
            while True:
                self._settle_locked()
                if event.is_set():
                    return True
                if self._now >= deadline_ns:
                    return False
                wakes = [w.wake_ns for w in self._workers.values() if w.state == "sleeping"]
                target = min([deadline_ns, *wakes])
                self._now = max(self._now, int(target))
                self._cond.notify_all()

    # -- worker bookkeeping (called by the hedger) -------------------------------------------
    def worker_busy(self, thread_id: int) -> None:
        """Mark ``thread_id`` as a busy worker: it no longer drives time and drivers wait for it."""
        with self._cond:
            self._workers[thread_id] = _Worker()
            self._cond.notify_all()

    def worker_idle(self, thread_id: int) -> None:
        """Mark ``thread_id`` as done with its task."""
        with self._cond:
            self._workers.pop(thread_id, None)
            self._cond.notify_all()

    def _advance_to_locked(self, target_ns: int) -> None:
        """Move to ``target_ns`` through every sleeping worker's wake-up on the way, settling at each."""
        self._settle_locked()
        while True:
            wakes = [w.wake_ns for w in self._workers.values() if w.state == "sleeping" and w.wake_ns <= target_ns]
            self._now = max(self._now, int(min([target_ns, *wakes])))
            self._cond.notify_all()
            self._settle_locked()
            if self._now >= target_ns:
                return

    def _settle_locked(self) -> None:
        me = threading.get_ident()
        limit = time.monotonic() + self.settle_timeout_s

        def busy() -> bool:
            return any(
                tid != me and (w.state == "running" or w.wake_ns <= self._now)
                for tid, w in self._workers.items()
            )

        while busy():
            remaining = limit - time.monotonic()
            if remaining <= 0:
                self.settle_timeouts += 1
                return
            self._cond.wait(remaining)

    def __repr__(self) -> str:
        return f"FakeClock(now_ms={self.now_ns() / NS_PER_MS:.3f})"


def sleep(clock: Clock, ms: float) -> None:
    """Take ``ms`` milliseconds on ``clock`` (its own ``sleep`` if it has one, else real time)."""
    fn = getattr(clock, "sleep", None)
    if fn is not None:
        fn(ms)
    else:
        time.sleep(_ms_to_ns(ms) / 1e9)


def wait_until(clock: Clock, event: threading.Event, deadline_ns: int) -> bool:
    """Wait until ``event`` is set (``True``) or ``clock`` reaches ``deadline_ns`` (``False``)."""
    fn = getattr(clock, "wait_until", None)
    if fn is not None:
        return bool(fn(event, deadline_ns))
    while True:  # a clock of unknown speed: poll it in short real-time slices
        remaining = deadline_ns - clock.now_ns()
        if remaining <= 0:
            return event.is_set()
        if event.wait(min(remaining / 1e9, 0.001)):
            return True


class _Hang:
    """Sentinel of a scripted step that blocks until released."""

    def __repr__(self) -> str:
        return "HANG"


HANG: Any = _Hang()
"""Script step of :class:`ScriptedDelay` that blocks until :meth:`ScriptedDelay.release`."""

ScriptStep = float | BaseException | _Hang | Callable[[], Any]


class ScriptedDelay(nn.Module):
    """Wrap a module so each call first takes a scripted time on a clock (tests and benchmarks).

    Each call consumes the next step of ``script`` (cycling when ``cycle=True``, else repeating the
    last step): a number of milliseconds to sleep on ``clock`` (a :class:`FakeClock` advances, a real
    clock sleeps), an exception to raise, :data:`HANG` to block until :meth:`release`, or a
    zero-argument callable returning one of those (for random scripts).

    Args:
        inner: the wrapped module (``nn.Identity()`` for a pure delay).
        clock: the clock to take time on.
        script: the steps.
        cycle: cycle through the script instead of repeating its last step.

    >>> clock = FakeClock()
    >>> stage = ScriptedDelay(nn.Identity(), clock, [1.0, 2.0])
    >>> _ = stage(torch.zeros(1)); _ = stage(torch.zeros(1)); clock.now_ms()
    3.0
    """

    def __init__(
        self,
        inner: nn.Module,
        clock: Clock,
        script: Sequence[ScriptStep] | ScriptStep,
        cycle: bool = False,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.clock = clock
        steps = list(script) if isinstance(script, (list, tuple)) else [script]
        if not steps:
            raise ValueError("ScriptedDelay needs at least one script step; got an empty script")
        self.script: list[ScriptStep] = steps
        self.cycle = cycle
        self.calls = 0
        self._lock = threading.Lock()
        self._released = threading.Event()

    def next_step(self) -> ScriptStep:
        """Consume and return the next step (thread-safe)."""
        with self._lock:
            i = self.calls
            self.calls += 1
        step = self.script[i % len(self.script)] if self.cycle else self.script[min(i, len(self.script) - 1)]
        if callable(step) and not isinstance(step, (BaseException, _Hang)):
            step = step()
        return step

    def take_time(self) -> None:
        """Consume one step: sleep, raise or hang."""
        step = self.next_step()
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, _Hang) or (isinstance(step, (int, float)) and math.isinf(step)):
            self._hang()
            return
        if step:  # a zero step takes no time (and no system call on a real clock)
            sleep(self.clock, float(step))

    def _hang(self) -> None:
        if isinstance(self.clock, FakeClock) and threading.get_ident() in self.clock._workers:
            while not self._released.is_set():
                self.clock.sleep(math.inf)  # woken by release_workers(); hang again unless released
            return
        self._released.wait()

    def release(self) -> None:
        """End every current and future hang of this module (test teardown)."""
        self._released.set()
        if isinstance(self.clock, FakeClock):
            self.clock.release_workers()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.take_time()
        return self.inner(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# CUDA stage timing
# ---------------------------------------------------------------------------------------------


def cuda_timing_available() -> bool:
    """Whether CUDA event timing can be used here."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class StageTiming:
    """One completed GPU stage measurement."""

    stage: str
    batch_size: int
    ms: float


class CudaStageTimer:
    """Time GPU stages with CUDA events, without synchronising the device.

    ``begin`` records a start event on the stage's stream, ``end`` records the stop event; the pair
    waits in a queue until :meth:`poll` finds ``stop.query()`` true (the stage's kernels finished),
    then reports ``start.elapsed_time(stop)`` through ``on_timing`` (for example
    ``LatencyProfile.record``) and returns it. Events are pooled, so the hot path allocates nothing.

    Args:
        on_timing: called as ``on_timing(stage, batch_size, ms)`` for each completed measurement.
        max_pending: pending pairs kept at most; the oldest is dropped (counted in ``dropped``) when a
            stalled device would otherwise let the queue grow without bound.

    Raises:
        RuntimeError: when CUDA is not available (check :func:`cuda_timing_available` first; on CPU
            time stages with :class:`MonotonicClock`).
    """

    def __init__(
        self,
        on_timing: Callable[[str, int, float], Any] | None = None,
        max_pending: int = 1024,
    ) -> None:
        if not cuda_timing_available():
            raise RuntimeError(
                "CudaStageTimer needs CUDA, and torch.cuda.is_available() is False here; "
                "time CPU stages with fallbackformer.runtime.clock.MonotonicClock instead"
            )
        if max_pending < 1:
            raise ValueError(f"CudaStageTimer max_pending must be >= 1; got {max_pending!r}")
        self.on_timing = on_timing
        self.max_pending = max_pending
        self.dropped = 0
        self._lock = threading.Lock()
        self._free: list[torch.cuda.Event] = []
        self._pending: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []

    def _event(self) -> torch.cuda.Event:
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.cuda.Event(enable_timing=True)

    def begin(self, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event:
        """Record and return a start event on ``stream`` (the current stream by default)."""
        start = self._event()
        start.record(stream)
        return start

    def end(
        self,
        start: torch.cuda.Event,
        stage: str,
        batch_size: int,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """Record the stop event of a stage begun with :meth:`begin`; the timing is read by :meth:`poll`."""
        stop = self._event()
        stop.record(stream)
        with self._lock:
            self._pending.append((stage, int(batch_size), start, stop))
            while len(self._pending) > self.max_pending:
                self._pending.pop(0)
                self.dropped += 1

    def poll(self) -> list[StageTiming]:
        """Collect every finished measurement (non-blocking, in order) and report it."""
        done: list[StageTiming] = []
        with self._lock:
            keep = []
            for stage, bs, start, stop in self._pending:  # pairs may live on different streams
                if stop.query():
                    done.append(StageTiming(stage, bs, float(start.elapsed_time(stop))))
                    self._free.extend((start, stop))
                else:
                    keep.append((stage, bs, start, stop))
            self._pending = keep
        if self.on_timing is not None:
            for t in done:
                self.on_timing(t.stage, t.batch_size, t.ms)
        return done

    @property
    def pending(self) -> int:
        """Measurements recorded and not yet finished on the device."""
        with self._lock:
            return len(self._pending)

    def drain(self) -> list[StageTiming]:
        """Synchronise the recorded stop events and collect everything (shutdown, tests; not hot path)."""
        with self._lock:
            stops = [p[3] for p in self._pending]
        for stop in stops:
            stop.synchronize()
        return self.poll()
