"""Verify a hash-chained audit log (written by :class:`~fallbackformer.monitoring.sinks.JsonlFileSink`).

Records are counted from 1 across the log and its rotated siblings, oldest first (``LOG.N`` ...
``LOG.1``, ``LOG``). The first failure is named:

* a record whose ``hash`` does not match its canonical line was **changed**;
* a record whose ``seq`` skips ahead follows a **removed** record;
* a record whose ``seq`` or ``prev_hash`` does not follow the record before it was **moved**.

With retention (``max_files``) the oldest files are gone: the chain is then checked from the first
kept record, whose ``prev_hash`` and ``seq`` are taken as given (they are recorded, and reported as
``start_seq``/``start_prev_hash`` so an outside anchor can be compared). A hash chain proves order
and integrity of what is there; deleting the *newest* records leaves a shorter valid chain, so
compare ``last_hash`` with a copy kept elsewhere when truncation matters.

>>> verify_records([]).ok
True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fallbackformer.monitoring.audit_chain import GENESIS, chain_files, record_hash

__all__ = ["AuditReport", "verify_log", "verify_records"]


@dataclass
class AuditReport:
    """The verdict on a chain.

    Attributes:
        ok: the chain is intact.
        records: records checked.
        bad_record: the first bad record's number (from 1), ``None`` when intact.
        problem: ``"changed"``, ``"removed"``, ``"moved"`` or ``"unreadable"`` ("" when intact).
        message: one line for a person: what is wrong, where, and what to do.
        files: the files read, oldest first.
        start_seq, start_prev_hash: where the kept chain starts (``GENESIS``/1 unless retention cut it).
        last_hash: the hash of the last record (anchor it elsewhere to detect truncation).
    """

    ok: bool
    records: int
    bad_record: int | None = None
    problem: str = ""
    message: str = ""
    files: list[str] = field(default_factory=list)
    start_seq: int | None = None
    start_prev_hash: str | None = None
    last_hash: str | None = None


def _where(locs: Sequence[tuple[str, int]] | None, i: int) -> str:
    return f" ({locs[i][0]} line {locs[i][1]})" if locs else ""


def verify_records(
    records: Sequence[Any], locations: Sequence[tuple[str, int]] | None = None
) -> AuditReport:
    """Check a chain of parsed records (dicts; anything else is unreadable), first to last.

    Args:
        records: the records in file order.
        locations: ``(file, line)`` of each record, for the message.

    Returns:
        An :class:`AuditReport`.
    """
    n = len(records)
    if n == 0:
        return AuditReport(True, 0, message="empty log: nothing to verify")

    def fail(i: int, problem: str, why: str) -> AuditReport:
        msg = f"record {i + 1}{_where(locations, i)} was {problem}: {why}"
        if problem == "unreadable":
            msg = f"record {i + 1}{_where(locations, i)} is unreadable: {why}"
        return AuditReport(False, n, i + 1, problem, msg + "; restore the log from its backup or investigate tampering")

    prev_hash: str | None = None
    prev_seq: int | None = None
    start = None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not all(k in rec for k in ("seq", "prev_hash", "hash")):
            return fail(i, "unreadable", "it is not a chained JSON record (no seq/prev_hash/hash)")
        if record_hash(rec) != rec["hash"]:
            return fail(i, "changed", f"its content does not match its hash {str(rec['hash'])[:12]}...")
        seq = rec["seq"]
        if i == 0:
            start = (seq, rec["prev_hash"])
            if seq == 1 and rec["prev_hash"] != GENESIS:
                return fail(i, "moved", "it claims to be the first record but does not start from genesis")
        else:
            assert prev_seq is not None
            expected = prev_seq + 1
            if seq != expected:
                later = {r.get("seq") for r in records[i + 1 :] if isinstance(r, dict)}
                if isinstance(seq, int) and seq > expected and expected not in later:
                    gone = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
                    return fail(i, "removed", f"seq {gone} is missing; this position holds seq {seq}")
                return fail(i, "moved", f"it is seq {seq} where seq {expected} belongs (out of order)")
            if rec["prev_hash"] != prev_hash:
                return fail(
                    i - 1, "changed",
                    f"record {i + 1} does not chain to it: it was altered and re-hashed (or replaced)",
                )
        prev_hash, prev_seq = rec["hash"], seq
    assert start is not None
    what = "from genesis" if start[0] == 1 else f"from seq {start[0]} (older files were pruned)"
    return AuditReport(
        True, n, message=f"intact: {n} records, chained {what}",
        start_seq=start[0], start_prev_hash=start[1], last_hash=prev_hash,
    )


def _read(files: Iterable[Path]) -> tuple[list[Any], list[tuple[str, int]]]:
    records: list[Any] = []
    locs: list[tuple[str, int]] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    records.append(None)
                locs.append((f.name, lineno))
    return records, locs


def verify_log(path: str | os.PathLike[str]) -> AuditReport:
    """Verify the log ``path`` and its rotated siblings ``path.1``, ``path.2`` ... (oldest first).

    Raises:
        FileNotFoundError: when neither the log nor a rotated sibling exists.
    """
    files = chain_files(path)
    if not files:
        raise FileNotFoundError(
            f"no audit log at {path} (nor {path}.1 ...); pass the path a JsonlFileSink writes to"
        )
    records, locs = _read(files)
    report = verify_records(records, locs)
    report.files = [str(f) for f in files]
    return report
