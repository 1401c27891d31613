"""The hash chain of an audit log: each record names the digest of the one before it.

A chained record is the event's fields plus three more:

* ``seq``: its number in the chain (1 for the first record ever written, counting across rotated files);
* ``prev_hash``: the ``hash`` of the record before it (:data:`GENESIS` for the first record);
* ``hash``: the sha256 of the record's *canonical line*, the canonical JSON (sorted keys, no
  whitespace, ASCII) of every field but ``hash`` itself. ``prev_hash`` is inside that line, so each
  record's digest covers the whole chain before it.

A changed record no longer matches its own ``hash``; a removed or moved record breaks the next
record's ``prev_hash`` (and its ``seq``). The verifier is :mod:`fallbackformer.governance.audit`.

:class:`ChainedLogFile` is the file a :class:`~fallbackformer.monitoring.sinks.JsonlFileSink` writes:
it chains each record, rotates the file at ``max_bytes`` (``LOG`` -> ``LOG.1`` -> ``LOG.2`` ...; the
first record of a new file chains to the last of the previous one), keeps at most ``max_files`` files
(the oldest are deleted: verification then starts from the oldest kept file's first ``prev_hash``,
which that record holds), and continues the chain of an existing log when a sink reopens it.

>>> chain = AuditChain()
>>> first = chain.append({"reason": "low_confidence"})
>>> first["prev_hash"] == GENESIS, first["hash"] == record_hash(first)
(True, True)
>>> chain.append({"reason": "breaker_open"})["prev_hash"] == first["hash"]
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from fallbackformer.common.jsonsafe import json_safe

__all__ = [
    "GENESIS",
    "AuditChain",
    "ChainedLogFile",
    "canonical_line",
    "chain_files",
    "policy_digest",
    "record_hash",
]

#: ``prev_hash`` of the first record of a chain.
GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "prev_hash", "hash")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_line(record: Mapping[str, Any]) -> str:
    """The canonical JSON of ``record`` without its ``hash`` field: what ``hash`` is taken over."""
    return _canonical({k: v for k, v in record.items() if k != "hash"})


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 (hex) of the record's canonical line."""
    return hashlib.sha256(canonical_line(record).encode("ascii")).hexdigest()


def policy_digest(policy: Any) -> str:
    """sha256 of a policy's canonical JSON (``dataclasses.asdict`` for a dataclass, else a mapping).

    >>> from fallbackformer.runtime.policy import Policy
    >>> len(policy_digest(Policy(budget_ms=5.0)))
    64
    """
    data = dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else dict(policy)
    return hashlib.sha256(_canonical(json_safe(data, "policy")).encode("ascii")).hexdigest()


class AuditChain:
    """Appends ``seq``, ``prev_hash`` and ``hash`` to records, in order.

    Args:
        prev_hash: the hash of the record before the next one (:data:`GENESIS` for a new chain).
        seq: the ``seq`` of the last record written (0 for a new chain).
    """

    def __init__(self, prev_hash: str = GENESIS, seq: int = 0) -> None:
        self.prev_hash = prev_hash
        self.seq = seq

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A chained copy of ``record`` (which must not hold ``seq``, ``prev_hash`` or ``hash``)."""
        clash = [k for k in CHAIN_FIELDS if k in record]
        if clash:
            raise ValueError(f"record already holds chain field(s) {clash}; pass the event's fields only")
        out = dict(record)
        out["seq"] = self.seq + 1
        out["prev_hash"] = self.prev_hash
        out["hash"] = record_hash(out)
        self.seq, self.prev_hash = out["seq"], out["hash"]
        return out


def chain_files(path: str | os.PathLike[str]) -> list[Path]:
    """The log ``path`` and its rotated siblings that exist, oldest first: ``LOG.N, ..., LOG.1, LOG``."""
    path = Path(path)
    rotated: list[Path] = []
    k = 1
    while (sib := path.with_name(f"{path.name}.{k}")).exists():
        rotated.append(sib)
        k += 1
    files = rotated[::-1]
    if path.exists():
        files.append(path)
    return files


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last non-empty line of ``path`` as a dict (read from the end; ``None`` if empty)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        size = min(end, 1 << 16)
        while True:
            f.seek(end - size)
            lines = [ln for ln in f.read(size).splitlines() if ln.strip()]
            if not lines:
                return None
            if len(lines) > 1 or size == end:
                try:
                    return json.loads(lines[-1])
                except json.JSONDecodeError:
                    return None  # a torn last line: the verifier will name it
            size = min(end, size * 4)


class ChainedLogFile:
    """A JSON-lines file that chains, rotates and prunes; file-like for a sink (``flush``, ``fileno``).

    Args:
        path: the log file (``LOG``); rotated files are ``LOG.1`` (newest) ... ``LOG.N`` (oldest).
        chain: add ``seq``/``prev_hash``/``hash`` (``False``: plain lines, no chain).
        policy_digest: recorded in every record as ``policy_digest`` (``None`` when not given).
        max_bytes: rotate before a line would make the file larger than this (``None``: never).
        max_files: files kept, the current one included (``None``: all); older ones are deleted.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chain: bool = True,
        policy_digest: str | None = None,
        max_bytes: int | None = None,
        max_files: int | None = None,
        opener: Callable[[Path], IO[bytes]] | None = None,
    ) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (or None: no rotation); got {max_bytes!r}")
        if max_files is not None and max_files < 1:
            raise ValueError(f"max_files must be >= 1 (or None: keep every file); got {max_files!r}")
        self.path = Path(path)
        self.policy_digest = policy_digest
        self.max_bytes, self.max_files = max_bytes, max_files
        self.chain: AuditChain | None = None
        if chain:
            last = None
            for f in reversed(chain_files(self.path)):
                last = _last_record(f)
                if last is not None:
                    break
            self.chain = AuditChain(
                str(last.get("hash", GENESIS)) if last else GENESIS, int(last.get("seq", 0)) if last else 0
            )
        self._opener = opener or (lambda p: open(p, "ab", buffering=0))  # noqa: SIM115 - closed by close()
        self._file = self._opener(self.path)
        self._size = os.path.getsize(self.path)  # the end of the last whole line

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Chain ``record`` (JSON-safe values; the chain advances) and encode it as one line."""
        body = dict(record)
        if self.chain is not None:
            body["policy_digest"] = self.policy_digest
            body = self.chain.append(body)
        return (json.dumps(body, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")

    def write_record(self, record: Mapping[str, Any]) -> None:
        """Chain, rotate if needed, and write one record (see :meth:`write_records`)."""
        self.write_records([record])

    def write_records(self, records: Sequence[Mapping[str, Any]], fsync: bool = False) -> None:
        """Chain, rotate if needed, write and flush ``records`` as whole lines.

        On a failed write (a full disk) the file is cut back to its last whole line and the chain
        goes back to the last record on disk, then the error is raised: the lines that were lost
        never enter the chain.
        """
        saved = (self.chain.prev_hash, self.chain.seq) if self.chain is not None else None
        try:
            data = b"".join(self.encode(r) for r in records)
            if self.max_bytes is not None and self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
            view = memoryview(data)
            while view:
                n = self._file.write(view)
                view = view[n if n is not None else len(view):]
            self._file.flush()
            if fsync:
                os.fsync(self._file.fileno())
        except BaseException:
            if saved is not None:
                self.chain.prev_hash, self.chain.seq = saved  # type: ignore[union-attr]
            try:
                self._file.truncate(self._size)  # no torn last line
            except Exception:  # the reader skips a torn last line and says so
                pass
            raise
        self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        files = chain_files(self.path)
        n_rotated = len(files) - 1
        keep_rotated = None if self.max_files is None else self.max_files - 1
        for k in range(n_rotated, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{k}")
            if keep_rotated is not None and k + 1 > keep_rotated:
                src.unlink()
            else:
                os.replace(src, self.path.with_name(f"{self.path.name}.{k + 1}"))
        if keep_rotated == 0:
            self.path.unlink()
        else:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self._opener(self.path)
        self._size = 0

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed
