"""Hedging: run a callable beside the caller and get its result, or a timeout, at a deadline.

The primary may stall or hang; the caller must still answer on time. :class:`Hedger` runs a callable
on a persistent worker thread while the caller does something else (the student); at the deadline the
caller takes whatever is ready. Three rules keep a misbehaving primary from hurting anyone:

* the caller never waits past its deadline (:meth:`Ticket.wait`);
* a worker runs one task at a time and a busy worker refuses new work: :meth:`Hedger.submit` returns
  ``None`` at once when every worker is busy, so the caller falls back immediately and a stuck primary
  never piles up a queue;
* a timed-out task is cancelled cooperatively (:attr:`Ticket.cancelled`, which the task may check
  between stages) and its late result is discarded, though :meth:`Ticket.add_done_callback` still
  sees it (to record how long the stall really was).

The worker inherits the caller's autograd mode (grad / no-grad / inference mode are thread-local in
PyTorch). On a GPU, :class:`Hedger` can launch the task on a side CUDA stream, and
:class:`SideStream` launches a callable on a side stream from the calling thread itself (kernel
launches are asynchronous); both complete when a CUDA event recorded after the work has finished,
which is polled with ``event.query()``, never synchronised.

>>> import threading
>>> from fallbackformer.runtime.clock import FakeClock
>>> clock = FakeClock()
>>> hedger = Hedger(clock=clock)
>>> ticket = hedger.submit(lambda: 42)
>>> ticket.wait(deadline_ns=clock.now_ns() + 5_000_000).value
42
>>> hedger.close()
"""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from fallbackformer.runtime.clock import NS_PER_MS, Clock, MonotonicClock, wait_until

__all__ = ["HedgeStatus", "HedgeResult", "Once", "Ticket", "DeadlineWorker", "Hedger", "SideStream",
           "cuda_streams_available"]


def cuda_streams_available() -> bool:
    """Whether side CUDA streams can be used here."""
    return torch.cuda.is_available()


def _require_cuda(what: str) -> None:
    if not cuda_streams_available():
        raise RuntimeError(
            f"{what} needs CUDA, and torch.cuda.is_available() is False here; "
            "on CPU hedge with a worker thread instead (Hedger(cuda_streams=False))"
        )


class HedgeStatus(str, Enum):
    """How a hedged call ended for the caller."""

    OK = "ok"  # the result was ready by the deadline
    TIMEOUT = "timeout"  # not ready at the deadline (the task may still be running)
    BUSY = "busy"  # every worker was still busy: the task was never started
    ERROR = "error"  # the task raised by the deadline


@dataclass
class HedgeResult:
    """What the caller got at (or before) its deadline."""

    status: HedgeStatus
    value: Any = None
    error: BaseException | None = None
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == HedgeStatus.OK


_Callback = Callable[["Ticket"], Any]


class Once:
    """A one-shot event on one raw lock: ``set``, ``is_set`` and ``wait`` like :class:`threading.Event`.

    A hand-off is on every hedged call's path. ``threading.Event`` builds a ``Condition`` (a lock, a
    waiter list and a new lock per ``wait``, all in Python); this is one ``_thread`` lock held until
    :meth:`set` releases it, so making, setting and waiting cost a few C calls (about a quarter of an
    Event's CPU per hand-off on the 2-core benchmark machine). It is set at most once.
    """

    __slots__ = ("_lock", "_flag")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        try:
            self._lock.release()  # wakes the waiters (each passes the lock on)
        except RuntimeError:  # (two setters raced: the other released it)
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set (``True``) or ``timeout`` real seconds passed (``False``); ``None``: no limit."""
        if self._flag:
            return True
        if timeout is None:
            got = self._lock.acquire()
        else:
            got = self._lock.acquire(True, min(max(0.0, timeout), threading.TIMEOUT_MAX))
        if got:
            self._lock.release()
        return self._flag


class Ticket:
    """A task handed to a worker: wait for it with a deadline, cancel it, or watch its late end."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.submitted_ns = clock.now_ns()
        self.finished_ns: int | None = None
        self.done = Once()
        self.cancelled: Once | threading.Event = Once()  # link_cancel may put the task's own event here
        self.value: Any = None
        self.error: BaseException | None = None
        self.cuda_event: Any = None  # torch.cuda.Event recorded after the task's kernels
        self._callbacks: list[_Callback] = []
        self._lock = _thread.allocate_lock()

    @property
    def duration_ms(self) -> float | None:
        """How long the task took on the worker (``None`` while it runs)."""
        if self.finished_ns is None:
            return None
        return (self.finished_ns - self.submitted_ns) / NS_PER_MS

    def link_cancel(self, event: Once | threading.Event) -> None:
        """Make ``event`` (the one the task itself checks) this ticket's cancellation flag."""
        old, self.cancelled = self.cancelled, event
        if old.is_set():
            event.set()

    def cancel(self) -> None:
        """Ask the task to stop at its next check of :attr:`cancelled`; its result will be discarded."""
        self.cancelled.set()

    def add_done_callback(self, fn: _Callback) -> None:
        """Call ``fn(ticket)`` once the task has finished (now, if it already has; else on the worker)."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self) -> None:
        self.finished_ns = self.clock.now_ns()
        with self._lock:
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a broken callback must not kill the worker
                pass

    def _cuda_ready(self, deadline_ns: int) -> bool:
        if self.cuda_event is None:
            return True
        while not self.cuda_event.query():
            if self.clock.now_ns() >= deadline_ns:
                return False
            time.sleep(20e-6)
        torch.cuda.current_stream().wait_event(self.cuda_event)  # already complete: orders the streams
        return True

    def wait(self, deadline_ns: int) -> HedgeResult:
        """Wait until the task is done or ``deadline_ns`` (clock time), whichever comes first."""
        ready = wait_until(self.clock, self.done, deadline_ns) and self._cuda_ready(deadline_ns)
        elapsed = (self.clock.now_ns() - self.submitted_ns) / NS_PER_MS
        if not ready:
            return HedgeResult(HedgeStatus.TIMEOUT, elapsed_ms=elapsed)
        if self.error is not None:
            return HedgeResult(HedgeStatus.ERROR, error=self.error, elapsed_ms=elapsed)
        return HedgeResult(HedgeStatus.OK, value=self.value, elapsed_ms=elapsed)


class DeadlineWorker:
    """One persistent daemon thread that runs one task at a time and refuses work while busy.

    The hand-off is one raw lock (``_go``) released by :meth:`submit` and taken by the thread; its
    state (busy, the task, closed) is guarded by another; the caller waits on the ticket's
    :class:`Once`. No ``Condition``: every hedged call crosses this twice.

    Args:
        clock: the clock of the deadlines (a :class:`FakeClock` is told when the worker is busy).
        name: thread name.
        cuda_stream: run tasks under this CUDA stream (the ticket completes when its kernels have).
    """

    def __init__(self, clock: Clock | None = None, name: str = "fallbackformer-hedge", cuda_stream: Any = None) -> None:
        if cuda_stream is not None:
            _require_cuda("DeadlineWorker(cuda_stream=...)")
        self.clock = clock or MonotonicClock()
        self.name = name
        self.cuda_stream = cuda_stream
        self._state = _thread.allocate_lock()  # guards _task, _busy, _current, _closed
        self._go = _thread.allocate_lock()  # held while there is nothing to do; released to start the thread
        self._go.acquire()
        self._task: tuple[Ticket, Callable[..., Any], tuple, dict, bool, bool, Any] | None = None
        self._busy = False
        self._current: Ticket | None = None  # the ticket of the task running now
        self._closed = False
        self._busy_hook = getattr(self.clock, "worker_busy", None)
        self._idle_hook = getattr(self.clock, "worker_idle", None)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a task is running (or handed over and not yet finished)."""
        return self._busy

    @property
    def stuck(self) -> bool:
        """Whether the task running now was given up by its caller (timed out and cancelled)."""
        with self._state:
            current = self._current
            return self._busy and current is not None and current.cancelled.is_set()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Ticket | None:
        """Start ``fn(*args, **kwargs)`` now, or return ``None`` at once if busy or closed."""
        with self._state:
            if self._busy or self._closed:
                return None
            self._busy = True
            ticket = Ticket(self.clock)
            self._current = ticket
            caller_event = None
            if self.cuda_stream is not None:
                caller_event = torch.cuda.Event()
                caller_event.record()  # the inputs were produced on the caller's stream
            self._task = (
                ticket,
                fn,
                args,
                kwargs,
                torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(),
                caller_event,
            )
            if self._busy_hook is not None:
                self._busy_hook(self._thread.ident)
        self._go.release()  # (held: the worker was idle, so it is waiting on it or about to)
        return ticket

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            with self._state:
                task, self._task = self._task, None
            if task is None:  # closed while idle
                return
            ticket, fn, args, kwargs, grad, inference, caller_event = task
            try:  # (the guard, not the torch.inference_mode wrapper: it is on every hedged call's path)
                with torch._C._InferenceMode(True) if inference else torch.set_grad_enabled(grad):
                    if self.cuda_stream is None:
                        ticket.value = fn(*args, **kwargs)
                    else:
                        self.cuda_stream.wait_event(caller_event)
                        with torch.cuda.stream(self.cuda_stream):
                            ticket.value = fn(*args, **kwargs)
                            done = torch.cuda.Event()
                            done.record(self.cuda_stream)
                            ticket.cuda_event = done
            except BaseException as err:  # noqa: BLE001 - reported to the caller, never raised here
                ticket.error = err
            finally:
                ticket._finish()
                with self._state:
                    self._busy = False
                    self._current = None
                    closed = self._closed
                    if self._idle_hook is not None:
                        self._idle_hook(self._thread.ident)
            # drop the finished task's references while idle (they would keep its model alive)
            task = ticket = fn = args = kwargs = caller_event = None  # type: ignore[assignment]
            if closed:
                return

    def close(self, timeout_s: float | None = 0.0) -> None:
        """Stop taking work; the thread ends after its current task (joined up to ``timeout_s``)."""
        with self._state:
            wake = not self._closed and not self._busy  # an idle thread waits on _go: release it once
            self._closed = True
        if wake:
            self._go.release()
        if timeout_s is None or timeout_s > 0:
            self._thread.join(timeout_s)


class Hedger:
    """A small pool of :class:`DeadlineWorker` s, created lazily, with counters.

    Args:
        max_workers: healthy tasks that may run at once; beyond that :meth:`submit` refuses (``None``).
        clock: the clock of the deadlines.
        name: thread name prefix.
        cuda_streams: give each worker its own side CUDA stream (needs CUDA).
        max_stuck: the bulkhead: a worker whose task was cancelled (its caller timed out) is *stuck*
            until the task returns; the pool grows by up to this many workers beside stuck ones, so
            stalls do not starve healthy calls. The threads a hanging task can hold are bounded by
            ``max_workers + max_stuck``.
    """

    def __init__(
        self,
        max_workers: int = 1,
        clock: Clock | None = None,
        name: str = "fallbackformer-hedge",
        cuda_streams: bool = False,
        max_stuck: int = 0,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"Hedger max_workers must be >= 1; got {max_workers!r}")
        if max_stuck < 0:
            raise ValueError(f"Hedger max_stuck must be >= 0; got {max_stuck!r}")
        self.max_stuck = int(max_stuck)
        if cuda_streams:
            _require_cuda("Hedger(cuda_streams=True)")
        self.max_workers = int(max_workers)
        self.clock = clock or MonotonicClock()
        self.name = name
        self.cuda_streams = cuda_streams
        self._lock = threading.Lock()
        self._workers: list[DeadlineWorker] = []
        self._closed = False
        self.submitted = 0
        self.refused = 0
        self.timeouts = 0

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Ticket | None:
        """Start ``fn`` on an idle worker, or return ``None`` at once when all are busy (counted)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"Hedger {self.name!r} is closed; create a new one")
            for worker in self._workers:
                ticket = worker.submit(fn, *args, **kwargs)
                if ticket is not None:
                    self.submitted += 1
                    return ticket
            n = len(self._workers)  # every one of them is busy here
            if n < self.max_workers or (
                n < self.max_workers + self.max_stuck and sum(w.stuck for w in self._workers) > n - self.max_workers
            ):
                stream = torch.cuda.Stream() if self.cuda_streams else None
                worker = DeadlineWorker(self.clock, f"{self.name}-{len(self._workers)}", cuda_stream=stream)
                self._workers.append(worker)
                ticket = worker.submit(fn, *args, **kwargs)
                if ticket is not None:
                    self.submitted += 1
                    return ticket
            self.refused += 1
            return None

    def run(self, fn: Callable[..., Any], deadline_ns: int, *args: Any, **kwargs: Any) -> HedgeResult:
        """Run ``fn`` on a worker and return its result, or a timeout at ``deadline_ns``.

        On a timeout the task is cancelled (cooperatively) and keeps its worker until it returns.
        """
        start = self.clock.now_ns()
        ticket = self.submit(fn, *args, **kwargs)
        if ticket is None:
            return HedgeResult(HedgeStatus.BUSY, elapsed_ms=(self.clock.now_ns() - start) / NS_PER_MS)
        result = ticket.wait(deadline_ns)
        if result.status == HedgeStatus.TIMEOUT:
            ticket.cancel()
            with self._lock:
                self.timeouts += 1
        return result

    def shutdown(self, end_monotonic: float) -> None:
        """Close, cancel the running tasks and join the threads until ``end_monotonic`` (real time).

        Used at interpreter exit: a thread killed inside a torch operator aborts the process.
        """
        self.close()
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            current = worker._current
            if current is not None:
                current.cancel()
        for worker in workers:
            worker._thread.join(max(0.0, end_monotonic - time.monotonic()))

    def note_timeout(self) -> None:
        """Count a timeout observed by a caller that waited on a ticket itself."""
        with self._lock:
            self.timeouts += 1

    @property
    def busy_workers(self) -> int:
        """Workers running a task now (a hung task keeps its worker busy)."""
        with self._lock:
            return sum(w.busy for w in self._workers)

    def stats(self) -> dict[str, int]:
        """Counters: submitted, refused (all workers busy), timeouts, workers, busy_workers, stuck."""
        with self._lock:
            workers = list(self._workers)
            out = {"submitted": self.submitted, "refused": self.refused, "timeouts": self.timeouts}
        out["workers"] = len(workers)
        out["busy_workers"] = sum(w.busy for w in workers)
        out["stuck"] = sum(w.stuck for w in workers)
        return out

    def close(self, timeout_s: float | None = 0.0) -> None:
        """Stop every worker after its current task (hung ones are daemon threads and are left)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        for worker in workers:
            worker.close(timeout_s)


class SideStream:
    """Launch a callable on a side CUDA stream from the calling thread, and wait for it with a deadline.

    Kernel launches are asynchronous, so :meth:`launch` returns as soon as the work is queued; the
    returned ticket completes when a CUDA event recorded after the work has completed (polled with
    ``event.query()``). Typical use: launch the student on the side stream, run the primary on the
    current stream, and at the deadline take whichever is ready.

    Raises:
        RuntimeError: without CUDA (use :class:`Hedger` with a worker thread on CPU).
    """

    def __init__(self, device: torch.device | int | None = None, clock: Clock | None = None) -> None:
        _require_cuda("SideStream")
        self.stream = torch.cuda.Stream(device=device)
        self.clock = clock or MonotonicClock()

    def launch(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Ticket:
        """Queue ``fn(*args, **kwargs)`` on the side stream after the current stream's pending work."""
        ticket = Ticket(self.clock)
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                ticket.value = fn(*args, **kwargs)
                done = torch.cuda.Event()
                done.record(self.stream)
                ticket.cuda_event = done
        except BaseException as err:  # noqa: BLE001 - reported through the ticket
            ticket.error = err
        ticket._finish()
        return ticket
