"""Work off the caller's time: the event dispatcher, and a clean end of the runtime's threads at exit.

:class:`EventDispatcher` hands a call's fallback events to the sinks on its own thread: the caller
only puts one item on a bounded queue (a full queue drops it and counts it, never blocks), so a slow
or blocking sink never holds a call. Sinks that declare ``nonblocking = True`` (an in-memory list, the
JSONL audit sink, which already queues) are given their events on the caller's thread, in order.

At interpreter exit a worker thread still inside a torch operator is killed mid-call, which aborts
the process ("terminate called without an active exception"). :func:`register_for_exit` keeps a weak
reference to each hedger and dispatcher; one ``atexit`` hook closes them, cancels the tasks they run
(a walk stops at its next stage boundary) and joins their threads for a bounded time.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fallbackformer.common.paths import is_fallback
from fallbackformer.runtime.events import EventSink, FallbackEvent
from fallbackformer.runtime.output import FallbackOutput

__all__ = ["EventDispatcher", "build_events", "deliver", "join_outputs", "register_for_exit", "EXIT_JOIN_S"]

#: real seconds the exit hook waits, in all, for the runtime's threads to end
EXIT_JOIN_S = 2.0

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_live_lock = threading.Lock()


def register_for_exit(obj: Any) -> None:
    """Close ``obj`` (a Hedger or an EventDispatcher: ``shutdown(deadline)``) at interpreter exit."""
    with _live_lock:
        _live.add(obj)


@atexit.register
def _shutdown_all() -> None:
    end = time.monotonic() + EXIT_JOIN_S
    with _live_lock:
        objs = list(_live)
    for obj in objs:
        try:
            obj.shutdown(end)
        except Exception:  # noqa: BLE001 - exit must go on
            pass


def build_events(payload: tuple[Any, ...], model_hashes: dict[str, str]) -> list[FallbackEvent]:
    """The events of one call from its payload (see :meth:`FallbackModel._record`): one per fallback
    (:func:`~fallbackformer.common.paths.is_fallback`); the primary's exits and its final head give none."""
    request_id, now, served_by, reason, confidence, budget_ms, elapsed_ms, stage_ms, detail, governance = payload
    events = []
    for i, (who, why) in enumerate(zip(served_by, reason)):
        if not is_fallback(who):
            continue
        c = confidence[i]
        events.append(FallbackEvent(
            request_id=request_id, sample=i, time_unix=now, served_by=who, reason=why, budget_ms=budget_ms,
            elapsed_ms=elapsed_ms, stage_ms=list(stage_ms), confidence=None if c != c else c,
            model_hashes=dict(model_hashes), detail=detail, governance=governance,
        ))
    return events


def deliver(events: Sequence[FallbackEvent], sinks: Sequence[EventSink], on_error: Callable[[], None]) -> None:
    """Give every event to every sink; a sink that raises is counted (``on_error``), never raised."""
    for event in events:
        for sink in sinks:
            try:
                sink.emit(event)
            except Exception:  # noqa: BLE001 - a broken sink must not break serving
                on_error()


class EventDispatcher:
    """A bounded queue and one daemon thread that gives events to slow sinks.

    Args:
        capacity: items the queue holds; a full queue drops the new item and counts it (``dropped``).
        on_error: called (on the dispatcher thread) for each sink that raised.
        name: thread name.
    """

    def __init__(self, capacity: int, on_error: Callable[[], None], name: str = "fallbackformer-events") -> None:
        if capacity < 1:
            raise ValueError(f"EventDispatcher capacity must be >= 1; got {capacity!r}")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self._on_error = on_error
        self._name = name
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.dropped = 0
        self.delivered = 0
        register_for_exit(self)

    def put(self, work: Callable[[], tuple[list[FallbackEvent], Sequence[EventSink]]]) -> None:
        """Queue ``work`` (returns the events and their sinks), never blocking; full or closed: dropped."""
        if self._thread is None:
            self._start()
        if self._closed:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            self.dropped += 1  # (a lost update under threads only undercounts a drop)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            try:
                if work is None:
                    return
                events, sinks = work()
                deliver(events, sinks, self._on_error)
                self.delivered += len(events)
            except Exception:  # noqa: BLE001 - building an event must not kill the dispatcher
                self._on_error()
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait up to ``timeout_s`` real seconds for the queued events to reach the sinks; ``True`` if they did."""
        end = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() >= end:
                return False
            time.sleep(0.001)
        return True

    def shutdown(self, end_monotonic: float) -> None:
        """Stop taking events, deliver what is queued until ``end_monotonic``, and end the thread."""
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=max(0.0, end_monotonic - time.monotonic()))
        except queue.Full:
            return
        thread.join(max(0.0, end_monotonic - time.monotonic()))

    def close(self, timeout_s: float = 1.0) -> None:
        self.shutdown(time.monotonic() + timeout_s)


def join_outputs(parts: list[FallbackOutput]) -> FallbackOutput:
    """One answer from the answers of a split batch's chunks, in order (the first chunk's request id)."""
    width = max(p.logits.shape[1] for p in parts)
    logits = [p.logits if p.logits.shape[1] == width else torch.full((len(p), width), float("nan"), device=p.logits.device)
              for p in parts]
    typed = any(p._prediction_set is not None for p in parts)
    sets = torch.cat([p.prediction_set for p in parts]) if typed and all(
        p.logits.shape[1] == width for p in parts) else None
    return FallbackOutput(
        _prediction_set=sets,
        prediction=torch.cat([p.prediction for p in parts]),
        served_by=[w for p in parts for w in p.served_by],
        reason=[r for p in parts for r in p.reason],
        confidence=torch.cat([p.confidence for p in parts]),
        latency_ms=parts[-1].latency_ms,
        logits=torch.cat(logits),
        request_id=parts[0].request_id,
        signals=sorted({s for p in parts for s in p.signals}),
    )
