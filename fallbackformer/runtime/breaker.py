"""CircuitBreaker: stop calling a failing or slow primary, try it again later, with a rollback switch.

Semantics follow resilience4j's count-based circuit breaker:

* ``CLOSED``: calls are permitted; each outcome (failed or not, slow or not: slow means its duration is
  *above* ``slow_call_duration_threshold_ms``) goes into a sliding window of the last
  ``sliding_window_size`` calls. Once the window holds at least ``minimum_number_of_calls`` (capped at
  the window size), the breaker opens when the failure rate or the slow-call rate (percent) is at or
  above its threshold.
* ``OPEN``: calls are refused until ``wait_duration_in_open_ms`` has passed; the next
  :meth:`CircuitBreaker.try_acquire` then moves to ``HALF_OPEN``.
* ``HALF_OPEN``: exactly ``permitted_number_of_calls_in_half_open`` trial calls are permitted (others
  are refused); once all of them have reported, their rates decide: above a threshold -> ``OPEN``,
  else -> ``CLOSED`` with a fresh window. With ``max_wait_in_half_open_ms > 0`` a half-open breaker
  whose trials did not all report in time goes back to ``OPEN``.
* ``FORCED_OPEN`` (the rollback switch: always serve the fallback) refuses every call and
  ``DISABLED`` permits every call; both record nothing and stay until :meth:`CircuitBreaker.reset`
  (or another explicit transition).

Time comes from an injectable clock, so tests are deterministic; every method is thread-safe.

>>> from fallbackformer.runtime.clock import FakeClock
>>> clock = FakeClock()
>>> cb = CircuitBreaker(BreakerConfig(sliding_window_size=4, minimum_number_of_calls=4), clock=clock)
>>> for _ in range(4):
...     assert cb.try_acquire(); cb.on_error(1.0)
>>> cb.state, cb.try_acquire()
(<BreakerState.OPEN: 'open'>, False)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from fallbackformer.runtime.clock import NS_PER_MS, Clock, MonotonicClock

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker"]


class BreakerState(str, Enum):
    """States of :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


@dataclass
class BreakerConfig:
    """Configuration of a :class:`CircuitBreaker` (resilience4j names, durations in milliseconds).

    Attributes:
        failure_rate_threshold: percent of failed calls in the window at which the breaker opens.
        slow_call_rate_threshold: percent of slow calls in the window at which the breaker opens.
        slow_call_duration_threshold_ms: a call that took longer than this is slow.
        sliding_window_size: calls in the count-based window.
        minimum_number_of_calls: calls needed before the rates are evaluated (capped at the window).
        wait_duration_in_open_ms: time spent OPEN before trial calls are let through.
        permitted_number_of_calls_in_half_open: trial calls in HALF_OPEN, evaluated together.
        max_wait_in_half_open_ms: 0 waits for the trials forever; else back to OPEN after this long.
    """

    failure_rate_threshold: float = 50.0
    slow_call_rate_threshold: float = 100.0
    slow_call_duration_threshold_ms: float = 60_000.0
    sliding_window_size: int = 100
    minimum_number_of_calls: int = 100
    wait_duration_in_open_ms: float = 60_000.0
    permitted_number_of_calls_in_half_open: int = 10
    max_wait_in_half_open_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            v = getattr(self, name)
            if not 0.0 < v <= 100.0:
                raise ValueError(f"BreakerConfig.{name} is a percent in (0, 100]; got {v!r}")
        for name in ("sliding_window_size", "minimum_number_of_calls", "permitted_number_of_calls_in_half_open"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BreakerConfig.{name} must be an int >= 1; got {v!r}")
        for name in ("slow_call_duration_threshold_ms", "wait_duration_in_open_ms", "max_wait_in_half_open_ms"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and not math.isnan(v)):
                raise ValueError(f"BreakerConfig.{name} must be a duration >= 0 ms; got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for the policy in a bundle manifest)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BreakerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BreakerConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))


class _Window:
    """Count-based sliding window of call outcomes with running totals."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.failed: list[bool] = []
        self.slow: list[bool] = []
        self.head = 0
        self.n_failed = 0
        self.n_slow = 0
        self.n_slow_failed = 0

    def __len__(self) -> int:
        return len(self.failed)

    def add(self, failed: bool, slow: bool) -> None:
        if len(self.failed) < self.size:
            self.failed.append(failed)
            self.slow.append(slow)
        else:
            of, os_ = self.failed[self.head], self.slow[self.head]
            self.n_failed -= of
            self.n_slow -= os_
            self.n_slow_failed -= of and os_
            self.failed[self.head], self.slow[self.head] = failed, slow
            self.head = (self.head + 1) % self.size
        self.n_failed += failed
        self.n_slow += slow
        self.n_slow_failed += failed and slow

    def rates(self) -> tuple[float, float]:
        n = len(self.failed)
        return 100.0 * self.n_failed / n, 100.0 * self.n_slow / n


Listener = Callable[[BreakerState, BreakerState], None]


class CircuitBreaker:
    """A thread-safe circuit breaker (see the module docstring for the state machine).

    Usage per call: ``if breaker.try_acquire():`` run the protected path, then report it with
    :meth:`on_success` or :meth:`on_error` (with its duration), or :meth:`release` if it never ran;
    else serve the fallback (reason ``breaker_open``).

    Args:
        config: thresholds and durations.
        clock: time source (real time by default; a :class:`~fallbackformer.runtime.clock.FakeClock` in tests).
        name: a label for metrics and logs.
    """

    def __init__(self, config: BreakerConfig | None = None, clock: Clock | None = None, name: str = "primary") -> None:
        self.config = config or BreakerConfig()
        self.clock = clock or MonotonicClock()
        self.name = name
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._state = BreakerState.CLOSED
        self._since_ns = self.clock.now_ns()
        self._window = _Window(self.config.sliding_window_size)
        self._min_calls = min(self.config.minimum_number_of_calls, self.config.sliding_window_size)
        self._half_open_permits = 0  # trial permits still to hand out
        self._half_open_outstanding = 0  # trial permits handed out and not yet reported
        self._not_permitted = 0
        self._transitions: dict[str, int] = {}

    # -- state -------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """The current state (OPEN turns HALF_OPEN only on the next :meth:`try_acquire`)."""
        with self._lock:
            return self._state

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(old_state, new_state)`` after every transition (outside the lock)."""
        with self._lock:
            self._listeners.append(listener)

    def _transition_locked(self, new: BreakerState) -> tuple[BreakerState, BreakerState] | None:
        old = self._state
        if old == new:
            return None
        self._state = new
        self._since_ns = self.clock.now_ns()
        key = f"{old.value}->{new.value}"
        self._transitions[key] = self._transitions.get(key, 0) + 1
        if new in (BreakerState.CLOSED, BreakerState.HALF_OPEN):
            size = self.config.sliding_window_size if new == BreakerState.CLOSED else self.config.permitted_number_of_calls_in_half_open
            self._window = _Window(size)
            self._min_calls = min(self.config.minimum_number_of_calls, size) if new == BreakerState.CLOSED else size
        if new == BreakerState.HALF_OPEN:
            self._half_open_permits = self.config.permitted_number_of_calls_in_half_open
            self._half_open_outstanding = 0
        return old, new

    def _notify(self, change: tuple[BreakerState, BreakerState] | None) -> None:
        if change is None:
            return
        for listener in list(self._listeners):
            listener(*change)

    def _transition(self, new: BreakerState) -> None:
        with self._lock:
            change = self._transition_locked(new)
        self._notify(change)

    def reset(self) -> None:
        """Back to CLOSED with an empty window (also leaves FORCED_OPEN and DISABLED)."""
        with self._lock:
            change = self._transition_locked(BreakerState.CLOSED)
            self._window = _Window(self.config.sliding_window_size)
            self._min_calls = min(self.config.minimum_number_of_calls, self.config.sliding_window_size)
        self._notify(change)

    def force_open(self) -> None:
        """The rollback switch: refuse every call (always serve the fallback) until :meth:`reset`."""
        self._transition(BreakerState.FORCED_OPEN)

    def disable(self) -> None:
        """Permit every call and record nothing until :meth:`reset`."""
        self._transition(BreakerState.DISABLED)

    def transition_to_open(self) -> None:
        """Open now (for example on an operator's decision); HALF_OPEN follows after the wait."""
        self._transition(BreakerState.OPEN)

    # -- the call protocol -------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """Whether a call may go to the protected path now; a refusal is counted."""
        with self._lock:
            change = None
            state = self._state
            if state == BreakerState.OPEN:
                waited = self.clock.now_ns() - self._since_ns
                if waited >= self.config.wait_duration_in_open_ms * NS_PER_MS:
                    change = self._transition_locked(BreakerState.HALF_OPEN)
                    state = self._state
            elif state == BreakerState.HALF_OPEN and self.config.max_wait_in_half_open_ms > 0:
                waited = self.clock.now_ns() - self._since_ns
                if waited >= self.config.max_wait_in_half_open_ms * NS_PER_MS:
                    change = self._transition_locked(BreakerState.OPEN)
                    state = self._state
            if state in (BreakerState.CLOSED, BreakerState.DISABLED):
                permitted = True
            elif state == BreakerState.HALF_OPEN and self._half_open_permits > 0:
                self._half_open_permits -= 1
                self._half_open_outstanding += 1
                permitted = True
            else:
                permitted = False
                self._not_permitted += 1
        self._notify(change)
        return permitted

    def release(self) -> None:
        """Give back a permission that was acquired but not used (the call never ran)."""
        with self._lock:
            if self._state == BreakerState.HALF_OPEN and self._half_open_outstanding > 0:
                self._half_open_outstanding -= 1
                self._half_open_permits += 1

    def on_success(self, duration_ms: float) -> None:
        """Report a permitted call that succeeded after ``duration_ms``."""
        self._record(False, duration_ms)

    def on_error(self, duration_ms: float) -> None:
        """Report a permitted call that failed after ``duration_ms``."""
        self._record(True, duration_ms)

    def _record(self, failed: bool, duration_ms: float) -> None:
        slow = float(duration_ms) > self.config.slow_call_duration_threshold_ms
        with self._lock:
            change = None
            state = self._state
            if state == BreakerState.CLOSED:
                self._window.add(failed, slow)
                if len(self._window) >= self._min_calls and self._exceeded_locked():
                    change = self._transition_locked(BreakerState.OPEN)
            elif state == BreakerState.HALF_OPEN and self._half_open_outstanding > 0:
                self._half_open_outstanding -= 1
                self._window.add(failed, slow)
                if len(self._window) >= self._min_calls:
                    nxt = BreakerState.OPEN if self._exceeded_locked() else BreakerState.CLOSED
                    change = self._transition_locked(nxt)
            # OPEN, FORCED_OPEN, DISABLED, or a late report from an earlier state: not recorded.
        self._notify(change)

    def _exceeded_locked(self) -> bool:
        failure_rate, slow_rate = self._window.rates()
        return failure_rate >= self.config.failure_rate_threshold or slow_rate >= self.config.slow_call_rate_threshold

    # -- metrics -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """A snapshot: state, rates (-1 below the minimum number of calls), counts and transitions."""
        with self._lock:
            n = len(self._window)
            enough = n >= self._min_calls and n > 0
            failure_rate, slow_rate = self._window.rates() if enough else (-1.0, -1.0)
            return {
                "name": self.name,
                "state": self._state.value,
                "failure_rate": failure_rate,
                "slow_call_rate": slow_rate,
                "number_of_calls": n,
                "number_of_failed_calls": self._window.n_failed,
                "number_of_slow_calls": self._window.n_slow,
                "number_of_slow_failed_calls": self._window.n_slow_failed,
                "number_of_successful_calls": n - self._window.n_failed,
                "number_of_not_permitted_calls": self._not_permitted,
                "half_open_permits_left": self._half_open_permits if self._state == BreakerState.HALF_OPEN else 0,
                "transitions": dict(self._transitions),
            }

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self.state.value})"
