"""Audit sinks for :class:`~fallbackformer.runtime.events.FallbackEvent`: a JSON-lines file and helpers.

A sink takes events on the serving path, so it must never make a call slow: :class:`JsonlFileSink`
only puts the event on a bounded queue; a background thread writes the lines and flushes them. When
the queue is full (a disk that stalls) the event is dropped and counted, never waited for: the answer
is worth more than its audit line, and the count says how many lines are missing.

A write that fails (a full disk) is counted in ``write_errors`` (lines lost) and leaves no torn line:
the file is cut back to its last whole line. ``written`` counts lines that reached the file (after
the flush). ``close()`` returns within its timeout even when the disk does not answer.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "fallbacks.jsonl"
>>> with JsonlFileSink(path) as sink:
...     sink.emit(FallbackEvent("req-1", 0, 0.0, "student", "deadline_exceeded", 5.0, 5.2))
>>> read_jsonl(path)[0]["reason"]
'deadline_exceeded'
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fallbackformer.common.jsonsafe import json_safe
from fallbackformer.monitoring.audit_chain import ChainedLogFile
from fallbackformer.runtime.events import EventSink, FallbackEvent, ListSink

__all__ = ["CallbackSink", "EventSink", "JsonlFileSink", "ListSink", "read_jsonl"]

_STOP = object()


def _open_append(path: Path) -> IO[bytes]:
    """The default opener: unbuffered binary append (each write goes to the OS as it is made)."""
    return open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()


def _prepare_parent(path: Path) -> None:
    """Create the log's folder, or say plainly why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), path.parent)
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"cannot create the audit log {path}: {blocker} is a file, not a folder. Choose a log path "
            f"inside a folder (e.g. {blocker.parent / 'audit' / path.name})",
        ) from None
    except PermissionError:
        raise PermissionError(
            errno.EACCES,
            f"cannot create the folder of the audit log {path}: permission denied. Choose a path you can "
            "write to, or create the folder with the right owner first",
        ) from None


class JsonlFileSink:
    """Append each event as one JSON object per line, written by a background thread.

    Args:
        path: the file (created with its parent directories; appended to if it exists).
        max_queue: events waiting to be written at most; beyond it events are dropped and counted.
        flush_every: write buffered lines to the OS at least every this many seconds.
        fsync: also ``os.fsync`` on every flush (durable on power loss; slower).
        autostart: start the writer thread now (tests start it later to fill the queue).
        close_timeout: the most seconds ``close()`` waits for the writer.
        chain: hash-chain the records (``seq``, ``prev_hash``, ``hash``, ``policy_digest``; see
            :mod:`fallbackformer.monitoring.audit_chain`); verify with ``scripts/audit.py verify``.
            A batch lost to a failed write leaves the chain where the disk has it.
        policy_digest: the serving policy's digest to record in every line
            (:func:`~fallbackformer.monitoring.audit_chain.policy_digest` of ``model.policy``).
        max_bytes: rotate the file before it would grow past this (``LOG`` -> ``LOG.1`` ...); the
            chain continues into the new file. ``None``: never rotate.
        max_files: files kept, the current one included; older rotated files are deleted (the
            verifier then starts from the oldest kept record's ``prev_hash``). ``None``: keep all.
        opener: opens the file for binary append (default: unbuffered ``open(path, "ab")``);
            tests inject a file that fails, as a full disk does.

    Attributes:
        written: lines on disk (counted after the flush). dropped: events dropped because the queue
        was full. write_errors: lines lost to failed writes. errors: failed writes and flushes (the
        sink keeps going; the last error is in ``last_error``).
    """

    nonblocking = True  # (emit only queues: the model gives it events on the caller's thread, in order)

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_queue: int = 10_000,
        flush_every: float = 0.5,
        fsync: bool = False,
        autostart: bool = True,
        close_timeout: float = 5.0,
        opener: Callable[[Path], IO[bytes]] | None = None,
        chain: bool = True,
        policy_digest: str | None = None,
        max_bytes: int | None = None,
        max_files: int | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"JsonlFileSink max_queue must be >= 1; got {max_queue!r}")
        if not flush_every > 0:
            raise ValueError(f"JsonlFileSink flush_every must be > 0 seconds; got {flush_every!r}")
        if not close_timeout >= 0:
            raise ValueError(f"JsonlFileSink close_timeout must be >= 0 seconds; got {close_timeout!r}")
        self.path = Path(path)
        _prepare_parent(self.path)
        if self.path.is_dir():
            raise IsADirectoryError(
                errno.EISDIR, f"the audit log {self.path} is a folder; name a file inside it (e.g. {self.path / 'audit.jsonl'})"
            )
        self.flush_every = float(flush_every)
        self.fsync = fsync
        self.close_timeout = float(close_timeout)
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.write_errors = 0
        self.last_error: str = ""
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._file = ChainedLogFile(  # closed by close()
            self.path, chain=chain, policy_digest=policy_digest, max_bytes=max_bytes, max_files=max_files,
            opener=opener or _open_append,
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
        while True:
            try:
                item = self._queue.get(timeout=self.flush_every)
            except queue.Empty:
                continue
            batch = [item]
            while item is not _STOP and len(batch) < 512:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            records = [r for r in batch if r is not _STOP]
            try:
                if records:
                    self._write_lines(records)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if batch[-1] is _STOP:
                return

    def _write_lines(self, records: list[dict[str, Any]]) -> None:
        """Write and flush ``records``; on failure count them lost (the file is cut back to whole lines)."""
        try:
            self._file.write_records([json_safe(r, "event") for r in records], fsync=self.fsync)
        except Exception as exc:  # a full disk must not kill the writer; count it
            self.errors += 1
            self.write_errors += len(records)
            self.last_error = f"{type(exc).__name__}: {exc}"
            return
        self.written += len(records)

    def flush(self) -> None:
        """Block until every queued event is written and flushed (tests, shutdown; not the hot path)."""
        if self._thread is None:
            raise RuntimeError("JsonlFileSink.flush() before start(): nothing would write the queue")
        self._queue.join()

    def close(self, timeout: float | None = None) -> bool:
        """Write what is queued, stop the writer and close the file (idempotent).

        Args:
            timeout: the most seconds to wait for the writer (default: ``close_timeout``).

        Returns:
            ``True`` if the writer finished in time; ``False`` if it did not (a disk that does not
            answer): the lines still queued are counted as ``dropped`` and the file is left to the
            writer thread, which ends with the process.
        """
        if self._closed:
            return self._thread is None or not self._thread.is_alive()
        self._closed = True
        self.start()
        assert self._thread is not None
        wait = self.close_timeout if timeout is None else max(0.0, float(timeout))
        deadline = threading.TIMEOUT_MAX if wait >= threading.TIMEOUT_MAX else wait
        try:
            self._queue.put(_STOP, timeout=deadline)
        except queue.Full:
            pass
        self._thread.join(deadline)
        if self._thread.is_alive():
            self.dropped += self._queue.qsize()
            self.last_error = self.last_error or f"close() timed out after {wait:g} s"
            return False
        try:
            self._file.close()
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        self._finalizer.detach()
        return True

    def stats(self) -> dict[str, Any]:
        """Counters: written, dropped, errors, write_errors, queued."""
        return {
            "written": self.written,
            "dropped": self.dropped,
            "errors": self.errors,
            "write_errors": self.write_errors,
            "queued": self._queue.qsize(),
        }

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
                file.write_records([json_safe(item, "record")])
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
    """Read the events a :class:`JsonlFileSink` wrote, as dicts, in order.

    A torn last line (a write cut short by a crash) is skipped with a warning naming it; a bad line
    anywhere else raises ``ValueError`` naming the line.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # no newline after it: the last write was cut short
                warnings.warn(f"{path}: skipped a torn last line ({len(line)} bytes, {exc.msg})", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({exc.msg}); the log was edited or corrupted") from None
    return rows
