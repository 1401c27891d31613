"""Audit sinks: the JSONL file sink writes every fallback event of a model, never blocks, counts drops."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from fallbackformer.monitoring.sinks import CallbackSink, JsonlFileSink, read_jsonl
from fallbackformer.runtime.events import FallbackEvent
from fallbackformer.runtime.testing import build


def _event(i: int, confidence: float | None = 0.5) -> FallbackEvent:
    return FallbackEvent(f"r{i}", 0, 1.0, "student", "low_confidence", 5.0, 1.0, [0.5], confidence)


def test_a_model_writes_one_line_per_fallback_answer(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "events.jsonl"
    model, clock, stages, student = build([1.0, 30.0], student_script=1.0, budget_ms=10.0, hedge="off")
    with JsonlFileSink(path) as sink:
        model.sinks.append(sink)
        model.model_hashes = {"primary": "sha256:abc"}
        out = model(torch.zeros(3, 4))
    rows = read_jsonl(path)
    assert [r["sample"] for r in rows] == [0, 1, 2]
    assert {r["request_id"] for r in rows} == {out.request_id}
    r = rows[0]
    assert (r["served_by"], r["reason"], r["budget_ms"], r["elapsed_ms"]) == ("student", "deadline_exceeded", 10.0, 32.0)
    assert r["stage_ms"] == [1.0, 30.0] and r["model_hashes"] == {"primary": "sha256:abc"}
    assert set(r) == {
        "request_id", "sample", "time_unix", "served_by", "reason", "budget_ms", "elapsed_ms",
        "stage_ms", "confidence", "model_hashes", "detail", "governance",
        "seq", "prev_hash", "hash", "policy_digest",  # the audit chain (monitoring/audit_chain.py)
    }


def test_lines_are_strict_json_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    with JsonlFileSink(path) as sink:
        sink.emit(_event(0, confidence=float("nan")))
    with JsonlFileSink(path) as sink:
        sink.emit(_event(1))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[0]
    assert json.loads(lines[0])["confidence"] is None and json.loads(lines[1])["confidence"] == 0.5


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    sink = JsonlFileSink(tmp_path / "e.jsonl", max_queue=2, autostart=False)
    for i in range(5):
        sink.emit(_event(i))  # the writer is not running: the queue fills up
    assert sink.dropped == 3
    sink.start()
    sink.flush()
    assert sink.stats() == {"written": 2, "dropped": 3, "errors": 0, "write_errors": 0, "queued": 0}
    sink.close()
    assert [r["request_id"] for r in read_jsonl(tmp_path / "e.jsonl")] == ["r0", "r1"]
    with pytest.raises(RuntimeError, match="closed"):
        sink.emit(_event(9))


def test_concurrent_emitters(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    with JsonlFileSink(path) as sink:
        threads = [threading.Thread(target=lambda k=k: [sink.emit(_event(100 * k + i)) for i in range(100)]) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(read_jsonl(path)) == 400 and sink.written == 400


def test_constructor_validates_and_callback_sink_forwards(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_queue"):
        JsonlFileSink(tmp_path / "x.jsonl", max_queue=0)
    seen: list[str] = []
    CallbackSink(lambda e: seen.append(e.reason)).emit(_event(0))
    assert seen == ["low_confidence"]
