"""Overload in the server: a bounded number of requests run the model; the rest get a recorded default.

In process (FastAPI TestClient), no timing asserts: a slot is held by a model call blocked on an event,
and the return allowance is fed by hand.
"""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from fallbackformer.runtime import reasons as R
from fallbackformer.serving import ModelServer, ServeSettings
from fallbackformer.serving.overload import InflightBound, ReturnAllowance
from tests.unit.serving.conftest import tiny_model

SETTINGS = ServeSettings(workers=1, warm_up_batch=2, warm_up_repeats=1, freeze_gc=False)


def _body(n: int = 1) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, 4], "data": [1.0] * (4 * n)}]}


def _outputs(resp: dict) -> dict[str, list]:
    return {o["name"]: o["data"] for o in resp["outputs"]}


def _metric(client: TestClient, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_inflight_bound_counts_slots():
    bound = InflightBound(2)
    assert bound.try_acquire() and bound.try_acquire() and not bound.try_acquire()
    bound.release()
    assert bound.busy == 1 and bound.try_acquire()
    assert "2 requests" in bound.detail
    with pytest.raises(ValueError, match="slots"):
        InflightBound(0)


def test_return_allowance_keeps_a_high_quantile_of_recent_returns():
    allowance = ReturnAllowance(window=100, quantile=0.99, floor_ms=0.5)
    assert allowance.ms == 0.5
    for _ in range(100):
        allowance.add(1.0)
    assert allowance.ms == 1.0
    allowance.add(30.0)  # a long return counts at once
    assert allowance.ms == 30.0
    for _ in range(128):  # and leaves with the window (looked at every 32 returns)
        allowance.add(2.0)
    assert allowance.ms == 2.0
    with pytest.raises(ValueError, match="quantile"):
        ReturnAllowance(quantile=0.0)


def test_a_request_that_finds_every_slot_busy_gets_the_default_at_once():
    model = tiny_model()
    server = ModelServer(model, "tiny", SETTINGS)
    entered, release = threading.Event(), threading.Event()
    original = model.student.forward

    def held(x):
        entered.set()
        assert release.wait(60)
        return original(x)

    with TestClient(server.app) as client:
        assert server.state.ready.wait(60)
        model.student.forward = held  # exit_1 rejects and the final gate rejects: the student runs
        model.gates["primary"].threshold.fill_(float("inf"))
        result = {}
        t = threading.Thread(target=lambda: result.update(r=client.post("/v2/models/tiny/infer", json=_body())))
        t.start()
        try:
            assert entered.wait(60)  # the only slot is taken
            r = client.post("/v2/models/tiny/infer", json=_body(2))
            assert r.status_code == 200
            out = _outputs(r.json())
            assert out["served_by"] == ["default"] * 2 and out["reason"] == [R.DEADLINE_PREDICTED] * 2
            assert out["prediction"] == [-1, -1] and out["confidence"] == [None, None]
            bad = client.post("/v2/models/tiny/infer", json={"inputs": [{"name": "x", "datatype": "FP32",
                                                                          "shape": [1, 4], "data": [1.0, 2.0]}]})
            assert bad.status_code == 400  # a shed request is still checked
        finally:
            release.set()
            t.join(60)
        assert _outputs(result["r"].json())["served_by"] == ["student"]
        assert _metric(client, "fallbackformer_server_shed_total") == 1
        assert _metric(client, "fallbackformer_answers_total", served_by="default") == 2  # the model recorded it
        assert server.bound.busy == 0


def test_no_model_call_when_answers_could_not_come_back_in_time():
    model = tiny_model(budget_ms=50.0)
    server = ModelServer(model, "tiny", SETTINGS)
    with TestClient(server.app) as client:
        assert server.state.ready.wait(60)
        assert _outputs(client.post("/v2/models/tiny/infer", json=_body()).json())["served_by"] != ["default"]
        for _ in range(600):
            server.allowance.add(60.0)  # answers have been taking longer than the budget to get back
        calls = model.stats()["calls"]
        out = _outputs(client.post("/v2/models/tiny/infer", json=_body()).json())
        assert out["served_by"] == ["default"] and out["reason"] == [R.DEADLINE_PREDICTED]
        assert model.stats()["calls"] == calls + 1 and server.bound.busy == 0
        for _ in range(600):
            server.allowance.add(1.0)  # the loop is quick again: the model answers again
        assert _outputs(client.post("/v2/models/tiny/infer", json=_body()).json())["served_by"] != ["default"]


def test_workers_default_to_the_cores():
    from fallbackformer.runtime.policy import usable_cores

    assert ModelServer(tiny_model(), "tiny", ServeSettings(freeze_gc=False)).bound.slots == usable_cores()
    with pytest.raises(ValueError, match="workers"):
        ServeSettings(workers=0)
