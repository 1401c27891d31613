"""Real time (marked ``realtime``, bounded): the default policy keeps a 20 ms budget (issue 12).

A primary hanging forever on its first call, a 200 ms student with a blocking sink, 8 threads x 500
calls, and 10% stalls of 200 ms. Run with ``-m realtime -s`` to see the measured figures; on a loaded
machine they are the machine's, not the runtime's.
"""

from __future__ import annotations

import gc
import random
import threading
import time

import pytest
import torch

import fallbackformer as ff
from fallbackformer.monitoring.sinks import CallbackSink
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import HANG, MonotonicClock
from fallbackformer.runtime.testing import ConstHead, build
from fallbackformer.runtime.warm import freeze_heap

pytestmark = pytest.mark.realtime

BUDGET_MS = 20.0
MARGIN_MS = ff.Policy().margin_ms  # the default policy's


def _timed(model: ff.FallbackModel, x: torch.Tensor) -> tuple[ff.FallbackOutput, float]:
    t0 = time.perf_counter_ns()
    out = model(x)
    return out, (time.perf_counter_ns() - t0) / 1e6


def _figures(name: str, latencies: list[float]) -> tuple[float, float]:
    s = sorted(latencies)
    p999 = s[min(len(s) - 1, int(0.999 * len(s)))]
    print(f"\n{name}: calls={len(s)} p50={s[len(s) // 2]:.2f} p99={s[int(0.99 * len(s))]:.2f} "
          f"p99.9={p999:.2f} max={s[-1]:.2f} ms")
    return p999, s[-1]


def test_a_primary_hanging_forever_on_its_first_call_returns_within_budget():
    model, _, stages, _ = build([HANG], student_script=0.0, clock=MonotonicClock(),  # type: ignore[arg-type]
                                budget_ms=BUDGET_MS, margin_ms=MARGIN_MS)
    try:
        out, ms = _timed(model, torch.zeros(1, 4))
        print(f"\nfirst-call hang: {ms:.2f} ms, {out.served_by} {out.reason}")
        assert out.served_by == [R.STUDENT] and out.reason == [R.DEADLINE_EXCEEDED]
        assert ms <= BUDGET_MS + 5.0
    finally:
        stages[0].release()
        model.close(timeout_s=1.0)


def test_a_200ms_student_and_a_blocking_sink_keep_every_call_within_budget():
    model, _, _, student = build([0.0], student_script=200.0, clock=MonotonicClock(),  # type: ignore[arg-type]
                                 budget_ms=BUDGET_MS, margin_ms=MARGIN_MS, heads={0: ConstHead(2, sharp=0.0)})
    model.sinks.append(CallbackSink(lambda e: time.sleep(0.5)))
    try:
        results = [_timed(model, torch.zeros(1, 4)) for _ in range(30)]
        p999, worst = _figures("200 ms student + blocking sink", [ms for _, ms in results])
        assert all(out.served_by == [R.DEFAULT] and out.reason == [R.DEADLINE_EXCEEDED] for out, _ in results)
        assert all(abs(out.latency_ms - ms) < 2.0 for out, ms in results)  # latency_ms is the whole call
        assert worst <= BUDGET_MS + 5.0
    finally:
        model.close(timeout_s=1.0)


def _digits_model(**policy) -> ff.FallbackModel:
    torch.manual_seed(0)
    primary = ff.create_model("digits_cnn_exits", width=4).eval()
    student = ff.create_model("digits_mlp_student", hidden=16).eval()
    gates = [ff.ConfidenceGate(temperature=1.0, threshold=0.5) for _ in range(primary.num_exits + 1)]
    spec = ff.InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0))
    return ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=BUDGET_MS, **policy), input_spec=spec).eval()


def test_8_threads_x_500_calls_keep_the_budget():
    model = _digits_model()
    model.warm_start()
    # As a serving process does after loading (README, scripts/serve.py): freeze the heap, else a full
    # collection of this process (pytest and torch: 200,000+ objects, 100-500 ms here) lands inside
    # the run when the calls in flight have promoted enough objects, and stops every thread at once;
    # that is the collector's pause, not the runtime's, and no budget survives it.
    freeze_heap()
    x = torch.rand(1, 1, 8, 8) * 16
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        mine = [_timed(model, x)[1] for _ in range(500)]
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        p999, worst = _figures("8 threads x 500", latencies)
        print(f"stats: served={model.stats()['served_by']} reasons={model.stats()['reasons']}")
        assert len(latencies) == 4000
        assert p999 <= BUDGET_MS + 2.0 and worst <= BUDGET_MS + 10.0
    finally:
        model.close(timeout_s=1.0)
        gc.unfreeze()


def test_under_10pct_stalls_of_200ms_the_primary_path_still_serves_most_calls():
    rng = random.Random(0)
    stall = lambda: 200.0 if rng.random() < 0.1 else 0.0  # noqa: E731
    model, _, stages, _ = build([stall], student_script=0.0, clock=MonotonicClock(),  # type: ignore[arg-type]
                                budget_ms=BUDGET_MS, margin_ms=MARGIN_MS)
    x = torch.zeros(1, 4)
    latencies, primary = [], 0
    try:
        for _ in range(1000):
            out, ms = _timed(model, x)
            latencies.append(ms)
            primary += out.served_by == [R.PRIMARY]
            time.sleep(0.002)
        p999, worst = _figures("10% stalls of 200 ms", latencies)
        print(f"primary path: {primary / 10:.1f}%; hedge={model.stats()['hedge']}")
        assert p999 <= BUDGET_MS + 2.0
        assert primary >= 850
    finally:
        model.close(timeout_s=1.0)
