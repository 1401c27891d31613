"""The hash chain the JSONL sink writes: chaining, rotation, retention and reopening."""

from __future__ import annotations

from pathlib import Path

import pytest

from fallbackformer.monitoring.audit_chain import (
    GENESIS,
    AuditChain,
    ChainedLogFile,
    chain_files,
    policy_digest,
    record_hash,
)
from fallbackformer.monitoring.sinks import JsonlFileSink, read_jsonl
from fallbackformer.runtime.events import FallbackEvent
from fallbackformer.runtime.policy import Policy


def _event(i: int) -> FallbackEvent:
    return FallbackEvent(f"req-{i}", 0, 1000.0 + i, "student", "low_confidence", 5.0, 1.0,
                         model_hashes={"primary": "ab" * 32, "manifest": "cd" * 32})


def test_chain_links_each_record_to_the_previous() -> None:
    chain = AuditChain()
    a = chain.append({"x": 1})
    b = chain.append({"x": 2})
    assert (a["seq"], a["prev_hash"]) == (1, GENESIS)
    assert (b["seq"], b["prev_hash"]) == (2, a["hash"])
    assert record_hash(b) == b["hash"] and record_hash({**b, "x": 3}) != b["hash"]
    with pytest.raises(ValueError, match="chain field"):
        chain.append({"hash": "x"})


def test_policy_digest_is_stable_and_sensitive() -> None:
    assert policy_digest(Policy(budget_ms=5.0)) == policy_digest(Policy(budget_ms=5.0))
    assert policy_digest(Policy(budget_ms=5.0)) != policy_digest(Policy(budget_ms=6.0))


def test_sink_writes_chain_with_model_and_policy_digests(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    digest = policy_digest(Policy(budget_ms=5.0))
    with JsonlFileSink(log, policy_digest=digest) as sink:
        for i in range(3):
            sink.emit(_event(i))
    recs = read_jsonl(log)
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[0]["prev_hash"] == GENESIS and recs[1]["prev_hash"] == recs[0]["hash"]
    assert recs[2]["policy_digest"] == digest and recs[2]["model_hashes"]["manifest"] == "cd" * 32
    assert all(r["hash"] == record_hash(r) for r in recs)


def test_reopened_sink_continues_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    for i in range(2):
        with JsonlFileSink(log) as sink:
            sink.emit(_event(i))
    a, b = read_jsonl(log)
    assert b["seq"] == 2 and b["prev_hash"] == a["hash"]


def test_rotation_continues_chain_across_files_and_retention_prunes(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    f = ChainedLogFile(log, max_bytes=200, max_files=3)
    for i in range(10):
        f.write_record({"i": i, "pad": "x" * 100})
    f.close()
    files = chain_files(log)
    assert [p.name for p in files] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    recs = [r for p in files for r in read_jsonl(p)]
    assert [r["i"] for r in recs] == [7, 8, 9]  # one 150-byte record per file; older ones pruned
    assert recs[1]["prev_hash"] == recs[0]["hash"] and recs[2]["prev_hash"] == recs[1]["hash"]
    assert recs[0]["seq"] == 8


def test_constructor_rejects_bad_rotation_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ChainedLogFile(tmp_path / "a", max_bytes=0)
    with pytest.raises(ValueError, match="max_files"):
        ChainedLogFile(tmp_path / "a", max_files=0)


def test_policy_digest_of_a_policy_equals_that_of_its_manifest_form() -> None:
    # The sink may be given either: the live Policy, or the bundle manifest's policy dict.
    from fallbackformer.runtime.breaker import BreakerConfig

    p = Policy(budget_ms=5.0, breaker=BreakerConfig(), hedge_slack_ms=float("inf"))
    assert policy_digest(p) == policy_digest(p.to_dict())
