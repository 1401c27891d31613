"""Overload: the concurrency limit is a semaphore sized to the cores, and a shed call is a recorded default.

Deterministic: stages and students block on scripted hangs released by the test (a real-time safety
timer only turns a would-be hang into a failure); no assertion reads a clock.
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

import fallbackformer as ff
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import HANG, MonotonicClock
from fallbackformer.runtime.events import ListSink
from fallbackformer.runtime.policy import CORES, usable_cores
from fallbackformer.runtime.testing import build
from fallbackformer.runtime.validation import InputSpec, InvalidInputError
from fallbackformer.runtime.warm import freeze_heap

X = torch.zeros(1, 4)


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "the other thread never got there"
        time.sleep(0.001)


def test_the_default_limit_is_one_call_per_core_and_a_bundle_keeps_the_word():
    policy = ff.Policy()
    assert policy.max_concurrency == CORES and policy.concurrency_limit == usable_cores() >= 1
    assert ff.Policy.from_dict(policy.to_dict()).max_concurrency == CORES  # not this machine's count
    assert ff.Policy(max_concurrency=3).concurrency_limit == 3 and ff.Policy(max_concurrency=None).concurrency_limit is None
    for bad in ("all", 0, True, 2.5):
        with pytest.raises(ValueError, match="max_concurrency.*'cores'"):
            ff.Policy(max_concurrency=bad)


def test_a_call_over_the_limit_holds_no_slot():
    """One slot: A walks the primary (held), B is over it and stuck in the student; once A is done the
    next call walks the primary although B is still in flight (counting every call in flight would
    have sent it, and every call of a busy model, to the student)."""
    model, _, stages, student = build([[HANG, 0.0]], student_script=[HANG, 0.0], clock=MonotonicClock(),
                                      budget_ms=1e6, hedge="off", max_concurrency=1)
    timer = threading.Timer(10.0, lambda: (stages[0].release(), student.release()))
    timer.daemon = True
    timer.start()
    got: dict[str, ff.FallbackOutput] = {}
    a = threading.Thread(target=lambda: got.update(a=model(X)), daemon=True)
    b = threading.Thread(target=lambda: got.update(b=model(X)), daemon=True)
    try:
        a.start()
        _wait_for(lambda: stages[0].calls == 1)  # A holds the slot, hung in the primary
        b.start()
        _wait_for(lambda: student.calls == 1)  # B: over the limit, hung in the student
        stages[0].release()
        a.join(10.0)
        assert got["a"].served_by == [R.PRIMARY]
        out = model(X)  # B is still in flight, but holds no slot
        assert out.served_by == [R.PRIMARY] and student.calls == 1
    finally:
        stages[0].release()
        student.release()
        timer.cancel()
        b.join(10.0)
    assert got["b"].served_by == [R.STUDENT] and got["b"].reason == [R.DEADLINE_PREDICTED]
    assert model.stats()["concurrency_refused"] == 1 and model(X).served_by == [R.PRIMARY]


def test_shed_answers_the_default_at_once_and_records_it():
    model, _, stages, student = build([1.0], student_script=1.0, budget_ms=20.0)
    sink = ListSink()
    model.sinks.append(sink)
    out = model.shed(torch.zeros(3, 4), "server busy: 2 requests already running the model")
    assert out.served_by == [R.DEFAULT] * 3 and out.reason == [R.DEADLINE_PREDICTED] * 3
    assert out.prediction.tolist() == [-1, -1, -1] and bool(torch.isnan(out.confidence).all())
    assert stages[0].calls == 0 and student.calls == 0  # nothing ran
    stats = model.stats()
    assert stats["calls"] == 1 and stats["served_by"] == {R.DEFAULT: 3} and stats["reasons"] == {R.DEADLINE_PREDICTED: 3}
    assert [e.detail for e in sink.events] == ["server busy: 2 requests already running the model"] * 3
    assert len({e.request_id for e in sink.events}) == 1


def test_shed_treats_bad_input_as_forward_does():
    spec = InputSpec(shape=(4,), value_range=(-1.0, 1.0))
    model, clock, _, _ = build([1.0], budget_ms=20.0)
    model = model.rebuild(input_spec=spec, clock=clock)
    bad = torch.tensor([[0.0, 0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0, 0.0]])
    with pytest.raises(InvalidInputError):
        model.shed(bad, "busy")
    lenient, clock, _, _ = build([1.0], budget_ms=20.0, on_invalid_input="default", default_class=2)
    lenient = lenient.rebuild(input_spec=spec, clock=clock)
    out = lenient.shed(bad, "busy")
    assert out.reason == [R.DEADLINE_PREDICTED, R.INVALID_INPUT] and out.prediction.tolist() == [2, 2]


def test_freeze_heap_takes_the_live_objects_out_of_the_collectors_reach():
    frozen = gc.get_freeze_count()
    try:
        result = freeze_heap()
        assert result["frozen"] == gc.get_freeze_count() > frozen and result["seconds"] >= 0.0
        assert gc.collect() >= 0  # the collector still runs, on what came after
    finally:
        gc.unfreeze()
