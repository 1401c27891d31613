"""Audit sinks for :class:`~fallbackformer.runtime.events.FallbackEvent`: a JSON-lines file and helpers.

A sink takes events on the serving path, so it must never make a call slow: :class:`JsonlFileSink`
only puts the event on a bounded queue; a background thread writes the lines and flushes them. When
the queue is full (a disk that stalls) the event is dropped and counted, never waited for: the answer
is worth more than its audit line, and the count says how many lines are missing.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "fallbacks.jsonl"
>>> with JsonlFileSink(path) as sink:
...     sink.emit(FallbackEvent("req-1", 0, 0.0, "student", "deadline_exceeded", 5.0, 5.2))
>>> read_jsonl(path)[0]["reason"]
'deadline_exceeded'
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fallbackformer.monitoring.audit_chain import ChainedLogFile
from fallbackformer.runtime.events import EventSink, FallbackEvent, ListSink

__all__ = ["CallbackSink", "EventSink", "JsonlFileSink", "ListSink", "read_jsonl"]

_STOP = object()


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class JsonlFileSink:
    """Append each event as one JSON object per line, written by a background thread.

    Args:
        path: the file (created with its parent directories; appended to if it exists).
        max_queue: events waiting to be written at most; beyond it events are dropped and counted.
        flush_every: write buffered lines to the OS at least every this many seconds.
        fsync: also ``os.fsync`` on every flush (durable on power loss; slower).
        autostart: start the writer thread now (tests start it later to fill the queue).
        chain: hash-chain the records (``seq``, ``prev_hash``, ``hash``, ``policy_digest``; see
            :mod:`fallbackformer.monitoring.audit_chain`); verify with ``scripts/audit.py verify``.
        policy_digest: the serving policy's digest to record in every line
            (:func:`~fallbackformer.monitoring.audit_chain.policy_digest` of ``model.policy``).
        max_bytes: rotate the file before it would grow past this (``LOG`` -> ``LOG.1`` ...); the
            chain continues into the new file. ``None``: never rotate.
        max_files: files kept, the current one included; older rotated files are deleted (the
            verifier then starts from the oldest kept record's ``prev_hash``). ``None``: keep all.

    Attributes:
        written: lines written. dropped: events dropped because the queue was full.
        errors: write failures (the sink keeps going; the last error is in ``last_error``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_queue: int = 10_000,
        flush_every: float = 0.5,
        fsync: bool = False,
        autostart: bool = True,
        chain: bool = True,
        policy_digest: str | None = None,
        max_bytes: int | None = None,
        max_files: int | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"JsonlFileSink max_queue must be >= 1; got {max_queue!r}")
        if not flush_every > 0:
            raise ValueError(f"JsonlFileSink flush_every must be > 0 seconds; got {flush_every!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every = float(flush_every)
        self.fsync = fsync
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.last_error: str = ""
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._file = ChainedLogFile(  # closed by close()
            self.path, chain=chain, policy_digest=policy_digest, max_bytes=max_bytes, max_files=max_files
        )
        self._thread: threading.Thread | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._queue, self._file)
        if autostart:
            self.start()

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"jsonl-sink:{self.path.name}", daemon=True)
            self._thread.start()

    def emit(self, event: FallbackEvent) -> None:
        """Queue ``event`` for writing; never blocks (a full queue drops it and counts it)."""
        if self._closed:
            raise RuntimeError(f"JsonlFileSink for {self.path} is closed; create a new sink")
        try:
            self._queue.put_nowait(event.to_dict())
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        pending = 0
        while True:
            try:
                item = self._queue.get(timeout=self.flush_every)
            except queue.Empty:
                item = None
            try:
                if item is _STOP:
                    self._flush_file()
                    return  # (the finally below marks it done)
                if item is not None:
                    self._file.write_record(_json_safe(item))
                    self.written += 1
                    pending += 1
                if pending and (item is None or self._queue.empty()):
                    self._flush_file()
                    pending = 0
            except Exception as exc:  # a full disk must not kill the writer; count it
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                if item is not None:
                    self._queue.task_done()

    def _flush_file(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def flush(self) -> None:
        """Block until every queued event is written and flushed (tests, shutdown; not the hot path)."""
        if self._thread is None:
            raise RuntimeError("JsonlFileSink.flush() before start(): nothing would write the queue")
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, stop the writer and close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.start()
        self._queue.put(_STOP)  # waits for room: close is not on the hot path
        assert self._thread is not None
        self._thread.join()
        self._file.close()
        self._finalizer.detach()

    def stats(self) -> dict[str, Any]:
        """Counters: written, dropped, errors, queued."""
        return {"written": self.written, "dropped": self.dropped, "errors": self.errors, "queued": self._queue.qsize()}

    def __enter__(self) -> JsonlFileSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JsonlFileSink({str(self.path)!r}, written={self.written}, dropped={self.dropped})"


def _shutdown(q: queue.Queue[Any], file: Any) -> None:
    """Finalizer of a sink that was never closed (interpreter exit): best-effort write of the queue."""
    try:
        while True:
            item = q.get_nowait()
            if item is not _STOP:
                file.write_record(_json_safe(item))
    except queue.Empty:
        pass
    except Exception:  # at exit there is nobody to tell
        pass
    try:
        file.flush()
        file.close()
    except Exception:
        pass


class CallbackSink:
    """Calls ``fn(event)`` for each event (metrics counters, alerting); exceptions reach the model,
    which counts them as ``sink_errors`` and keeps serving."""

    def __init__(self, fn: Callable[[FallbackEvent], Any]) -> None:
        self.fn = fn

    def emit(self, event: FallbackEvent) -> None:
        self.fn(event)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the events a :class:`JsonlFileSink` wrote, as dicts, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
