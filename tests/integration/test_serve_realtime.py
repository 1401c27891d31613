"""The server on a real loopback socket: a bounded load test and the Triton HTTP client (realtime)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest


pytestmark = [pytest.mark.realtime, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "checkpoints" / "digits"
BUDGET_MS = 50.0  # the bundle policy's budget (the server runs with it)
REQUESTS, CLIENTS = 2000, 16
TOLERANCE_MS = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """``python scripts/serve.py bundle=... port=...`` in a subprocess on 127.0.0.1 (its own GIL and
    cores); stopped with SIGTERM, which must drain and exit cleanly."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), f"bundle={BUNDLE}", f"port={port}",
           "log_level=warning", "serve.warm_up_repeats=20",
           f"hydra.run.dir={tmp_path_factory.mktemp('serve')}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    host = f"127.0.0.1:{port}"
    try:
        for _ in range(1200):  # up to about 2 minutes to load, warm up and listen
            assert proc.poll() is None, f"the server exited with {proc.returncode}"
            try:
                if httpx.get(f"http://{host}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the server did not become ready")
        yield proc, host
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # uvicorn drains, runs the lifespan shutdown (the model and sinks are closed), then re-raises the
    # signal it caught (uvicorn >= 0.29), so a clean exit is 0 or -SIGTERM; a hang is killed above
    assert code in (0, -signal.SIGTERM), f"the server exited with {code} on SIGTERM"


def ff_budget() -> float:
    import json

    return float(json.loads((BUNDLE / "manifest.json").read_text())["policy"]["budget_ms"])


def _families(text: str):
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))


def _histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    buckets, count = [], 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == f"{name}_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == f"{name}_count":
                count = s.value
    return sorted(buckets), count


def _counter(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_loopback_load_meets_the_budget(live_server):
    import httpx

    from fallbackformer.data.digits import load_digits_splits

    _, host = live_server
    x = load_digits_splits(seed=0)["test"][0].numpy()
    bodies = [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8],
                           "data": x[i % len(x)].reshape(-1).tolist()}]} for i in range(REQUESTS)]
    before = _counter(httpx.get(f"http://{host}/metrics").text, "fallbackformer_server_requests_total", route="infer")

    def client(k: int) -> list[int]:
        with httpx.Client(base_url=f"http://{host}", timeout=30) as c:
            return [c.post("/v2/models/digits/infer", json=b).status_code for b in bodies[k::CLIENTS]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        codes = [code for codes in pool.map(client, range(CLIENTS)) for code in codes]
    wall = time.perf_counter() - t0
    assert len(codes) == REQUESTS and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}

    text = httpx.get(f"http://{host}/metrics").text
    answered = _counter(text, "fallbackformer_server_requests_total", route="infer") - before
    assert answered == REQUESTS
    buckets, count = _histogram(text, "fallbackformer_server_request_latency_seconds")
    budget_ms = BUDGET_MS
    assert ff_budget() == budget_ms
    p999 = next(le for le, n in buckets if n >= 0.999 * count)  # the bucket's upper edge: conservative
    served = {s.labels["served_by"]: s.value for fam in _families(text) for s in fam.samples
              if s.name == "fallbackformer_answers_total"}
    p50 = next(le for le, n in buckets if n >= 0.5 * count)
    p99 = next(le for le, n in buckets if n >= 0.99 * count)
    print(f"\nload: {REQUESTS} requests, {CLIENTS} clients, {wall:.2f} s ({REQUESTS / wall:.0f} req/s); "
          f"server latency p50 <= {p50 * 1000:.1f} ms, p99 <= {p99 * 1000:.1f} ms, p99.9 <= {p999 * 1000:.1f} ms "
          f"(bucket edges; budget {budget_ms} ms); served_by {served}")
    assert p999 * 1000 <= budget_ms + TOLERANCE_MS


def test_tritonclient_speaks_to_our_server(live_server):
    try:
        import tritonclient.http as httpclient
    except (ImportError, RuntimeError) as exc:  # tritonclient without its [http] extra (geventhttpclient)
        pytest.skip(f"tritonclient[http] is not installed: {exc}")

    from fallbackformer.data.digits import load_digits_splits

    _, host = live_server
    x = load_digits_splits(seed=0)["test"][0][:4].numpy().astype(np.float32)
    client = httpclient.InferenceServerClient(url=host)
    assert client.is_server_live()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["name"] == "x"
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # the binary tensor extension (tritonclient's default)
    result = client.infer("digits", [inp])
    prediction = result.as_numpy("prediction")
    served_by = result.as_numpy("served_by")
    assert prediction.shape == (4,) and prediction.dtype == np.int64
    assert result.as_numpy("confidence").dtype == np.float32
    assert all(s in ("exit_1", "exit_2", "exit_3", "primary", "student", "default") for s in served_by)
    json_inp = httpclient.InferInput("x", list(x.shape), "FP32")
    json_inp.set_data_from_numpy(x, binary_data=False)
    again = client.infer("digits", [json_inp], outputs=[httpclient.InferRequestedOutput("reason", binary_data=False)])
    assert again.as_numpy("reason").shape == (4,)
    client.close()
