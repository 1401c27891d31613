"""Hedged calls keep every answer's reason right when the worker is late on bookkeeping or dies."""

from __future__ import annotations

import time

import torch

from fallbackformer.runtime.clock import MonotonicClock
from fallbackformer.runtime.testing import build


def test_a_walk_that_served_everything_but_finished_late_keeps_empty_reasons():
    model, _, _, _ = build([0.0], student_script=0.0, clock=MonotonicClock(), budget_ms=50.0, margin_ms=1.0,
                           hedge="always", hedge_workers=1, hedge_student_start="immediate")
    try:
        model.warm_up(torch.zeros(3, 4), repeats=5, discard=1, batch_sizes=[3])
        record = model.profile.record_many

        def late_bookkeeping(timings):  # the worker has served every sample, then is descheduled
            time.sleep(0.2)
            record(timings)

        model.profile.record_many = late_bookkeeping
        out = model(torch.zeros(3, 4))
        assert out.served_by == ["primary"] * 3
        assert out.reason == ["", "", ""]
        assert model.stats()["reasons"] == {}
    finally:
        time.sleep(0.3)
        model.close(timeout_s=1.0)


def test_a_worker_that_dies_outside_the_walk_is_a_recorded_primary_error():
    model, _, stages, _ = build([0.0], student_script=0.0, clock=MonotonicClock(), budget_ms=200.0, margin_ms=1.0,
                                hedge="always", hedge_workers=1)

    class WorkerFault(BaseException):
        pass

    class BrokenStage(torch.nn.Module):
        def forward(self, h):
            raise WorkerFault("worker infrastructure failure")

    stages[0].inner = BrokenStage()
    try:
        out = model(torch.zeros(2, 4))
        assert out.served_by == ["student", "student"]
        assert out.reason == ["primary_error", "primary_error"]
        assert model.stats()["reasons"] == {"primary_error": 2}
    finally:
        model.close(timeout_s=1.0)
