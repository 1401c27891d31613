"""Stopwatch: seconds per step of a job, on a scripted perf_counter."""

import itertools

import pytest

from fallbackformer.common import timing


def test_steps_and_elapsed(monkeypatch):
    ticks = itertools.count(start=10.0, step=0.5)  # every read of the counter is 0.5 s later
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    watch = timing.Stopwatch()  # 10.0
    with watch.step("train"):  # 10.5 .. 11.0
        pass
    with pytest.raises(RuntimeError), watch.step("export"):  # 11.5 .. 12.0: timed although it raised
        raise RuntimeError("disk full")
    assert watch.seconds == {"train": 0.5, "export": 0.5}
    assert watch.elapsed() == 2.5  # 12.5 - 10.0
