"""The OIP v2 routes in process (FastAPI TestClient: no socket, no timing asserts)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import fallbackformer as ff
from fallbackformer.serving import ModelServer, ServeSettings
from tests.unit.serving.conftest import LIFTED_MS, Sink, load_digits, tiny_model

SETTINGS = ServeSettings(workers=2, warm_up_batch=4, warm_up_repeats=2, freeze_gc=False)  # (the test process keeps its heap)


def _request(x: np.ndarray | torch.Tensor, nested: bool = False, **params) -> dict:
    x = np.asarray(x, dtype=np.float32)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.tolist() if nested else x.reshape(-1).tolist()}]}
    if params:
        body["parameters"] = params
    return body


def _outputs(resp: dict) -> dict[str, list]:
    return {o["name"]: o["data"] for o in resp["outputs"]}


@pytest.fixture(scope="module")
def reference():
    """The same bundle, called directly: what the server must answer."""
    return load_digits()


@pytest.fixture(scope="module")
def digits_client():
    server = ModelServer(load_digits(), "digits", SETTINGS)
    with TestClient(server.app) as client:
        assert server.state.ready.wait(120), server.state.warm_error
        yield server, client


def test_health_live_and_ready_after_warm_up(digits_client):
    server, client = digits_client
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/digits/ready").status_code == 200
    assert server.model.profile.count("student") > 0  # warm_up ran on the example batch


def test_not_ready_before_warm_up_answers_503():
    server = ModelServer(tiny_model(), "tiny", SETTINGS)
    client = TestClient(server.app)  # no lifespan: the warm-up never starts
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 503
    r = client.post("/v2/models/tiny/infer", json=_request(np.zeros((1, 4))))
    assert r.status_code == 503 and "not ready" in r.json()["error"]


def test_model_metadata_and_unknown_model(digits_client):
    _, client = digits_client
    meta = client.get("/v2/models/digits").json()
    assert meta["name"] == "digits"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "prediction": "INT64", "confidence": "FP32", "served_by": "BYTES", "reason": "BYTES"}
    for path in ("/v2/models/other", "/v2/models/other/ready"):
        r = client.get(path)
        assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"]
    r = client.post("/v2/models/other/infer", json=_request(np.zeros((1, 1, 8, 8))))
    assert r.status_code == 404 and "digits" in r.json()["error"]


@pytest.mark.parametrize("nested", [False, True])
def test_infer_matches_the_runtime_on_digits(digits_client, reference, digits_test_images, nested):
    _, client = digits_client
    x, _ = digits_test_images
    x = x[:32]
    r = client.post("/v2/models/digits/infer", json={**_request(x, nested=nested), "id": "req-7"})
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"] == "req-7" and resp["model_name"] == "digits"
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in resp["outputs"]}
    assert shapes == {"prediction": ("INT64", [32]), "confidence": ("FP32", [32]),
                      "served_by": ("BYTES", [32]), "reason": ("BYTES", [32])}
    got = _outputs(resp)
    ref = reference(x)
    assert got["prediction"] == ref.prediction.tolist()
    assert got["served_by"] == ref.served_by and got["reason"] == ref.reason
    np.testing.assert_allclose(np.array(got["confidence"], dtype=float), ref.confidence.numpy(), rtol=1e-6)


def test_infer_binary_tensor_extension_and_output_selection(digits_client, reference, digits_test_images):
    _, client = digits_client
    x = digits_test_images[0][:5].numpy().astype("<f4")
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 1, 8, 8],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "served_by"}]}).encode()
    r = client.post("/v2/models/digits/infer", content=header + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["served_by"]
    assert r.json()["outputs"][0]["data"] == reference(torch.from_numpy(x)).served_by


def _bad(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


GOOD = np.zeros((2, 1, 8, 8), dtype=np.float32)
NAN = GOOD.copy()
NAN[1, 0, 3, 3] = np.nan


@pytest.mark.parametrize("body,expect", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    ({"inputs": []}, "exactly one tensor"),
    ({"inputs": [{**_request(GOOD)["inputs"][0], "name": "y"}]}, "unknown input 'y'"),
    ({"inputs": [{**_request(GOOD)["inputs"][0], "datatype": "INT32"}]}, "send FP32"),
    ({"inputs": [{**_request(GOOD)["inputs"][0], "shape": [2, 64]}]}, "[B, 1, 8, 8]"),
    ({"inputs": [{**_request(GOOD)["inputs"][0], "shape": [3, 1, 8, 8]}]}, "needs 192"),
    ({"inputs": [{**_request(GOOD)["inputs"][0], "data": [[1.0], [1.0, 2.0]]}]}, "not a regular array"),
    ({"inputs": [{**_request(GOOD)["inputs"][0], "data": ["a"] * 128}]}, "not a regular array"),
    ({"inputs": [{**_request(GOOD)["inputs"][0], "shape": [0, 1, 8, 8]}]}, "empty"),
    (_request(NAN), "non-finite values"),
    (_request(GOOD * 0 + 99), "outside the input range"),
    (_request(GOOD, budget_ms=-1), "budget_ms"),
    (_request(GOOD, budget_ms="fast"), "budget_ms"),
    ({**_request(GOOD), "outputs": [{"name": "logits"}]}, "unknown output"),
])
def test_bad_requests_get_400_with_the_reason(digits_client, body, expect):
    _, client = digits_client
    r = client.post("/v2/models/digits/infer", content=_bad(body))
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and expect in r.json()["error"]
    assert "Traceback" not in r.text


def test_body_over_the_limit_gets_413():
    server = ModelServer(tiny_model(), "tiny", ServeSettings(max_body_bytes=200, warm_up_repeats=1, freeze_gc=False))
    with TestClient(server.app) as client:
        assert server.state.ready.wait(60)
        r = client.post("/v2/models/tiny/infer", json=_request(np.zeros((50, 4))))
        assert r.status_code == 413 and "limit of 200 bytes" in r.json()["error"]
        assert client.post("/v2/models/tiny/infer", json=_request(np.zeros((1, 4)))).status_code == 200


def test_model_failure_is_a_500_in_the_oip_form_without_a_stack():
    server = ModelServer(tiny_model(), "tiny", SETTINGS)

    def boom(x):
        raise RuntimeError("stage exploded")

    with TestClient(server.app, raise_server_exceptions=False) as client:
        assert server.state.ready.wait(60)
        server.model.forward = boom  # (the instance attribute shadows FallbackModel.forward)
        r = client.post("/v2/models/tiny/infer", json=_request(np.zeros((1, 4))))
    assert r.status_code == 500
    assert r.json() == {"error": "internal error: RuntimeError: stage exploded"}


def test_request_budget_is_capped_by_the_policy():
    server = ModelServer(tiny_model(budget_ms=50.0), "tiny", SETTINGS)
    with TestClient(server.app) as client:
        assert server.state.ready.wait(60)
        asked = {5.0: 5.0, 500.0: 50.0, None: 50.0}
        for budget, expected in asked.items():
            params = {} if budget is None else {"budget_ms": budget}
            r = client.post("/v2/models/tiny/infer", json=_request(np.ones((2, 4)), **params))
            assert r.json()["parameters"]["budget_ms"] == expected


def test_slow_model_does_not_block_health_checks():
    """A call stuck in the model holds one worker thread, never the event loop."""
    model = tiny_model()
    server = ModelServer(model, "tiny", SETTINGS)
    entered, release = threading.Event(), threading.Event()
    original = model.student.forward

    def slow_student(x):
        entered.set()
        assert release.wait(60)
        return original(x)

    with TestClient(server.app) as client:
        assert server.state.ready.wait(60)
        model.student.forward = slow_student  # exit_1 rejects, the final gate accepts: force the student
        model.gates["primary"].threshold.fill_(float("inf"))
        result = {}
        t = threading.Thread(target=lambda: result.update(r=client.post("/v2/models/tiny/infer",
                                                                        json=_request(np.ones((1, 4))))))
        t.start()
        assert entered.wait(60)
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/metrics").status_code == 200
        release.set()
        t.join(60)
    assert result["r"].status_code == 200 and _outputs(result["r"].json())["served_by"] == ["student"]


def test_shutdown_closes_the_model_and_its_sinks():
    sink = Sink()
    model = tiny_model(sinks=[sink])
    model.gates["primary"].threshold.fill_(float("inf"))  # the student answers: a fallback event per sample
    closed = []
    model.close = lambda timeout_s=0.0: closed.append(timeout_s)
    server = ModelServer(model, "tiny", SETTINGS)
    with TestClient(server.app) as client:
        assert server.state.ready.wait(60)
        assert client.post("/v2/models/tiny/infer", json=_request(np.ones((3, 4)))).status_code == 200
    assert closed == [SETTINGS.close_timeout_s] and sink.closed
    assert [e.served_by for e in sink.events] == ["student"] * 3
