"""LatencyProfile: quantiles against numpy, buckets, predictions, persistence, threads, warm-up."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fallbackformer.runtime.clock import FakeClock, ScriptedDelay
from fallbackformer.runtime.latency import LatencyProfile, batch_bucket, nearest_rank, warm_up

durations = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


def test_batch_buckets_are_powers_of_two() -> None:
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 256, 257)] == [1, 2, 4, 4, 8, 8, 16, 256, 512]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        batch_bucket(0)


@settings(max_examples=200, deadline=None)
@given(st.lists(durations, min_size=1, max_size=300), st.floats(min_value=0.0, max_value=1.0))
def test_nearest_rank_matches_numpy_inverted_cdf(values: list[float], q: float) -> None:
    expected = float(np.quantile(np.asarray(values), q, method="inverted_cdf"))
    assert nearest_rank(sorted(values), q) == pytest.approx(expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(durations, min_size=1, max_size=200), st.integers(min_value=1, max_value=64))
def test_quantiles_are_exact_over_the_recent_window(values: list[float], window: int) -> None:
    profile = LatencyProfile(window=window, min_samples=1)
    for v in values:
        profile.record("s", 1, v)
    recent = np.asarray(values[-window:])
    assert profile.p99("s", 1) == pytest.approx(float(np.quantile(recent, 0.99, method="inverted_cdf")))
    assert profile.p50("s", 1) == pytest.approx(float(np.quantile(recent, 0.5, method="inverted_cdf")))
    assert profile.count("s", 1) == len(values)


def test_memory_is_bounded_by_the_window() -> None:
    profile = LatencyProfile(window=32)
    for i in range(10_000):
        profile.record("s", 7, float(i))
    recent = profile.recent("s", 7)
    assert recent == [float(i) for i in range(10_000 - 32, 10_000)]  # the last 32, oldest first
    assert profile.count("s", 7) == 10_000 and profile.recent("s", 9) == []
    for q in (0.0, 0.5, 0.99, 1.0):
        assert profile.quantile("s", 7, q) == nearest_rank(sorted(recent), q)


def test_quantiles_follow_every_new_sample() -> None:
    profile = LatencyProfile(window=3, min_samples=1)
    for ms in (1.0, 1.0, 1.0):
        profile.record("s", 1, ms)
    assert profile.p99("s", 1) == 1.0
    profile.record("s", 1, 9.0)  # evicts a 1.0
    assert profile.p99("s", 1) == 9.0 and profile.p50("s", 1) == 1.0
    assert profile.predict_p99_many(["s", "t"], 1, default=2.0) == [9.0, 2.0]
    assert profile.predict_p99_sum(["s", "s"], 1) == 18.0


def test_predictions_use_own_then_larger_then_scaled_smaller_buckets() -> None:
    profile = LatencyProfile(min_samples=2)
    assert profile.predict_p99("unknown", 4, default=7.0) == 7.0
    for ms in (1.0, 2.0):
        profile.record("s", 4, ms)
        profile.record("s", 64, 10 * ms)
    assert profile.predict_p99("s", 3) == 2.0  # own bucket (4)
    assert profile.predict_p99("s", 16) == 20.0  # the larger bucket 64 bounds it
    assert profile.predict_p99("s", 200) == 20.0 * 256 / 64  # scaled from 64 to 256
    profile.record("s", 1, 100.0)  # one sample: below min_samples, not trusted yet
    assert profile.p99("s", 1) is None
    assert profile.predict_p99("s", 1) == 2.0


def test_record_refuses_bad_durations() -> None:
    profile = LatencyProfile()
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite number >= 0"):
            profile.record("s", 1, bad)


@pytest.mark.parametrize(
    "kwargs",
    [{"window": 0}, {"min_samples": 0}, {"window": 4, "min_samples": 5}],
)
def test_constructor_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="LatencyProfile"):
        LatencyProfile(**kwargs)


def test_round_trip_through_json_keeps_priors_and_samples() -> None:
    profile = LatencyProfile(window=64, min_samples=4)
    for i in range(50):
        profile.record("stage_0", 1, 1.0 + i / 100)
        profile.record("student", 32, 0.2)
    data = json.loads(json.dumps(profile.to_dict()))
    restored = LatencyProfile.from_dict(data)
    assert restored.window == 64 and restored.min_samples == 4
    assert restored.predict_p99("stage_0", 1) == profile.predict_p99("stage_0", 1)
    assert restored.p50("student", 32) == pytest.approx(0.2)
    assert restored.summary()["stage_0"][1]["count"] == 50
    # new live samples take over once there are min_samples of them
    for _ in range(4):
        restored.record("stage_0", 1, 30.0)
    assert restored.predict_p99("stage_0", 1) == 30.0

    with_samples = LatencyProfile.from_dict(profile.to_dict(include_samples=True))
    assert with_samples.recent("stage_0", 1) == pytest.approx(profile.recent("stage_0", 1))


def test_from_dict_refuses_bad_data() -> None:
    with pytest.raises(ValueError, match="format_version"):
        LatencyProfile.from_dict({"format_version": 99})
    with pytest.raises(ValueError, match="power of two"):
        LatencyProfile.from_dict({"stages": {"s": {"3": {"p50": 1, "p99": 2, "count": 1}}}})


def test_concurrent_records_are_all_counted() -> None:
    profile = LatencyProfile(window=16)

    def work(seed: int) -> None:
        for i in range(500):
            profile.record("s", 1 + (i % 5), float(seed))
            profile.predict_p99("s", 3)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert profile.count("s") == 2000


def test_warm_up_times_on_the_given_clock() -> None:
    clock = FakeClock()
    stage = ScriptedDelay(nn.Identity(), clock, [5.0, 5.0, 1.0, 2.0, 3.0])
    profile = LatencyProfile(min_samples=1)
    got = profile.warm_up("stage_0", lambda: stage(0), batch_size=8, repeats=3, discard=2, clock=clock)
    assert got == [1.0, 2.0, 3.0]  # the two discarded calls are not recorded
    assert profile.count("stage_0", 8) == 3 and profile.p99("stage_0", 8) == 3.0
    with pytest.raises(ValueError, match="repeats >= 1"):
        warm_up(profile, "s", lambda: None, 1, repeats=0)


def test_submitted_samples_are_seen_by_every_reader() -> None:
    profile = LatencyProfile(window=64, min_samples=4)
    for ms in [1.0, 2.0, 3.0, 4.0]:
        profile.record("s", 1, ms)
    v99, v = profile.p99_version, profile.version
    for _ in range(5):
        profile.submit([("s", 1, 2.5)])  # at or below the p99 (4.0): queued
    assert (profile.p99_version, profile.version) == (v99, v)  # queued: nothing added yet
    assert profile.count("s") == 9 and profile.version > v  # a read adds the queue first
    assert profile.p50("s", 1) == 2.5


def test_a_sample_above_the_p99_is_added_at_once_and_moves_p99_version() -> None:
    profile = LatencyProfile(window=64, min_samples=4)
    for ms in [1.0, 2.0, 3.0, 4.0]:
        profile.record("s", 1, ms)
    v99, v = profile.p99_version, profile.version
    profile.submit([("s", 1, 1.5)])
    assert (profile.p99_version, profile.version) == (v99, v)  # queued: nothing moved yet
    profile.submit([("s", 1, 50.0)])  # a stall
    assert profile.p99_version == v99 + 1 and profile.version > v  # added at once, the queue with it
    assert profile.recent("s", 1) == [1.0, 2.0, 3.0, 4.0, 1.5, 50.0]  # in submission order


def test_a_bucket_still_filling_adds_every_sample_at_once() -> None:
    profile = LatencyProfile(window=64, min_samples=8)
    profile.submit([("s", 2, 1.0)])
    assert profile.version == 1 and profile.p99_version == 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([1, 3, 8]), durations), min_size=1, max_size=200),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1, max_value=10),
)
def test_p99_predictions_never_rise_while_p99_version_stands(
    samples: list[tuple[str, int, float]], window: int, min_samples: int
) -> None:
    """The contract admission plans rely on: a cached p99 prediction is never below the exact one
    until ``p99_version`` moves."""
    min_samples = min(min_samples, window)
    profile = LatencyProfile(window=window, min_samples=min_samples)
    cached: dict[tuple[str, int], float] = {}
    version = profile.p99_version
    for sample in samples:
        profile.submit([sample])
        exact = {(s, b): profile.predict_p99(s, b) for s in ("a", "b") for b in (1, 2, 4, 8, 16)}
        if profile.p99_version != version:
            cached, version = exact, profile.p99_version
        for key, value in exact.items():
            assert value <= cached.get(key, value), (key, value, cached[key])
    reference = LatencyProfile(window=window, min_samples=min_samples)
    for s, b, ms in samples:  # and what readers see is exactly what record() would have made
        reference.record(s, b, ms)
    assert profile.summary() == reference.summary()
