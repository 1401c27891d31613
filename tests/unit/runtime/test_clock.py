"""Clocks: FakeClock determinism (drivers and workers), ScriptedDelay, real-time helpers, CUDA timer."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from fallbackformer.runtime.clock import (
    HANG,
    CudaStageTimer,
    FakeClock,
    MonotonicClock,
    ScriptedDelay,
    cuda_timing_available,
    ms_since,
    sleep,
    wait_until,
)
from fallbackformer.runtime.hedging import Hedger


def test_fake_clock_advances_only_when_asked() -> None:
    clock = FakeClock(start_ns=5)
    assert clock.now_ns() == 5
    clock.advance(1.5)
    assert clock.now_ns() == 1_500_005
    clock.set_ns(2_000_000)
    assert clock.now_ms() == 2.0
    assert ms_since(clock, 0) == 2.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_fake_clock_refuses_bad_advances(bad: float) -> None:
    with pytest.raises(ValueError, match="advance|duration"):
        FakeClock().advance(bad)


def test_fake_clock_never_goes_back() -> None:
    clock = FakeClock()
    clock.advance(1)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.set_ns(0)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance_ns(-1)


def test_fake_clock_is_thread_safe() -> None:
    clock = FakeClock()

    def work() -> None:
        for _ in range(500):
            clock.advance_ns(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock.now_ns() == 2000


def test_driver_sleep_advances_and_inf_is_refused() -> None:
    clock = FakeClock()
    clock.sleep(3)
    assert clock.now_ms() == 3.0
    with pytest.raises(ValueError, match="never return"):
        clock.sleep(float("inf"))


def test_worker_sleep_waits_for_the_driver_and_wait_until_jumps_to_its_wake_up() -> None:
    clock = FakeClock()
    hedger = Hedger(clock=clock)
    seen: list[float] = []

    def task() -> str:
        clock.sleep(3)  # a worker: passive, woken when the driver moves time
        seen.append(clock.now_ms())
        return "done"

    ticket = hedger.submit(task)
    assert ticket is not None
    assert clock.now_ms() == 0.0  # the worker did not move time
    assert ticket.wait(deadline_ns=5_000_000).value == "done"
    assert seen == [3.0] and clock.now_ms() == 3.0  # jumped to the wake-up, not to the deadline
    hedger.close()


def test_concurrent_driver_and_worker_interleave_deterministically() -> None:
    """The student (driver) takes 4 ms while the primary (worker) takes 3 ms: the worker is done by then."""
    for _ in range(20):
        clock = FakeClock()
        hedger = Hedger(clock=clock)
        ticket = hedger.submit(lambda: clock.sleep(3))
        assert ticket is not None
        clock.sleep(4)  # the driver's own work; settles the worker
        assert ticket.done.is_set() and ticket.duration_ms == 3.0
        hedger.close()


def test_wait_until_returns_false_exactly_at_the_deadline_when_the_worker_is_slower() -> None:
    clock = FakeClock()
    hedger = Hedger(clock=clock)
    ticket = hedger.submit(lambda: clock.sleep(10))
    assert ticket is not None
    assert ticket.wait(deadline_ns=4_000_000).ok is False
    assert clock.now_ms() == 4.0 and not ticket.done.is_set()
    clock.advance(6)  # the worker wakes and finishes before advance returns
    assert ticket.done.is_set() and ticket.duration_ms == 10.0
    hedger.close()


def test_scripted_delay_steps_errors_and_callables() -> None:
    clock = FakeClock()
    stage = ScriptedDelay(nn.Identity(), clock, [1.0, RuntimeError("boom"), lambda: 2.5])
    x = torch.ones(2)
    assert torch.equal(stage(x), x) and clock.now_ms() == 1.0
    with pytest.raises(RuntimeError, match="boom"):
        stage(x)
    stage(x)
    assert clock.now_ms() == 3.5
    stage(x)  # repeats the last step
    assert clock.now_ms() == 6.0 and stage.calls == 4


def test_scripted_delay_cycles() -> None:
    clock = FakeClock()
    stage = ScriptedDelay(nn.Identity(), clock, [1.0, 2.0], cycle=True)
    for _ in range(4):
        stage(torch.zeros(1))
    assert clock.now_ms() == 6.0


def test_scripted_delay_refuses_an_empty_script() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ScriptedDelay(nn.Identity(), FakeClock(), [])


def test_scripted_hang_on_a_fake_worker_hits_the_deadline_and_is_released() -> None:
    clock = FakeClock()
    stage = ScriptedDelay(nn.Identity(), clock, [HANG])
    hedger = Hedger(clock=clock)
    ticket = hedger.submit(stage, torch.zeros(1))
    assert ticket is not None
    assert ticket.wait(deadline_ns=20_000_000).ok is False
    assert clock.now_ms() == 20.0
    clock.advance(1000)
    assert not ticket.done.is_set()  # still hung: time does not end a hang
    stage.release()
    assert ticket.done.wait(5)
    hedger.close()


def test_scripted_hang_on_a_real_clock_is_released() -> None:
    stage = ScriptedDelay(nn.Identity(), MonotonicClock(), [HANG])
    t = threading.Thread(target=stage, args=(torch.zeros(1),), daemon=True)
    t.start()
    time.sleep(0.01)
    assert t.is_alive()
    stage.release()
    t.join(5)
    assert not t.is_alive()


def test_monotonic_clock_and_module_helpers() -> None:
    clock = MonotonicClock()
    a = clock.now_ns()
    sleep(clock, 1.0)
    assert clock.now_ns() - a >= 1_000_000
    event = threading.Event()
    assert wait_until(clock, event, clock.now_ns() + 2_000_000) is False
    event.set()
    assert wait_until(clock, event, clock.now_ns() + 10**12) is True
    with pytest.raises(ValueError, match="never return"):
        clock.sleep(float("inf"))


def test_wait_until_with_a_minimal_clock_polls_it() -> None:
    class Minimal:
        def now_ns(self) -> int:
            return time.perf_counter_ns()

    clock = Minimal()
    event = threading.Event()
    t0 = time.perf_counter()
    assert wait_until(clock, event, clock.now_ns() + 3_000_000) is False
    assert time.perf_counter() - t0 >= 0.003
    threading.Timer(0.002, event.set).start()
    assert wait_until(clock, event, clock.now_ns() + 10**10) is True
    sleep(clock, 0.5)  # no sleep method: real time


@pytest.mark.skipif(cuda_timing_available(), reason="checks the CPU-only error")
def test_cuda_stage_timer_says_clearly_that_it_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="needs CUDA.*MonotonicClock"):
        CudaStageTimer()


@pytest.mark.gpu
def test_cuda_stage_timer_measures_without_synchronising() -> None:
    seen: list[tuple[str, int, float]] = []
    timer = CudaStageTimer(on_timing=lambda s, b, ms: seen.append((s, b, ms)))
    x = torch.randn(2048, 2048, device="cuda")
    start = timer.begin()
    for _ in range(10):
        x = x @ x.T / 2048
    timer.end(start, "matmul", 1)
    assert timer.pending in (0, 1)
    timings = timer.drain()
    assert [t.stage for t in timings] == ["matmul"] and timings[0].ms > 0 and seen
