"""Hedging: results or timeouts at the deadline, busy workers refuse, no pile-up, grad mode, streams."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from fallbackformer.runtime.clock import HANG, FakeClock, MonotonicClock, ScriptedDelay
from fallbackformer.runtime.hedging import (
    DeadlineWorker,
    Hedger,
    HedgeStatus,
    SideStream,
    cuda_streams_available,
)

MS = 1_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_result_before_the_deadline(clock: FakeClock) -> None:
    hedger = Hedger(clock=clock)
    slow = ScriptedDelay(nn.Identity(), clock, [3.0])
    result = hedger.run(slow, 5 * MS, torch.ones(2))
    assert result.status == HedgeStatus.OK and torch.equal(result.value, torch.ones(2))
    assert result.elapsed_ms == 3.0
    hedger.close()


def test_timeout_at_the_deadline_then_busy_then_free_again(clock: FakeClock) -> None:
    hedger = Hedger(clock=clock)
    slow = ScriptedDelay(nn.Identity(), clock, [30.0, 1.0])
    first = hedger.run(slow, 5 * MS, torch.ones(1))
    assert first.status == HedgeStatus.TIMEOUT and first.elapsed_ms == 5.0
    assert hedger.busy_workers == 1
    second = hedger.run(slow, clock.now_ns() + 5 * MS, torch.ones(1))
    assert second.status == HedgeStatus.BUSY and second.elapsed_ms == 0.0  # refused at once
    clock.advance(25)  # the stalled call finishes
    third = hedger.run(slow, clock.now_ns() + 5 * MS, torch.ones(1))
    assert third.status == HedgeStatus.OK
    assert hedger.stats() == {"submitted": 2, "refused": 1, "timeouts": 1, "workers": 1, "busy_workers": 0, "stuck": 0}
    hedger.close()


def test_a_hung_task_never_holds_the_caller_nor_piles_up_work(clock: FakeClock) -> None:
    hedger = Hedger(clock=clock, max_workers=2)
    hung = ScriptedDelay(nn.Identity(), clock, [HANG])
    for _ in range(2):
        assert hedger.run(hung, clock.now_ns() + 20 * MS, torch.zeros(1)).status == HedgeStatus.TIMEOUT
    t0 = clock.now_ns()
    for _ in range(50):
        assert hedger.run(hung, clock.now_ns() + 20 * MS, torch.zeros(1)).status == HedgeStatus.BUSY
    assert clock.now_ns() == t0 and hung.calls == 2  # no waiting, no new work started
    assert hedger.stats()["workers"] == 2 and threading.active_count() < 50
    hung.release()
    clock.advance(1)
    assert hedger.busy_workers == 0
    hedger.close()


def test_errors_are_returned_not_raised(clock: FakeClock) -> None:
    hedger = Hedger(clock=clock)
    failing = ScriptedDelay(nn.Identity(), clock, [torch.OutOfMemoryError("CUDA out of memory")])
    result = hedger.run(failing, 5 * MS, torch.zeros(1))
    assert result.status == HedgeStatus.ERROR and isinstance(result.error, torch.OutOfMemoryError)
    assert hedger.run(lambda: 1, clock.now_ns() + MS).value == 1  # the worker survived
    hedger.close()


def test_cancellation_is_cooperative_and_late_results_reach_callbacks(clock: FakeClock) -> None:
    hedger = Hedger(clock=clock)
    stages_run: list[int] = []
    late: list[float | None] = []

    def primary(cancelled: threading.Event) -> str:
        for i in range(5):
            if cancelled.is_set():
                return "stopped"
            clock.sleep(4)
            stages_run.append(i)
        return "done"

    box: dict = {}

    def task() -> str:
        return primary(box["ticket"].cancelled)

    ticket = hedger.submit(task)
    assert ticket is not None
    box["ticket"] = ticket
    ticket.add_done_callback(lambda t: late.append(t.duration_ms))
    assert ticket.wait(6 * MS).status == HedgeStatus.TIMEOUT
    ticket.cancel()
    clock.advance(10)
    assert ticket.value == "stopped" and stages_run == [0, 1]  # stopped at the next stage boundary
    assert late == [8.0]
    got: list[str] = []
    ticket.add_done_callback(lambda t: got.append(t.value))  # already done: called at once
    assert got == ["stopped"]
    hedger.close()


def test_the_worker_inherits_the_callers_autograd_mode(clock: FakeClock) -> None:
    hedger = Hedger(clock=clock)

    def modes() -> tuple[bool, bool]:
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    with torch.no_grad():
        assert hedger.run(modes, MS).value == (False, False)
    with torch.inference_mode():
        assert hedger.run(modes, MS).value == (False, True)
    assert hedger.run(modes, MS).value == (True, False)
    hedger.close()


def test_closed_hedger_and_worker_refuse(clock: FakeClock) -> None:
    hedger = Hedger(clock=clock)
    hedger.close()
    with pytest.raises(RuntimeError, match="closed"):
        hedger.submit(lambda: 1)
    worker = DeadlineWorker(clock)
    worker.close(timeout_s=1.0)
    assert worker.submit(lambda: 1) is None
    with pytest.raises(ValueError, match="max_workers"):
        Hedger(max_workers=0)


@pytest.mark.skipif(cuda_streams_available(), reason="checks the CPU-only errors")
def test_cuda_variants_say_clearly_that_they_need_cuda() -> None:
    with pytest.raises(RuntimeError, match="needs CUDA"):
        SideStream()
    with pytest.raises(RuntimeError, match="needs CUDA"):
        Hedger(cuda_streams=True)


def test_real_time_deadline_is_kept_with_a_stalled_task() -> None:
    """A few real calls (bounded): a 300 ms stall answers at a 10 ms deadline, generous tolerance."""
    clock = MonotonicClock()
    hedger = Hedger(clock=clock)
    stall = threading.Event()
    t0 = time.perf_counter()
    result = hedger.run(stall.wait, clock.now_ns() + 10 * MS, 0.3)
    waited_ms = (time.perf_counter() - t0) * 1e3
    assert result.status == HedgeStatus.TIMEOUT and 10.0 <= waited_ms < 60.0
    stall.set()
    hedger.close(timeout_s=1.0)


@pytest.mark.gpu
def test_side_stream_and_stream_worker_on_gpu() -> None:
    clock = MonotonicClock()
    x = torch.randn(1024, 1024, device="cuda")
    side = SideStream(clock=clock)
    ticket = side.launch(lambda: x @ x)
    result = ticket.wait(clock.now_ns() + 5_000 * MS)
    assert result.ok and torch.allclose(result.value, x @ x)
    hedger = Hedger(clock=clock, cuda_streams=True)
    result = hedger.run(lambda: x.sum(), clock.now_ns() + 5_000 * MS)
    assert result.ok and torch.allclose(result.value, x.sum())
    hedger.close()


def test_once_is_a_one_shot_event_for_many_waiters() -> None:
    from fallbackformer.runtime.hedging import Once

    done = Once()
    assert not done.is_set() and done.wait(0.0) is False and done.wait(0.001) is False
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(done.wait(10.0))) for _ in range(3)]
    for t in waiters:
        t.start()
    done.set()
    done.set()  # a second set is a no-op
    for t in waiters:
        t.join(10.0)
    assert woke == [True, True, True] and done.is_set() and done.wait() and done.wait(0.0)


@pytest.mark.parametrize("busy", [False, True])
def test_a_closed_worker_thread_ends_idle_or_after_its_task(busy: bool) -> None:
    worker = DeadlineWorker(MonotonicClock())
    gate = threading.Event()
    ticket = worker.submit(gate.wait, 10.0) if busy else None
    worker.close(timeout_s=0.0)
    assert worker.submit(lambda: 1) is None
    if busy:
        assert worker.busy and ticket is not None and not ticket.done.is_set()
        gate.set()
        assert ticket.done.wait(10.0) and ticket.value is True
    worker._thread.join(10.0)
    assert not worker._thread.is_alive() and not worker.busy
    worker.close(timeout_s=0.0)  # closing again is harmless
