"""Monitors for every named trigger: routing instability, latency drift, fallback creep, slice disparity.

Each monitor keeps a rolling window of answers (samples), looks every ``check_every`` answers, and
raises its named signal once per excursion (when it enters the alarm state). False alarms are
controlled per monitor: a look tests at level ``level / looks`` with ``looks = horizon / check_every``
(Bonferroni over looks; the slice monitor also divides by the slices tested), so on a stream that
matches the reference, each monitor raises a false alarm within ``horizon`` answers with probability
at most ``level``. The routing and slice monitors also require a practical effect (``min_tv``,
``min_gap``) so that a statistically detectable but harmless wobble does not page anyone.

* :class:`RoutingMixMonitor` (``routing_instability``): the ``served_by`` mix of the window against
  the signed-off mix (chi-square on the 2 x K contingency table when the reference has a size, else
  goodness of fit) and a total-variation distance above ``min_tv``.
* :class:`LatencyDriftMonitor` (``latency_drift``): per stage, the share of the window's times above
  ``ratio`` x the reference p99 (the bundle's latency profile) against the 1% a p99 allows (exact
  binomial tail): the window's p99 has drifted above ``ratio`` x the reference.
* :class:`FallbackCreepMonitor` (``fallback_creep``): the window's fallback rate (student + default)
  against the signed-off ``max_fallback_rate`` (exact binomial tail), not the rate since start.
* :class:`SliceDisparityMonitor` (``slice_disparity``): per slice (predicted class ``class=<k>``, and
  any key a caller passes), the slice's fallback rate against the rest of its family (one-sided
  two-proportion z-test) with a gap of at least ``min_gap``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy import stats as _st

from fallbackformer.common.paths import is_fallback
from fallbackformer.runtime.latency import nearest_rank

__all__ = [
    "MonitorConfig", "RoutingMixMonitor", "LatencyDriftMonitor", "FallbackCreepMonitor",
    "SliceDisparityMonitor", "ROUTING_INSTABILITY", "LATENCY_DRIFT", "FALLBACK_CREEP", "SLICE_DISPARITY",
    "MONITOR_SIGNALS",
]

ROUTING_INSTABILITY = "routing_instability"
LATENCY_DRIFT = "latency_drift"
FALLBACK_CREEP = "fallback_creep"
SLICE_DISPARITY = "slice_disparity"
MONITOR_SIGNALS = (ROUTING_INSTABILITY, LATENCY_DRIFT, FALLBACK_CREEP, SLICE_DISPARITY)
INSTABILITY_ACTIONS = ("signal", "rollback")


@dataclass
class MonitorConfig:
    """Windows, looks and false-alarm level shared by the monitors, and each monitor's reference.

    Attributes:
        window: answers (samples) in each rolling window.
        check_every: answers between two looks.
        horizon: answers over which ``level`` bounds each monitor's false-alarm probability.
        level: false-alarm probability per monitor over ``horizon`` (Bonferroni over looks).
        reference_mix: the signed-off ``served_by`` shares (``None``: routing not monitored).
        reference_n: answers the reference mix was measured on (a two-sample test); ``None``: exact.
        min_tv: smallest total-variation distance from the reference that counts as instability.
        on_instability: ``"signal"`` only, or ``"rollback"``: also pull the rollback switch (every
            call is then served by the fixed fallback path, reason ``breaker_open``).
        reference_p99_ms: ``{stage: {batch bucket: p99 ms}}`` (``None``: latency not monitored).
        latency_ratio: a stage drifts when its window p99 exceeds this multiple of the reference p99.
        max_fallback_rate: the signed-off rate (``None``: creep not monitored).
        min_gap: smallest excess of a slice's fallback rate over the rest that counts as disparity.
        slice_min_answers: answers a slice needs in its window before it is tested.
    """

    window: int = 1000
    check_every: int = 250
    horizon: int = 100_000
    level: float = 0.01
    reference_mix: dict[str, float] | None = None
    reference_n: int | None = None
    min_tv: float = 0.05
    on_instability: str = "signal"
    reference_p99_ms: dict[str, dict[int, float]] | None = None
    latency_ratio: float = 1.5
    max_fallback_rate: float | None = None
    min_gap: float = 0.10
    slice_min_answers: int = 50

    def __post_init__(self) -> None:
        for name in ("window", "check_every", "horizon", "slice_min_answers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MonitorConfig.{name}={v!r}; use an int >= 1")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"MonitorConfig.level={self.level!r}; use a probability in (0, 1), e.g. 0.01")
        if self.on_instability not in INSTABILITY_ACTIONS:
            raise ValueError(f"MonitorConfig.on_instability={self.on_instability!r}; use one of {INSTABILITY_ACTIONS}")
        if self.max_fallback_rate is not None and not 0.0 <= self.max_fallback_rate < 1.0:
            raise ValueError(f"MonitorConfig.max_fallback_rate={self.max_fallback_rate!r}; use a rate in [0, 1)")
        if not self.latency_ratio >= 1.0:
            raise ValueError(f"MonitorConfig.latency_ratio={self.latency_ratio!r}; use a factor >= 1")
        if self.reference_mix is not None:
            total = sum(self.reference_mix.values())
            if not total > 0 or any(v < 0 for v in self.reference_mix.values()):
                raise ValueError(f"MonitorConfig.reference_mix={self.reference_mix!r}; give non-negative shares, not all 0")
            self.reference_mix = {k: v / total for k, v in self.reference_mix.items()}

    @property
    def look_level(self) -> float:
        """The level of one look: ``level`` over the looks in ``horizon`` (Bonferroni)."""
        return self.level / max(1, self.horizon // self.check_every)


class _Monitor:
    """Shared bookkeeping: a look every ``check_every`` answers and one signal per excursion."""

    signal = ""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.since_look = 0
        self.looks = 0
        self.alarms = 0
        self.active = False
        self.last: dict[str, Any] = {}

    def _tick(self, n: int) -> bool:
        self.since_look += n
        if self.since_look < self.config.check_every:
            return False
        self.since_look = 0
        self.looks += 1
        return True

    def _verdict(self, alarm: bool) -> bool:
        fired = alarm and not self.active
        self.active = alarm
        self.alarms += fired
        return fired

    def state(self) -> dict[str, Any]:
        return {"looks": self.looks, "alarms": self.alarms, "active": self.active, **self.last}


class RoutingMixMonitor(_Monitor):
    """``routing_instability``: the window's ``served_by`` mix drifts from the signed-off mix."""

    signal = ROUTING_INSTABILITY

    def __init__(self, config: MonitorConfig) -> None:
        super().__init__(config)
        if config.reference_mix is None:
            raise ValueError("RoutingMixMonitor needs MonitorConfig.reference_mix (the signed-off served_by shares)")
        self.reference = dict(config.reference_mix)
        self.recent: deque[str] = deque(maxlen=config.window)

    def observe(self, served_by: Sequence[str]) -> bool:
        self.recent.extend(served_by)
        if not self._tick(len(served_by)) or len(self.recent) < self.config.window // 2:
            return False
        counts = Counter(self.recent)
        n = len(self.recent)
        cats = sorted(set(self.reference) | set(counts))
        obs = [counts.get(c, 0) for c in cats]
        ref = [self.reference.get(c, 0.0) for c in cats]
        tv = 0.5 * sum(abs(o / n - r) for o, r in zip(obs, ref))
        p = _mix_p_value(obs, ref, self.config.reference_n)
        self.last = {"tv": tv, "p_value": p, "n": n, "mix": {c: o / n for c, o in zip(cats, obs)}}
        return self._verdict(p < self.config.look_level and tv > self.config.min_tv)


def _mix_p_value(obs: list[int], ref: list[float], reference_n: int | None) -> float:
    """Chi-square p-value of ``obs`` against ``ref`` (2 x K contingency when ``reference_n``)."""
    n = sum(obs)
    if reference_n:
        ref_counts = [r * reference_n for r in ref]
        keep = [i for i in range(len(obs)) if obs[i] + ref_counts[i] > 0]
        if len(keep) < 2:
            return 1.0
        table = [[obs[i] for i in keep], [ref_counts[i] for i in keep]]
        return float(_st.chi2_contingency(table, correction=False)[1])
    stat, dof = 0.0, -1
    for o, r in zip(obs, ref):
        e = r * n
        if e == 0:
            if o > 0:
                return 0.0  # a path the signed-off mix never uses
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    return float(_st.chi2.sf(stat, max(dof, 1)))


class LatencyDriftMonitor(_Monitor):
    """``latency_drift``: a stage's window p99 exceeds ``latency_ratio`` x its reference p99."""

    signal = LATENCY_DRIFT

    def __init__(self, config: MonitorConfig) -> None:
        super().__init__(config)
        if not config.reference_p99_ms:
            raise ValueError("LatencyDriftMonitor needs MonitorConfig.reference_p99_ms (the bundle's latency profile)")
        self.reference = {s: {int(b): float(v) for b, v in d.items()} for s, d in config.reference_p99_ms.items()}
        self.recent: dict[str, deque[tuple[float, float]]] = {}  # stage -> (ms, reference p99)

    def _ref(self, stage: str, batch: int) -> float | None:
        buckets = self.reference.get(stage)
        if not buckets:
            return None
        return buckets[min(buckets, key=lambda b: (abs(math.log2(max(b, 1)) - math.log2(max(batch, 1))), b))]

    def observe(self, timings: Iterable[tuple[str, int, float]], answers: int) -> bool:
        for stage, batch, ms in timings:
            ref = self._ref(stage, batch)
            if ref is not None:
                self.recent.setdefault(stage, deque(maxlen=self.config.window)).append((float(ms), ref))
        if not self._tick(answers):
            return False
        level = self.config.look_level / max(1, len(self.recent))
        alarm, per_stage = False, {}
        for stage, window in self.recent.items():
            n = len(window)
            if n < self.config.window // 2:
                continue
            k = sum(ms > self.config.latency_ratio * ref for ms, ref in window)
            p = float(_st.binom.sf(k - 1, n, 0.01))  # P(K >= k) when at most 1% exceed (the p99)
            p99 = nearest_rank(sorted(ms for ms, _ in window), 0.99)
            per_stage[stage] = {"p99_ms": p99, "exceed": k / n, "p_value": p}
            alarm |= p < level
        self.last = {"stages": per_stage}
        return self._verdict(alarm)


class FallbackCreepMonitor(_Monitor):
    """``fallback_creep``: the rolling fallback rate exceeds the signed-off ``max_fallback_rate``."""

    signal = FALLBACK_CREEP

    def __init__(self, config: MonitorConfig) -> None:
        super().__init__(config)
        if config.max_fallback_rate is None:
            raise ValueError("FallbackCreepMonitor needs MonitorConfig.max_fallback_rate (degradation.max_fallback_rate)")
        self.max_rate = float(config.max_fallback_rate)
        self.recent: deque[bool] = deque(maxlen=config.window)

    def observe(self, served_by: Sequence[str]) -> bool:
        self.recent.extend(is_fallback(who) for who in served_by)
        if not self._tick(len(served_by)) or len(self.recent) < self.config.window // 2:
            return False
        n, k = len(self.recent), sum(self.recent)
        p = float(_st.binom.sf(k - 1, n, self.max_rate)) if k else 1.0
        self.last = {"rate": k / n, "max_rate": self.max_rate, "p_value": p, "n": n}
        return self._verdict(p < self.config.look_level)


class SliceDisparityMonitor(_Monitor):
    """``slice_disparity``: a slice's rolling fallback rate exceeds the rest of its family's by ``min_gap``.

    Slices are ``"family=value"`` strings: ``class=<predicted class>`` for every answer that is not
    an abstaining default, plus any a caller passes (``FallbackModel.observe_slices``).
    """

    signal = SLICE_DISPARITY

    def __init__(self, config: MonitorConfig) -> None:
        super().__init__(config)
        self.recent: dict[str, deque[bool]] = {}
        self.pending = 0
        self.worst: dict[str, Any] = {}

    def add(self, slices: Iterable[tuple[str, bool]]) -> None:
        """Count ``(slice, was a fallback)`` pairs without looking."""
        for key, fb in slices:
            self.recent.setdefault(key, deque(maxlen=self.config.window)).append(bool(fb))

    def observe(self, slices: Sequence[tuple[str, bool]], answers: int) -> bool:
        self.add(slices)
        if not self._tick(answers):
            return False
        eligible = {k: d for k, d in self.recent.items() if len(d) >= self.config.slice_min_answers}
        level = self.config.look_level / max(1, len(eligible))
        totals: dict[str, list[int]] = {}
        for key, d in self.recent.items():
            t = totals.setdefault(key.split("=", 1)[0], [0, 0])
            t[0] += sum(d)
            t[1] += len(d)
        alarm, worst = False, {"gap": 0.0}
        for key, d in eligible.items():
            fam = totals[key.split("=", 1)[0]]
            k1, n1 = sum(d), len(d)
            k2, n2 = fam[0] - k1, fam[1] - n1
            if n2 < self.config.slice_min_answers:
                continue
            r1, r2 = k1 / n1, k2 / n2
            pooled = (k1 + k2) / (n1 + n2)
            se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-12))
            p = float(_st.norm.sf((r1 - r2) / se))
            if r1 - r2 > worst["gap"]:
                worst = {"slice": key, "gap": r1 - r2, "rate": r1, "rest": r2, "p_value": p}
            alarm |= p < level and r1 - r2 > self.config.min_gap
        self.last = {"worst": worst, "slices": len(self.recent)}
        return self._verdict(alarm)


@dataclass
class MonitorSet:
    """The monitors a config enables (each ``None`` when its reference is missing)."""

    routing: RoutingMixMonitor | None = None
    latency: LatencyDriftMonitor | None = None
    creep: FallbackCreepMonitor | None = None
    slices: SliceDisparityMonitor | None = None
    counts: Counter = field(default_factory=Counter)

    @classmethod
    def from_config(cls, config: MonitorConfig) -> "MonitorSet":
        return cls(
            routing=RoutingMixMonitor(config) if config.reference_mix is not None else None,
            latency=LatencyDriftMonitor(config) if config.reference_p99_ms else None,
            creep=FallbackCreepMonitor(config) if config.max_fallback_rate is not None else None,
            slices=SliceDisparityMonitor(config),
        )

    def observe(self, served_by: Sequence[str], predictions: Sequence[int],
                timings: Iterable[tuple[str, int, float]]) -> list[str]:
        """Feed one call's answers; return the signals raised by this call."""
        fired = []
        n = len(served_by)
        if self.routing is not None and self.routing.observe(served_by):
            fired.append(ROUTING_INSTABILITY)
        if self.latency is not None and self.latency.observe(timings, n):
            fired.append(LATENCY_DRIFT)
        if self.creep is not None and self.creep.observe(served_by):
            fired.append(FALLBACK_CREEP)
        if self.slices is not None:
            pairs = [(f"class={p}", is_fallback(who)) for who, p in zip(served_by, predictions) if p >= 0]
            if self.slices.observe(pairs, n):
                fired.append(SLICE_DISPARITY)
        self.counts.update(fired)
        return fired

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alarms": {s: self.counts.get(s, 0) for s in MONITOR_SIGNALS}}
        for name in ("routing", "latency", "creep", "slices"):
            m = getattr(self, name)
            out[name] = None if m is None else m.state()
        return out


def reference_p99_from_summary(summary: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict[str, dict[int, float]]:
    """``{stage: {bucket: p99}}`` from :meth:`LatencyProfile.summary` (a frozen reference)."""
    return {s: {int(b): float(v["p99"]) for b, v in d.items()} for s, d in summary.items()}
