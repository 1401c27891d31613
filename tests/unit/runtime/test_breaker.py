"""CircuitBreaker: resilience4j semantics with a fake clock, a reference model, threads."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fallbackformer.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker
from fallbackformer.runtime.clock import FakeClock


def make(clock: FakeClock | None = None, **kw: object) -> CircuitBreaker:
    cfg = dict(
        sliding_window_size=10,
        minimum_number_of_calls=5,
        failure_rate_threshold=50.0,
        slow_call_rate_threshold=50.0,
        slow_call_duration_threshold_ms=10.0,
        wait_duration_in_open_ms=100.0,
        permitted_number_of_calls_in_half_open=3,
    )
    cfg.update(kw)
    return CircuitBreaker(BreakerConfig(**cfg), clock=clock or FakeClock())  # type: ignore[arg-type]


def calls(cb: CircuitBreaker, outcomes: str, duration_ms: float = 1.0) -> None:
    """'f' = failed call, 's' = success."""
    for o in outcomes:
        assert cb.try_acquire()
        (cb.on_error if o == "f" else cb.on_success)(duration_ms)


def test_stays_closed_below_the_minimum_number_of_calls() -> None:
    cb = make()
    calls(cb, "ffff")
    assert cb.state == BreakerState.CLOSED
    assert cb.metrics()["failure_rate"] == -1.0
    calls(cb, "s")  # 5 calls, 80% failed
    assert cb.state == BreakerState.OPEN


def test_opens_at_the_failure_threshold_not_below() -> None:
    cb = make()
    calls(cb, "sssssfff")  # 3/8 = 37.5 %
    assert cb.state == BreakerState.CLOSED
    calls(cb, "f")  # 4/9 = 44 %
    assert cb.state == BreakerState.CLOSED
    calls(cb, "f")  # 5/10 = 50 %: at the threshold opens
    assert cb.state == BreakerState.OPEN


def test_slow_calls_are_those_above_the_duration_threshold() -> None:
    cb = make()
    calls(cb, "sssss", duration_ms=10.0)  # exactly at the threshold: not slow
    assert cb.state == BreakerState.CLOSED and cb.metrics()["slow_call_rate"] == 0.0
    cb.reset()
    calls(cb, "sssss", duration_ms=10.001)
    assert cb.state == BreakerState.OPEN
    assert cb.metrics()["transitions"] == {"closed->open": 1}


def test_slow_errors_count_as_both() -> None:
    cb = make(failure_rate_threshold=100.0, slow_call_rate_threshold=100.0)
    calls(cb, "ssff", duration_ms=20.0)
    m = cb.metrics()
    assert (m["number_of_failed_calls"], m["number_of_slow_calls"], m["number_of_slow_failed_calls"]) == (2, 4, 2)


def test_the_window_slides() -> None:
    cb = make(minimum_number_of_calls=10)
    calls(cb, "ffff" + "s" * 6)  # 40 % over 10 calls
    assert cb.state == BreakerState.CLOSED
    calls(cb, "s" * 4)  # the four failures slid out
    assert cb.metrics()["number_of_failed_calls"] == 0
    calls(cb, "fffff")
    assert cb.state == BreakerState.OPEN


def test_open_refuses_then_half_open_permits_exactly_n_trials() -> None:
    clock = FakeClock()
    cb = make(clock)
    calls(cb, "fffff")
    assert not cb.try_acquire()
    clock.advance(99.9)
    assert not cb.try_acquire() and cb.state == BreakerState.OPEN
    clock.advance(0.1)
    assert [cb.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert cb.state == BreakerState.HALF_OPEN
    assert cb.metrics()["number_of_not_permitted_calls"] == 3
    cb.on_success(1.0)
    cb.on_success(1.0)
    assert cb.state == BreakerState.HALF_OPEN  # evaluated only once all trials reported
    cb.on_error(1.0)  # 1/3 failed < 50 %
    assert cb.state == BreakerState.CLOSED and cb.metrics()["number_of_calls"] == 0


def test_failing_trials_reopen() -> None:
    clock = FakeClock()
    cb = make(clock)
    calls(cb, "fffff")
    clock.advance(100)
    calls(cb, "sff")
    assert cb.state == BreakerState.OPEN
    assert not cb.try_acquire()
    clock.advance(100)
    assert cb.try_acquire() and cb.state == BreakerState.HALF_OPEN


def test_release_gives_a_trial_permit_back() -> None:
    clock = FakeClock()
    cb = make(clock, permitted_number_of_calls_in_half_open=1)
    calls(cb, "fffff")
    clock.advance(100)
    assert cb.try_acquire() and not cb.try_acquire()
    cb.release()
    assert cb.try_acquire()


def test_max_wait_in_half_open_goes_back_to_open() -> None:
    clock = FakeClock()
    cb = make(clock, max_wait_in_half_open_ms=50.0)
    calls(cb, "fffff")
    clock.advance(100)
    assert cb.try_acquire()  # a trial that never reports (a hung primary)
    clock.advance(50)
    assert not cb.try_acquire() and cb.state == BreakerState.OPEN


def test_late_reports_from_a_previous_state_are_ignored() -> None:
    cb = make()
    assert cb.try_acquire()  # acquired while CLOSED, reported after the breaker opened
    calls(cb, "fffff")
    cb.on_success(1.0)
    assert cb.state == BreakerState.OPEN and cb.metrics()["number_of_calls"] == 5  # the window that opened it


def test_forced_open_is_a_rollback_switch_and_disabled_permits_all() -> None:
    clock = FakeClock()
    cb = make(clock)
    cb.force_open()
    clock.advance(10_000)
    assert not cb.try_acquire() and cb.state == BreakerState.FORCED_OPEN
    cb.on_error(1.0)
    cb.reset()
    assert cb.state == BreakerState.CLOSED and cb.try_acquire()
    cb.disable()
    calls(cb, "f" * 20)
    assert cb.state == BreakerState.DISABLED and cb.metrics()["number_of_calls"] == 0
    cb.transition_to_open()
    assert cb.state == BreakerState.OPEN


def test_listeners_see_every_transition() -> None:
    clock = FakeClock()
    cb = make(clock)
    seen: list[tuple[str, str]] = []
    cb.add_listener(lambda old, new: seen.append((old.value, new.value)))
    calls(cb, "fffff")
    clock.advance(100)
    calls(cb, "sss")
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_config_round_trip_and_validation() -> None:
    cfg = BreakerConfig(sliding_window_size=7, wait_duration_in_open_ms=3.5)
    assert BreakerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown BreakerConfig fields \\['nope'\\]"):
        BreakerConfig.from_dict({"nope": 1})
    for bad in (
        {"failure_rate_threshold": 0.0},
        {"slow_call_rate_threshold": 101.0},
        {"sliding_window_size": 0},
        {"minimum_number_of_calls": 2.5},
        {"wait_duration_in_open_ms": -1.0},
    ):
        with pytest.raises(ValueError, match="BreakerConfig"):
            BreakerConfig(**bad)  # type: ignore[arg-type]


def test_minimum_calls_is_capped_at_the_window() -> None:
    cb = make(sliding_window_size=4, minimum_number_of_calls=100)
    calls(cb, "ffff")
    assert cb.state == BreakerState.OPEN


def test_counters_stay_consistent_under_threads() -> None:
    cb = make(sliding_window_size=1000, minimum_number_of_calls=1000, failure_rate_threshold=100.0)

    def work() -> None:
        for i in range(250):
            if cb.try_acquire():
                (cb.on_error if i % 4 == 0 else cb.on_success)(1.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = cb.metrics()
    failures = 4 * sum(i % 4 == 0 for i in range(250))
    assert m["number_of_calls"] == 1000 and m["number_of_failed_calls"] == failures
    assert m["failure_rate"] == pytest.approx(failures / 10) and cb.state == BreakerState.CLOSED


class _Reference:
    """A plain restatement of the semantics (lists, no ring buffers), to compare against."""

    def __init__(self, cfg: BreakerConfig) -> None:
        self.cfg = cfg
        self.state = "closed"
        self.outcomes: list[tuple[bool, bool]] = []
        self.since = 0.0
        self.permits = 0
        self.outstanding = 0

    def _exceeded(self, window: list[tuple[bool, bool]]) -> bool:
        n = len(window)
        fr = 100.0 * sum(f for f, _ in window) / n
        sr = 100.0 * sum(s for _, s in window) / n
        return fr >= self.cfg.failure_rate_threshold or sr >= self.cfg.slow_call_rate_threshold

    def acquire(self, now: float) -> bool:
        if self.state == "open" and now - self.since >= self.cfg.wait_duration_in_open_ms:
            self.state, self.since, self.outcomes = "half_open", now, []
            self.permits, self.outstanding = self.cfg.permitted_number_of_calls_in_half_open, 0
        if self.state == "closed":
            return True
        if self.state == "half_open" and self.permits > 0:
            self.permits -= 1
            self.outstanding += 1
            return True
        return False

    def record(self, failed: bool, duration: float, now: float) -> None:
        slow = duration > self.cfg.slow_call_duration_threshold_ms
        if self.state == "closed":
            self.outcomes.append((failed, slow))
            window = self.outcomes[-self.cfg.sliding_window_size :]
            if len(window) >= min(self.cfg.minimum_number_of_calls, self.cfg.sliding_window_size) and self._exceeded(window):
                self.state, self.since, self.outcomes = "open", now, []
        elif self.state == "half_open" and self.outstanding > 0:
            self.outstanding -= 1
            self.outcomes.append((failed, slow))
            if len(self.outcomes) >= self.cfg.permitted_number_of_calls_in_half_open:
                self.state = "open" if self._exceeded(self.outcomes) else "closed"
                self.since, self.outcomes = now, []


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of time, acquisitions and reports agree with the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = BreakerConfig(
            sliding_window_size=6,
            minimum_number_of_calls=4,
            failure_rate_threshold=50.0,
            slow_call_rate_threshold=75.0,
            slow_call_duration_threshold_ms=5.0,
            wait_duration_in_open_ms=20.0,
            permitted_number_of_calls_in_half_open=2,
        )
        self.clock = FakeClock()
        self.cb = CircuitBreaker(self.cfg, clock=self.clock)
        self.ref = _Reference(self.cfg)
        self.held = 0  # permits acquired and not yet reported

    @rule(ms=st.sampled_from([0.0, 1.0, 7.0, 20.0, 50.0]))
    def advance(self, ms: float) -> None:
        self.clock.advance(ms)

    @rule()
    def acquire(self) -> None:
        got = self.cb.try_acquire()
        assert got == self.ref.acquire(self.clock.now_ms())
        self.held += got

    @precondition(lambda self: self.held > 0)
    @rule(failed=st.booleans(), duration=st.sampled_from([1.0, 5.0, 9.0]))
    def report(self, failed: bool, duration: float) -> None:
        self.held -= 1
        (self.cb.on_error if failed else self.cb.on_success)(duration)
        self.ref.record(failed, duration, self.clock.now_ms())

    @invariant()
    def same_state(self) -> None:
        assert self.cb.state.value == self.ref.state


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_agrees_with_the_reference_model = BreakerMachine.TestCase
