"""Records: the runtime's counters and the fallback events of every answer.

Every answer is tallied (who served each sample, why); the tallies are queued per call and counted
in batches of :data:`TALLY_BATCH`, and :meth:`Records.counters` always counts them all. Every
fallback (an answer not served by the primary's own path, :func:`~fallbackformer.common.paths.is_fallback`)
becomes one :class:`~fallbackformer.runtime.events.FallbackEvent`: sinks that declare
``nonblocking = True`` get them on the caller's thread, in order; the others on the event
dispatcher's thread, never on the caller's time (a full queue drops and counts).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

from fallbackformer.common.paths import fallback_count, is_fallback
from fallbackformer.runtime.dispatch import EventDispatcher, build_events, deliver
from fallbackformer.runtime.events import EventSink
from fallbackformer.runtime.output import FallbackOutput
from fallbackformer.runtime.request_state import RequestState

__all__ = ["TALLY_BATCH", "Records"]

#: calls whose answers are tallied into the counters in one pass (stats() always counts them all)
TALLY_BATCH = 64


class Records:
    """Counters since construction and the delivery of events to sinks (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served_counts: Counter[str] = Counter()
        self.reason_counts: Counter[str] = Counter()
        self.signal_counts: Counter[str] = Counter()
        self.calls = 0
        self.sink_errors = 0
        self.concurrency_refused = 0
        # per call (served_by, reasons), counted into the counters above in batches
        self._tallies: deque[tuple[tuple[str, ...], tuple[str, ...]]] = deque()
        self._dispatcher: EventDispatcher | None = None

    def _tally_locked(self) -> None:
        """Count the queued answers into the counters (held lock)."""
        tallies, served_counts, reason_counts = self._tallies, self.served_counts, self.reason_counts
        calls = 0
        while True:
            try:
                served_by, reasons = tallies.popleft()  # (atomic: a concurrent append is never lost)
            except IndexError:
                break
            calls += 1
            if len(served_by) == 1 or len(set(served_by)) == 1:
                served_counts[served_by[0]] += len(served_by)
            else:
                served_counts.update(served_by)
            if reasons[0] or len(reasons) > 1:
                reason_counts.update(r for r in reasons if r)
        self.calls += calls

    def counters(self) -> dict[str, Any]:
        """Calls, answers by path, fallbacks by reason, signals, sink errors, refusals, dropped events."""
        with self.lock:
            self._tally_locked()
            total = sum(self.served_counts.values())
            fallbacks = sum(n for who, n in self.served_counts.items() if is_fallback(who))
            dispatcher = self._dispatcher
            return {
                "calls": self.calls,
                "answers": total,
                "served_by": dict(self.served_counts),
                "reasons": dict(self.reason_counts),
                "fallback_rate": fallbacks / total if total else 0.0,
                "sink_errors": self.sink_errors,
                "signals": dict(self.signal_counts),
                "concurrency_refused": self.concurrency_refused,
                "events_dropped": 0 if dispatcher is None else dispatcher.dropped,
            }

    def count_signals(self, fired: Iterable[str]) -> None:
        with self.lock:
            self.signal_counts.update(fired)

    def count_refused(self) -> None:
        with self.lock:
            self.concurrency_refused += 1

    def count_sink_error(self) -> None:
        with self.lock:
            self.sink_errors += 1

    def record(self, out: FallbackOutput, state: RequestState, budget_ms: float, sinks: Sequence[EventSink],
               model_hashes: dict[str, str], governance: Any, event_queue: int) -> None:
        """Tally the answer (in batches) and emit its events.

        Args:
            governance: the governor (``event_state()`` goes into each event), or ``None``.
            event_queue: the dispatcher's capacity, when it is made.
        """
        tallies = self._tallies
        tallies.append((tuple(out.served_by), tuple(out.reason)))  # (atomic; copies: the caller owns out)
        if len(tallies) >= TALLY_BATCH:
            with self.lock:
                self._tally_locked()
        if not sinks or not fallback_count(out.served_by):
            return
        extra = governance.event_state() if governance is not None else {}  # (issue 14)
        payload = (out.request_id, time.time(), tuple(out.served_by), tuple(out.reason), out.confidence.tolist(),
                   budget_ms, out.latency_ms, state.stage_ms_snapshot(), state.detail, extra)
        inline = [sink for sink in sinks if getattr(sink, "nonblocking", False)]
        if inline:  # an in-memory list or a queueing sink: in order, on this thread, never blocking
            deliver(build_events(payload, model_hashes), inline, self.count_sink_error)
        queued = [sink for sink in sinks if not getattr(sink, "nonblocking", False)]
        if queued:
            self._get_dispatcher(event_queue).put(lambda: (build_events(payload, model_hashes), queued))

    def _get_dispatcher(self, capacity: int) -> EventDispatcher:
        dispatcher = self._dispatcher
        if dispatcher is None:
            with self.lock:
                if self._dispatcher is None:
                    self._dispatcher = EventDispatcher(capacity, _SinkErrors(self))
                    weakref.finalize(self, EventDispatcher.close, self._dispatcher, 0.0).atexit = False
                dispatcher = self._dispatcher
        return dispatcher

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` real seconds until the queued events reached the sinks."""
        dispatcher = self._dispatcher
        return True if dispatcher is None else dispatcher.flush(timeout_s)

    def close(self, timeout_s: float | None) -> None:
        """Stop the dispatcher (queued events are delivered for a bounded time)."""
        with self.lock:
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.close(max(timeout_s or 0.0, 0.1))


class _SinkErrors:
    """Counts a sink's failure on its records, through a weak reference (the dispatcher outlives nothing)."""

    def __init__(self, records: Records) -> None:
        self._records = weakref.ref(records)

    def __call__(self) -> None:
        records = self._records()
        if records is not None:
            records.count_sink_error()
