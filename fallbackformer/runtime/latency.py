"""LatencyProfile: streaming p50/p99 per stage and batch-size bucket, for deadline admission.

Every stage of the primary (and the student) records its measured time here; before a stage starts,
the runtime asks :meth:`LatencyProfile.predict_p99` whether it still fits the remaining budget.

Memory is bounded: each (stage, bucket) keeps a ring buffer of its ``window`` most recent samples, so
the quantiles follow drift (a slower machine, a noisy neighbour) within ``window`` calls. Beside the
ring it keeps the same samples sorted (one ``bisect`` removal and insertion per record), so quantiles
are exact on the window (nearest rank, rounding up: conservative for a tail) and reading one in the hot
path is an index into a list. Batch sizes are bucketed to the next power of two (1, 2, 4, 8, ...).

A profile can be saved in a bundle manifest (:meth:`to_dict`): the per-bucket summaries (and, if
asked, the samples) come back as *priors* that serve predictions until enough live samples arrived.

>>> profile = LatencyProfile(window=64, min_samples=1)
>>> for ms in [1.0, 1.0, 1.0, 5.0]:
...     profile.record("stage_0", batch_size=3, ms=ms)
>>> profile.predict_p99("stage_0", batch_size=4)     # same bucket (4)
5.0
>>> profile.predict_p99("stage_0", batch_size=64)    # larger batch: scaled from bucket 4, conservative
80.0
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fallbackformer.runtime.clock import NS_PER_MS, Clock, MonotonicClock

__all__ = ["LatencyProfile", "batch_bucket", "nearest_rank", "warm_up"]

FORMAT_VERSION = 1
#: :meth:`LatencyProfile.submit` adds its queued samples at least every this many submissions
SUBMIT_BATCH = 32


def batch_bucket(batch_size: int) -> int:
    """The power-of-two bucket of ``batch_size``: the smallest power of two >= it.

    >>> [batch_bucket(b) for b in (1, 2, 3, 5, 64, 65)]
    [1, 2, 4, 8, 64, 128]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    return 1 << (int(batch_size) - 1).bit_length()


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of sorted values by nearest rank, rounding the rank up (conservative).

    The project's one quantile: latency profiles, monitors, the evaluation's latency percentiles and
    the benchmarks all read quantiles through it (the profile's hot path inlines the same formula).

    >>> nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5), nearest_rank([1.0, 2.0, 3.0, 4.0], 0.99)
    (2.0, 4.0)
    """
    if not sorted_values:
        raise ValueError("nearest_rank of an empty sample")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1]; got {q!r}")
    k = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[k - 1]


@dataclass(slots=True)
class _Bucket:
    window: int
    samples: list[float] = field(default_factory=list)  # ring buffer
    ordered: list[float] = field(default_factory=list)  # the same samples, sorted
    head: int = 0
    total: int = 0
    prior: dict[str, float] | None = None  # {"p50", "p99", "count"} from a manifest
    p99_now: float = -math.inf  # the live p99 once min_samples arrived; -inf before

    def add(self, ms: float, min_samples: int) -> bool:
        """Add a sample; return whether a p99 prediction read from this bucket may have risen.

        It may not when the bucket already had its own estimate (``min_samples`` live samples) and
        ``ms`` is not above that p99: inserting a value at or below the nearest-rank p99 (and
        evicting any value) never moves that order statistic up.
        """
        samples, ordered = self.samples, self.ordered
        may_rise = not ms <= self.p99_now  # (-inf below min_samples: every sample may move it)
        if len(samples) < self.window:
            samples.append(ms)
        else:
            head = self.head
            del ordered[bisect.bisect_left(ordered, samples[head])]
            samples[head] = ms
            self.head = (head + 1) % self.window
        bisect.insort(ordered, ms)
        self.total += 1
        n = len(ordered)
        if n >= min_samples:
            self.p99_now = ordered[max(1, math.ceil(0.99 * n)) - 1]  # nearest_rank(ordered, 0.99), inlined
        return may_rise

    def recent(self) -> list[float]:
        """Samples oldest first."""
        return self.samples[self.head :] + self.samples[: self.head]


_NO_BUCKETS: dict[int, _Bucket] = {}


def _check_samples(samples: Sequence[tuple[str, int, float]]) -> None:
    for stage, _, ms in samples:
        if not (ms >= 0.0 and ms < math.inf):
            raise ValueError(f"latency of stage {stage!r} must be a finite number >= 0 ms; got {ms!r}")


class LatencyProfile:
    """Streaming per-stage, per-batch-bucket latency quantiles; thread-safe, bounded memory.

    Args:
        window: recent samples kept per (stage, bucket).
        min_samples: live samples a bucket needs before its own quantiles are trusted; below it a
            prior (from :meth:`from_dict`) or a neighbouring bucket answers.
    """

    def __init__(self, window: int = 512, min_samples: int = 8) -> None:
        if window < 1:
            raise ValueError(f"LatencyProfile window must be >= 1; got {window!r}")
        if min_samples < 1 or min_samples > window:
            raise ValueError(f"LatencyProfile min_samples must be in [1, window={window}]; got {min_samples!r}")
        self.window = int(window)
        self.min_samples = int(min_samples)
        self._lock = threading.Lock()
        self._buckets: dict[str, dict[int, _Bucket]] = {}
        self._pending: deque[Sequence[tuple[str, int, float]]] = deque()  # submitted, not yet added
        #: bumped by every change; a cache of any prediction is valid while it stays
        self.version = 0
        #: bumped by every change that may raise a p99 prediction (see :meth:`record`): a cache of
        #: p99 predictions stays conservative (never below the exact figure) while it stays
        self.p99_version = 0

    # -- writing -----------------------------------------------------------------------------
    def record(self, stage: str, batch_size: int, ms: float) -> None:
        """Record one measured duration of ``stage`` on a batch of ``batch_size``.

        Non-finite or negative durations are refused (a broken timer must not poison admission).
        """
        ms = float(ms)
        if not (ms >= 0.0 and math.isfinite(ms)):
            raise ValueError(f"latency of stage {stage!r} must be a finite number >= 0 ms; got {ms!r}")
        b = batch_bucket(batch_size)
        with self._lock:
            self._drain_locked()
            stage_buckets = self._buckets.setdefault(stage, {})
            bucket = stage_buckets.get(b)
            if bucket is None:
                bucket = stage_buckets[b] = _Bucket(self.window)
            self.version += 1
            if bucket.add(ms, self.min_samples):
                self.p99_version += 1

    def record_many(self, samples: Sequence[tuple[str, int, float]]) -> None:
        """Record several ``(stage, batch_size, ms)`` measurements under one lock."""
        if not samples:
            return
        _check_samples(samples)
        with self._lock:
            self._drain_locked()
            may_rise = self._add_locked(samples)
            self.version += 1
            if may_rise:
                self.p99_version += 1

    def submit(self, samples: Sequence[tuple[str, int, float]]) -> None:
        """Record measurements from the serving hot path: cheaply, and exactly as far as readers see.

        A sample at or below its bucket's current p99 cannot raise a p99 prediction (see
        :meth:`record`), so it waits in a queue and is added with the next ``SUBMIT_BATCH`` (in one
        pass, off the hot path's cold caches) or before anything reads the profile. Any other
        sample (a slow stage, a bucket still filling) is added at once, behind those queued.
        ``version`` moves when the queue is added; ``p99_version`` only when a prediction may rise.
        """
        if not samples:
            return
        _check_samples(samples)
        pending = self._pending
        pending.append(samples)
        buckets = self._buckets
        for stage, batch_size, ms in samples:
            bucket = buckets.get(stage, _NO_BUCKETS).get(1 << (batch_size - 1).bit_length())
            if bucket is None or not ms <= bucket.p99_now:
                break
        else:
            if len(pending) < SUBMIT_BATCH:
                return
        with self._lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        """Add the queued samples of :meth:`submit` (held lock)."""
        pending = self._pending
        if not pending:
            return
        may_rise = False
        while True:
            try:
                samples = pending.popleft()  # (atomic: a concurrent submit is never lost)
            except IndexError:
                break
            may_rise = self._add_locked(samples) or may_rise
        self.version += 1
        if may_rise:
            self.p99_version += 1

    def _add_locked(self, samples: Sequence[tuple[str, int, float]]) -> bool:
        buckets, min_samples, may_rise = self._buckets, self.min_samples, False
        for stage, batch_size, ms in samples:
            b = 1 << (batch_size - 1).bit_length() if batch_size > 0 else batch_bucket(batch_size)
            stage_buckets = buckets.get(stage)
            if stage_buckets is None:
                stage_buckets = buckets[stage] = {}
            bucket = stage_buckets.get(b)
            if bucket is None:
                bucket = stage_buckets[b] = _Bucket(self.window)
            if bucket.add(float(ms), min_samples):
                may_rise = True
        return may_rise

    def reset(self, stage: str | None = None) -> None:
        """Forget every sample (and prior) of ``stage``, or of all stages."""
        with self._lock:
            self._drain_locked()
            if stage is None:
                self._buckets.clear()
            else:
                self._buckets.pop(stage, None)
            self.version += 1
            self.p99_version += 1

    # -- reading -----------------------------------------------------------------------------
    def _own(self, bucket: _Bucket, q: float) -> float | None:
        """The bucket's own estimate of quantile ``q``: live if it has enough samples, else its prior."""
        if len(bucket.ordered) >= self.min_samples:
            return nearest_rank(bucket.ordered, q)
        if bucket.prior is not None:  # a saved summary: p50 answers q <= 0.5, p99 above
            return bucket.prior["p50" if q <= 0.5 else "p99"]
        return None

    def quantile(self, stage: str, batch_size: int, q: float) -> float | None:
        """Quantile ``q`` of ``stage`` in the bucket of ``batch_size``, or ``None`` without data there."""
        b = batch_bucket(batch_size)
        with self._lock:
            self._drain_locked()
            bucket = self._buckets.get(stage, {}).get(b)
            return None if bucket is None else self._own(bucket, q)

    def p50(self, stage: str, batch_size: int) -> float | None:
        """Median of ``stage`` in the bucket of ``batch_size`` (``None`` without data there)."""
        return self.quantile(stage, batch_size, 0.5)

    def p99(self, stage: str, batch_size: int) -> float | None:
        """99th percentile of ``stage`` in the bucket of ``batch_size`` (``None`` without data there)."""
        return self.quantile(stage, batch_size, 0.99)

    def predict_p99(self, stage: str, batch_size: int, default: float = 0.0) -> float:
        """Predicted p99 duration (ms) of ``stage`` on a batch of ``batch_size``.

        The bucket's own estimate when it has one; otherwise the nearest larger bucket with data (an
        upper bound, as time grows with the batch); otherwise the nearest smaller one scaled linearly
        to this bucket (conservative); ``default`` when the stage has no data at all.
        """
        b = batch_bucket(batch_size)
        with self._lock:
            self._drain_locked()
            return self._predict_locked(stage, b, default)

    def predict_p99_many(self, stages: Sequence[str], batch_size: int, default: float = 0.0) -> list[float]:
        """:meth:`predict_p99` of each of ``stages`` under one lock (the admission check's hot path)."""
        return self.predict_many(stages, batch_size, 0.99, default)

    def predict_many(self, stages: Sequence[str], batch_size: int, q: float, default: float = 0.0) -> list[float]:
        """Predicted ``q``-quantile (ms) of each of ``stages`` at ``batch_size``, under one lock.

        Buckets without data are filled in as in :meth:`predict_p99`.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1]; got {q!r}")
        b = batch_bucket(batch_size)
        buckets, min_samples, out = self._buckets, self.min_samples, []
        with self._lock:
            self._drain_locked()
            for s in stages:  # the common case (a bucket with enough live samples) inlined
                bucket = buckets.get(s, _NO_BUCKETS).get(b)
                if bucket is not None and len(bucket.ordered) >= min_samples:
                    ordered = bucket.ordered
                    out.append(ordered[max(1, math.ceil(q * len(ordered))) - 1])  # nearest_rank, inlined
                else:
                    out.append(self._predict_locked(s, b, default, q))
        return out

    def predict_p99_sum(self, stages: Sequence[str], batch_size: int, default: float = 0.0) -> float:
        """Sum of :meth:`predict_p99` over ``stages`` (one lock).

        For stages whose slow calls come together (a slow machine slows every stage) this is the p99
        of the sum; for independent stages it is usually above it. Quantiles are not subadditive in
        general, so rare independent stalls can make the sum's p99 larger: the hard deadline
        (hedging) is what bounds those.
        """
        b = batch_bucket(batch_size)
        with self._lock:
            self._drain_locked()
            return sum(self._predict_locked(s, b, default) for s in stages)

    def _predict_locked(self, stage: str, b: int, default: float, q: float = 0.99) -> float:
        stage_buckets = self._buckets.get(stage)
        if not stage_buckets:
            return default
        bucket = stage_buckets.get(b)
        if bucket is not None:
            ordered = bucket.ordered
            if len(ordered) >= self.min_samples:  # the common case, inlined
                return ordered[max(1, math.ceil(q * len(ordered))) - 1]  # nearest_rank, inlined
            own = self._own(bucket, q)
            if own is not None:
                return own
        larger = sorted(k for k in stage_buckets if k > b)
        for k in larger:
            est = self._own(stage_buckets[k], q)
            if est is not None:
                return est
        smaller = sorted((k for k in stage_buckets if k < b), reverse=True)
        for k in smaller:
            est = self._own(stage_buckets[k], q)
            if est is not None:
                return est * (b / k)
        return default

    def count(self, stage: str, batch_size: int | None = None) -> int:
        """Samples ever recorded for ``stage`` (in the bucket of ``batch_size`` when given)."""
        with self._lock:
            self._drain_locked()
            stage_buckets = self._buckets.get(stage, {})
            if batch_size is None:
                return sum(bk.total for bk in stage_buckets.values())
            bucket = stage_buckets.get(batch_bucket(batch_size))
            return 0 if bucket is None else bucket.total

    def recent(self, stage: str, batch_size: int) -> list[float]:
        """The live samples (ms) of ``stage`` in the bucket of ``batch_size``, oldest first (at most
        ``window``; empty without data there)."""
        with self._lock:
            self._drain_locked()
            bucket = self._buckets.get(stage, {}).get(batch_bucket(batch_size))
            return [] if bucket is None else bucket.recent()

    def stages(self) -> list[str]:
        """Stages with data, sorted."""
        with self._lock:
            self._drain_locked()
            return sorted(self._buckets)

    def summary(self) -> dict[str, dict[int, dict[str, float]]]:
        """``{stage: {bucket: {"p50", "p99", "count"}}}`` for buckets with an estimate."""
        out: dict[str, dict[int, dict[str, float]]] = {}
        with self._lock:
            self._drain_locked()
            for stage, stage_buckets in self._buckets.items():
                for b, bucket in sorted(stage_buckets.items()):
                    p50, p99 = self._own(bucket, 0.5), self._own(bucket, 0.99)
                    if p50 is None or p99 is None:
                        continue
                    count = bucket.total if len(bucket.ordered) >= self.min_samples else bucket.prior["count"]  # type: ignore[index]
                    out.setdefault(stage, {})[b] = {"p50": p50, "p99": p99, "count": float(count)}
        return out

    # -- warm-up -----------------------------------------------------------------------------
    def warm_up(
        self,
        stage: str,
        fn: Callable[[], Any],
        batch_size: int,
        repeats: int = 20,
        discard: int = 2,
        clock: Clock | None = None,
    ) -> list[float]:
        """Run ``fn`` ``discard + repeats`` times, record the last ``repeats`` durations; see :func:`warm_up`."""
        return warm_up(self, stage, fn, batch_size, repeats=repeats, discard=discard, clock=clock)

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        """A JSON-able summary for a bundle manifest (per bucket p50, p99, count; samples if asked)."""
        stages: dict[str, dict[str, dict[str, Any]]] = {}
        summary = self.summary()
        with self._lock:
            for stage, buckets in summary.items():
                for b, stats in buckets.items():
                    entry: dict[str, Any] = {"p50": stats["p50"], "p99": stats["p99"], "count": int(stats["count"])}
                    if include_samples:
                        entry["samples"] = [round(x, 6) for x in self._buckets[stage][b].recent()]
                    stages.setdefault(stage, {})[str(b)] = entry
        return {
            "format_version": FORMAT_VERSION,
            "window": self.window,
            "min_samples": self.min_samples,
            "stages": stages,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyProfile:
        """Rebuild a profile saved by :meth:`to_dict`; the summaries become priors, samples are replayed."""
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"LatencyProfile format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
                "re-save the profile with this fallbackformer version"
            )
        profile = cls(
            window=int(data.get("window", 512)),
            min_samples=int(data.get("min_samples", 8)),
        )
        for stage, buckets in dict(data.get("stages", {})).items():
            for key, entry in buckets.items():
                b = int(key)
                if b < 1 or b & (b - 1):
                    raise ValueError(f"LatencyProfile bucket {key!r} of stage {stage!r} is not a power of two")
                bucket = _Bucket(profile.window)
                bucket.prior = {"p50": float(entry["p50"]), "p99": float(entry["p99"]), "count": float(entry["count"])}
                for ms in entry.get("samples", []):
                    bucket.add(float(ms), profile.min_samples)
                profile._buckets.setdefault(str(stage), {})[b] = bucket
        return profile

    def __repr__(self) -> str:
        return f"LatencyProfile(window={self.window}, stages={self.stages()})"


def warm_up(
    profile: LatencyProfile,
    stage: str,
    fn: Callable[[], Any],
    batch_size: int,
    repeats: int = 20,
    discard: int = 2,
    clock: Clock | None = None,
) -> list[float]:
    """Time ``fn`` and seed ``profile`` with it before serving.

    Runs ``fn`` ``discard`` times untimed (allocator, caches, lazy initialisation), then ``repeats``
    times timed on ``clock`` (real time by default), records each duration under ``stage`` and
    ``batch_size`` and returns them.

    >>> profile = LatencyProfile(min_samples=1)
    >>> len(warm_up(profile, "noop", lambda: None, batch_size=1, repeats=3))
    3
    """
    if repeats < 1 or discard < 0:
        raise ValueError(f"warm_up needs repeats >= 1 and discard >= 0; got repeats={repeats}, discard={discard}")
    clock = clock or MonotonicClock()
    for _ in range(discard):
        fn()
    out = []
    for _ in range(repeats):
        t0 = clock.now_ns()
        fn()
        ms = (clock.now_ns() - t0) / NS_PER_MS
        profile.record(stage, batch_size, ms)
        out.append(ms)
    return out

