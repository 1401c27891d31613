"""Issue 12, the audit log: a full disk (simulated by an injected file object), a close that must
return, a torn last line, and a log path under a file."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from fallbackformer.monitoring import sinks as sinks_mod
from fallbackformer.monitoring.sinks import JsonlFileSink, read_jsonl
from fallbackformer.runtime.events import FallbackEvent


def _event(i: int) -> FallbackEvent:
    return FallbackEvent(f"r{i}", 0, 1.0, "student", "low_confidence", 5.0, 1.0, [0.5], 0.5)


class _FullDisk:
    """A file that takes ``capacity`` bytes in all, then writes what fits and raises ENOSPC."""

    def __init__(self, path, capacity: int, fail_flush: bool = False) -> None:
        self.f = open(path, "ab", buffering=0)  # noqa: SIM115
        self.capacity, self.fail_flush = capacity, fail_flush

    def write(self, data):
        data = data.encode() if isinstance(data, str) else bytes(data)
        room = self.capacity - os.fstat(self.f.fileno()).st_size
        if len(data) > room:
            self.f.write(data[: max(room, 0)])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.f.write(data)
        return len(data)

    def flush(self):
        if self.fail_flush:
            raise OSError(errno.ENOSPC, "No space left on device")

    def truncate(self, size):
        return self.f.truncate(size)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()


def _opener(factory):
    """An ``open`` for the sink module: appends go to ``factory(path)``, reads to the real file."""
    import builtins

    def fake_open(path, mode="r", *args, **kwargs):
        return factory(path) if "a" in mode else builtins.open(path, mode, *args, **kwargs)

    return fake_open


def _inject(monkeypatch, capacity: int, fail_flush: bool = False) -> None:
    """Every append-open of the sink module goes to a disk that fills after ``capacity`` bytes."""
    monkeypatch.setattr(sinks_mod, "open", _opener(lambda p: _FullDisk(p, capacity, fail_flush)), raising=False)


def _close_in_thread(sink: JsonlFileSink, wait: float = 30.0) -> bool:
    t = threading.Thread(target=sink.close, daemon=True)
    t.start()
    t.join(wait)
    return not t.is_alive()


def test_a_full_disk_counts_lost_lines_and_leaves_no_torn_line(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "audit.jsonl"
    from fallbackformer.monitoring.audit_chain import ChainedLogFile

    probe = ChainedLogFile(tmp_path / "probe.jsonl")  # the sink chains its lines by default
    line = len(probe.encode(_event(0).to_dict()))
    probe.close()
    _inject(monkeypatch, capacity=int(2.5 * line))
    sink = JsonlFileSink(path, autostart=False)
    for i in range(2):
        sink.emit(_event(i))
    sink.start()
    sink.flush()  # the first two lines fit
    for i in range(2, 6):
        sink.emit(_event(i))
    sink.flush()
    assert _close_in_thread(sink)
    text = path.read_bytes()
    assert text.endswith(b"\n"), "a torn last line was left in the log"
    rows = read_jsonl(path)
    assert sink.written == len(rows) == 2, (sink.written, len(rows))
    assert getattr(sink, "write_errors", None) == 4
    assert "No space left" in sink.last_error


def test_close_returns_when_every_flush_fails(tmp_path: Path, monkeypatch) -> None:
    _inject(monkeypatch, capacity=10**6, fail_flush=True)
    sink = JsonlFileSink(tmp_path / "audit.jsonl")
    sink.emit(_event(0))
    assert _close_in_thread(sink), "close() never returned on a disk whose flush fails"
    assert sink.written == 0 and sink.errors >= 1


def test_close_returns_within_its_timeout_when_the_disk_hangs(tmp_path: Path, monkeypatch) -> None:
    release = threading.Event()

    class _Hang(_FullDisk):
        def write(self, data):
            release.wait(30.0)
            return super().write(data)

    monkeypatch.setattr(sinks_mod, "open", _opener(lambda p: _Hang(p, 10**6)), raising=False)
    sink = JsonlFileSink(tmp_path / "audit.jsonl", max_queue=1)
    sink.emit(_event(0))
    sink.emit(_event(1))
    try:
        t = threading.Thread(target=lambda: sink.close(timeout=0.2), daemon=True)
        t.start()
        t.join(20.0)
        assert not t.is_alive(), "close(timeout=0.2) did not return while the disk hung"
    finally:
        release.set()


def test_the_reader_skips_and_reports_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": [1, 2')
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_a_log_path_under_a_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    with pytest.raises(NotADirectoryError, match=r"audit log .*passwd/audit\.jsonl: .*passwd is a file, not a folder"):
        JsonlFileSink(tmp_path / "passwd" / "audit.jsonl")
    if Path("/etc/passwd").is_file():
        with pytest.raises(NotADirectoryError, match=r"/etc/passwd is a file, not a folder"):
            JsonlFileSink("/etc/passwd/audit.jsonl")
