"""Fault tests (issue 12, deadline and runtime): each reproduces a way a call overran its budget.

Deterministic: stages and students take scripted time on a FakeClock; a real-time safety timer only
turns a would-be hang into a failure.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from fallbackformer.monitoring.sinks import CallbackSink
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import HANG, MonotonicClock
from fallbackformer.runtime.events import ListSink
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.testing import ConstHead, build

X = torch.zeros(1, 4)


def _safety(*releasables: object, after_s: float = 5.0) -> threading.Timer:
    """Release hangs after ``after_s`` real seconds so a failing test fails instead of hanging."""
    def release() -> None:
        for r in releasables:
            r.release() if hasattr(r, "release") else r.set()  # type: ignore[union-attr]

    timer = threading.Timer(after_s, release)
    timer.daemon = True
    timer.start()
    return timer


def test_the_default_policy_bounds_a_primary_that_hangs_on_its_first_call():
    assert Policy().hedge == "always"
    model, clock, stages, _ = build([HANG], student_script=1.0, budget_ms=20.0)
    timer = _safety(stages[0])
    try:
        out = model(X)
        assert out.served_by == [R.STUDENT] and out.reason == [R.DEADLINE_EXCEEDED]
        assert out.latency_ms <= 20.0
    finally:
        timer.cancel()
        stages[0].release()
        model.close(timeout_s=1.0)


def test_a_slow_student_is_bounded_and_the_default_answers_with_deadline_exceeded():
    model, clock, stages, student = build([HANG], student_script=200.0, budget_ms=20.0, hedge="always")
    timer = _safety(stages[0])
    try:
        out = model(X)
        assert out.latency_ms <= 20.0
        assert out.served_by == [R.DEFAULT] and out.reason == [R.DEADLINE_EXCEEDED]
    finally:
        timer.cancel()
        stages[0].release()
        clock.release_workers()
        model.close(timeout_s=1.0)


def test_a_hanging_student_does_not_hang_the_call_after_the_primary_rejects():
    # the primary answers fast but unsure (low_confidence); the student then hangs forever
    model, clock, stages, student = build([1.0], student_script=HANG, budget_ms=20.0, heads={0: ConstHead(2, sharp=0.0)})
    timer = _safety(student)
    try:
        out = model(X)
        assert out.latency_ms <= 20.0
        assert out.served_by == [R.DEFAULT] and out.reason == [R.DEADLINE_EXCEEDED]
    finally:
        timer.cancel()
        student.release()
        model.close(timeout_s=1.0)


def test_a_blocking_sink_never_holds_the_call_and_a_full_queue_drops_and_counts():
    model, clock, _, _ = build([0.0], student_script=0.0, budget_ms=20.0, hedge="off", heads={0: ConstHead(2, sharp=0.0)},
                               event_queue=2)
    gate = threading.Event()
    seen: list[int] = []
    model.sinks.append(CallbackSink(lambda e: (gate.wait(10.0), seen.append(threading.get_ident()))))
    timer = _safety(gate)
    try:
        for _ in range(6):
            out = model(X)
            assert out.served_by == [R.STUDENT]
        assert not gate.is_set(), "a call waited for the blocked sink"
        assert model.stats()["events_dropped"] >= 3
    finally:
        timer.cancel()
        gate.set()
        model.flush_events(timeout_s=5.0)
        model.close(timeout_s=1.0)
    assert seen and threading.get_ident() not in seen


def test_latency_ms_is_the_whole_call_including_the_bookkeeping_after_the_answer():
    # the primary's gate accepts nothing: the student answers at 2 + 1 ms, and its event is given
    # to an in-caller sink that takes 3 ms more
    model, clock, _, _ = build([2.0], student_script=1.0, thresholds=[math.inf, 0.5], budget_ms=20.0, hedge="off")

    class SlowSink:
        nonblocking = True  # given its events on the caller's thread

        def emit(self, event):
            clock.advance(3.0)

    model.sinks = [SlowSink()]
    out = model(X)
    assert out.served_by == [R.STUDENT] and out.latency_ms == pytest.approx(6.0)


def test_a_stuck_worker_does_not_starve_the_next_calls_and_is_counted():
    model, clock, stages, _ = build([HANG, 1.0], budget_ms=20.0, hedge="always", hedge_workers=1)
    stages[0].script = [HANG, 1.0]
    timer = _safety(stages[0])
    try:
        first = model(X)
        assert first.served_by == [R.STUDENT] and first.reason == [R.DEADLINE_EXCEEDED]
        second = model(X)
        assert second.served_by == [R.PRIMARY]  # a new worker beside the stuck one
        hedge = model.stats()["hedge"]
        assert hedge["stuck"] == 1 and hedge["workers"] == 2
    finally:
        timer.cancel()
        stages[0].release()
        model.close(timeout_s=1.0)


def test_calls_beyond_max_concurrency_are_served_by_the_student_at_once():
    model, _, _, _ = build([0.0], student_script=0.0, clock=MonotonicClock(), budget_ms=1e6, hedge="off",
                           max_concurrency=1)
    entered, release = threading.Event(), threading.Event()
    stage = model.primary.stages[0]  # a ScriptedDelay: its inner module is swapped below
    identity = stage.inner

    class Blocking(torch.nn.Module):
        def forward(self, h):
            entered.set()
            release.wait(10.0)
            return identity(h)

    stage.inner = Blocking()
    worker = threading.Thread(target=model, args=(X,), daemon=True)
    worker.start()
    try:
        assert entered.wait(10.0)
        stage.inner = identity
        out = model(X)
        assert out.served_by == [R.STUDENT] and out.reason == [R.DEADLINE_PREDICTED]
        assert model.stats()["concurrency_refused"] == 1
    finally:
        release.set()
        worker.join(10.0)
    assert model(X).served_by == [R.PRIMARY]


def test_a_batch_over_max_batch_is_split_or_refused_as_the_policy_says():
    model, _, stages, _ = build([1.0], budget_ms=20.0, hedge="off", max_batch=4)
    sizes: list[int] = []
    stages[0].register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    out = model(torch.zeros(10, 4))
    assert out.served_by == [R.PRIMARY] * 10 and out.prediction.shape == (10,) and out.logits.shape == (10, 3)
    assert sizes == [4, 4, 2] and out.latency_ms <= 20.0
    refusing, _, _, _ = build([1.0], budget_ms=20.0, hedge="off", max_batch=4, on_large_batch="raise")
    with pytest.raises(ValueError, match=r"batch of 10.*max_batch=4"):
        refusing(torch.zeros(10, 4))


def test_load_warms_the_runtime_from_the_input_spec_unless_told_not_to(tmp_path):
    import fallbackformer as ff

    torch.manual_seed(0)
    primary = ff.create_model("digits_cnn_exits", width=4).eval()
    student = ff.create_model("digits_mlp_student", hidden=16).eval()
    gates = [ff.ConfidenceGate(temperature=1.0, threshold=0.5) for _ in range(primary.num_exits + 1)]
    spec = ff.InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0))
    model = ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=20.0), input_spec=spec).eval()
    path = ff.save(model, tmp_path / "b")
    loaded = ff.load(path)
    try:
        report = loaded.warm_report
        assert report["passes"] >= 1 and report["workers"] == 2 and report["skipped"] == ""
        assert loaded.stats()["calls"] == 0
        assert loaded.stats()["hedge"]["workers"] == 1 and loaded.stats()["student_hedge"]["workers"] == 1
    finally:
        loaded.close(timeout_s=1.0)
    cold = ff.load(path, warm_up=False)
    assert cold.warm_report is None and "hedge" not in cold.stats()


@pytest.mark.slow
def test_the_interpreter_exits_cleanly_after_multithreaded_hedged_use(tmp_path):
    """Workers still inside torch at exit used to abort the process (SIGABRT, 9 runs in 20)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, threading, torch\n"
        "import fallbackformer as ff\n"
        "torch.set_num_threads(1)\n"
        "primary = ff.create_model('digits_cnn_exits', width=16).eval()\n"
        "student = ff.create_model('digits_mlp_student', hidden=16).eval()\n"
        "gates = [ff.ConfidenceGate(temperature=1.0, threshold=0.99) for _ in range(primary.num_exits + 1)]\n"
        "model = ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=2.0)).eval()\n"
        "x = torch.rand(64, 1, 8, 8) * 16\n"
        "stage = model.primary.stages[1]\n"
        "stage.register_forward_hook(lambda m, a, out: [m.forward(*a) for _ in range(49)][-1])  # stalls: workers busy at exit\n"
        "def run():\n"
        "    for _ in range(20):\n"
        "        model(x)\n"
        "threads = [threading.Thread(target=run) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "if sys.argv[1] == 'close':\n"
        "    model.close(timeout_s=1.0)\n"
    )
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    codes = [subprocess.run([sys.executable, str(script), "close" if i % 2 else "exit"], env=env,
                            capture_output=True, timeout=120).returncode for i in range(20)]
    assert codes == [0] * 20, codes
