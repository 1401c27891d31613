"""The HTTP server: Open Inference Protocol v2 routes and ``/metrics`` on FastAPI.

One :class:`ModelServer` serves one :class:`~fallbackformer.FallbackModel` under one name. Inference
runs on a dedicated thread pool (never on the event loop), so a slow model does not hold the health
checks. The latency budget of a request runs from its arrival: the model gets what is left of
``min(parameters.budget_ms, policy.budget_ms)`` after the body was read and parsed and the request
waited for a worker (:class:`~fallbackformer.serving.budget.RequestBudgets`, race-free).

>>> server = ModelServer(ff.load("checkpoints/digits"), "digits")   # doctest: +SKIP
>>> uvicorn.run(server.app, host="127.0.0.1", port=8080)             # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from fallbackformer.monitoring.prometheus import ServerMetrics
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.validation import InvalidInputError
from fallbackformer.serving import protocol as oip
from fallbackformer.serving.budget import RequestBudgets

log = logging.getLogger("fallbackformer.serving")

#: a request whose budget ran out while it waited still gets an answer (the fallback path's)
MIN_CALL_BUDGET_MS = 0.01


@dataclass
class ServeSettings:
    """How the server runs (the ``serve`` node of ``configs/serve.yaml``).

    Attributes:
        workers: inference threads (calls of the model that may run at once).
        max_body_bytes: larger request bodies get 413.
        warm_up_batch: batch size of the warm-up example built from the input spec.
        warm_up_repeats: timed calls per measurement in ``model.warm_up``.
        warm_up_batch_sizes: batch sizes profiled (default ``[1, warm_up_batch]``).
        drain_timeout_s: at shutdown, wait this long for requests in flight.
        close_timeout_s: at shutdown, wait this long for each hedging worker in ``model.close``.
        version: the model version reported by the protocol.
    """

    workers: int = 4
    max_body_bytes: int = 1 << 20
    warm_up_batch: int = 8
    warm_up_repeats: int = 10
    warm_up_batch_sizes: list[int] | None = None
    drain_timeout_s: float = 10.0
    close_timeout_s: float = 1.0
    version: str = "1"

    def __post_init__(self) -> None:
        for name in ("workers", "max_body_bytes", "warm_up_batch", "warm_up_repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ServeSettings.{name} must be an int >= 1; got {v!r}")


@dataclass
class _State:
    ready: threading.Event = field(default_factory=threading.Event)
    warm_error: str = ""
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelServer:
    """One model behind the Open Inference Protocol v2 and ``/metrics``.

    Args:
        model: the model to serve (its policy budget caps every request's ``budget_ms``).
        name: the model name in the routes (``/v2/models/{name}``); the bundle folder's name.
        settings: threads, limits, warm-up and shutdown (:class:`ServeSettings`).

    Attributes:
        app: the FastAPI application (run it with uvicorn; its lifespan warms up and closes the model).
        metrics: the Prometheus registry and the server's request counter and latency histogram.
        budgets: the per-request budgets of the model.
    """

    def __init__(self, model: FallbackModel, name: str, settings: ServeSettings | None = None) -> None:
        if not name or "/" in name:
            raise ValueError(f"model name must be a non-empty path segment; got {name!r}")
        self.model = model.eval()
        self.name = name
        self.settings = settings or ServeSettings()
        self.spec = model.input_spec
        oip.example_batch(self.spec, 1)  # fail now, with the fix, when the model has no input spec
        self.budgets = RequestBudgets(model)
        self.metrics = ServerMetrics(model, {"model": name}, budget_ms=self.budgets.base.budget_ms)
        self.state = _State()
        self._executor: ThreadPoolExecutor | None = None
        self._warm_thread: threading.Thread | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self) -> None:
        """Seed the latency profile on an example batch from the input spec; then the server is ready."""
        s = self.settings
        try:
            x = torch.from_numpy(oip.example_batch(self.spec, s.warm_up_batch))
            self.model.warm_up(x, repeats=s.warm_up_repeats, batch_sizes=s.warm_up_batch_sizes)
        except Exception as exc:  # not ready, and says why on /v2/health/ready
            self.state.warm_error = f"warm-up failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.state.warm_error)
            return
        self.state.ready.set()
        log.info("model %r is warm and ready", self.name)

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._executor = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="ff-serve")
        self._warm_thread = threading.Thread(target=self.warm_up, name="ff-serve-warm-up", daemon=True)
        self._warm_thread.start()
        try:
            yield
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Drain the requests in flight (bounded), then close the model and its sinks."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.state.in_flight:
            log.warning("shutdown: %d requests still in flight after %.1f s", self.state.in_flight,
                        self.settings.drain_timeout_s)
        if self._warm_thread is not None:
            self._warm_thread.join(timeout=self.settings.drain_timeout_s)
        if self._executor is not None:
            self._executor.shutdown(wait=self.state.in_flight == 0)
        self.model.close(timeout_s=self.settings.close_timeout_s)
        for sink in getattr(self.model, "sinks", []):
            close = getattr(sink, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:  # one broken sink does not stop the others from closing
                    log.error("closing sink %r failed: %s: %s", sink, type(exc).__name__, exc)
        log.info("model %r closed", self.name)

    # ------------------------------------------------------------------ inference

    def infer_sync(self, body: bytes, header_length: str | None, arrival_ns: int) -> dict[str, Any]:
        """Parse, answer and encode one request (on a worker thread).

        Raises:
            oip.ProtocolError: a bad request (400) with the reason.
        """
        req = oip.parse_infer_request(body, self.spec, header_length)
        try:
            budget_ms = self.budgets.effective_ms(req.budget_ms)
        except ValueError as exc:
            raise oip.ProtocolError(str(exc)) from None
        waited_ms = (time.monotonic_ns() - arrival_ns) / 1e6
        call_ms = max(budget_ms - waited_ms, MIN_CALL_BUDGET_MS)
        x = torch.from_numpy(req.x)
        try:
            with self.budgets.apply(call_ms):
                out = self.model(x)
        except InvalidInputError as exc:
            raise oip.ProtocolError(str(exc)) from None
        return oip.infer_response(out, self.name, req, budget_ms, self.settings.version)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise oip.ProtocolError(
                f"request body of {declared} bytes exceeds the limit of {limit} bytes; send smaller batches "
                "(or raise serve.max_body_bytes)", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise oip.ProtocolError(
                    f"request body exceeds the limit of {limit} bytes; send smaller batches "
                    "(or raise serve.max_body_bytes)", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_name(self, name: str) -> None:
        if name != self.name:
            raise oip.ProtocolError(f"unknown model {name!r}; this server serves {self.name!r}", status=404)

    # ------------------------------------------------------------------ routes

    def _build_app(self) -> FastAPI:
        app = FastAPI(title=f"fallbackformer: {self.name}", lifespan=self._lifespan, docs_url=None, redoc_url=None)
        metrics = self.metrics

        def error(status: int, message: str, route: str) -> JSONResponse:
            metrics.requests.labels(route, str(status)).inc()
            return JSONResponse({"error": message}, status_code=status)

        def ok(body: dict[str, Any], route: str, status: int = 200) -> JSONResponse:
            metrics.requests.labels(route, str(status)).inc()
            return JSONResponse(body, status_code=status)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            return error(exc.status_code, str(exc.detail), "other")

        @app.exception_handler(RequestValidationError)
        async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
            return error(400, f"bad request: {exc.errors()!s:.300}", "other")

        @app.get("/v2/health/live")
        async def live() -> JSONResponse:
            return ok({"live": True}, "live")

        @app.get("/v2/health/ready")
        async def ready() -> JSONResponse:
            if self.state.ready.is_set():
                return ok({"ready": True}, "ready")
            return ok({"ready": False, "error": self.state.warm_error or "warming up"}, "ready", 503)

        @app.get("/v2")
        async def server_metadata() -> JSONResponse:
            from fallbackformer import __version__

            return ok({"name": "fallbackformer", "version": __version__, "extensions": ["binary_tensor_data"]},
                      "server_metadata")

        @app.get("/v2/models/{name}")
        @app.get("/v2/models/{name}/versions/{version}")
        async def model_metadata(name: str, version: str | None = None) -> JSONResponse:
            try:
                self._check_name(name)
            except oip.ProtocolError as exc:
                return error(exc.status, str(exc), "model_metadata")
            return ok(oip.model_metadata(self.name, self.spec, self.settings.version), "model_metadata")

        @app.get("/v2/models/{name}/ready")
        @app.get("/v2/models/{name}/versions/{version}/ready")
        async def model_ready(name: str, version: str | None = None) -> JSONResponse:
            try:
                self._check_name(name)
            except oip.ProtocolError as exc:
                return error(exc.status, str(exc), "model_ready")
            is_ready = self.state.ready.is_set()
            return ok({"name": self.name, "ready": is_ready}, "model_ready", 200 if is_ready else 503)

        @app.post("/v2/models/{name}/infer")
        @app.post("/v2/models/{name}/versions/{version}/infer")
        async def infer(name: str, request: Request, version: str | None = None) -> JSONResponse:
            arrival_ns = time.monotonic_ns()
            t0 = time.perf_counter()
            with self.state.lock:
                self.state.in_flight += 1
            try:
                self._check_name(name)
                if not self.state.ready.is_set():
                    raise oip.ProtocolError(
                        f"model {self.name!r} is not ready ({self.state.warm_error or 'warming up'}); "
                        "retry when /v2/health/ready answers 200", status=503)
                body = await self._read_body(request)
                loop = asyncio.get_running_loop()
                header = request.headers.get("inference-header-content-length")
                result = await loop.run_in_executor(self._executor, self.infer_sync, body, header, arrival_ns)
                response = ok(result, "infer")
            except oip.ProtocolError as exc:
                response = error(exc.status, str(exc), "infer")
            except Exception as exc:  # the model failed: an OIP error, logged, never a stack to the client
                log.exception("inference failed")
                response = error(500, f"internal error: {type(exc).__name__}: {exc!s:.300}", "infer")
            finally:
                with self.state.lock:
                    self.state.in_flight -= 1
            metrics.latency.observe(time.perf_counter() - t0)
            return response

        @app.get("/metrics")
        async def scrape() -> Response:
            metrics.requests.labels("metrics", "200").inc()
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return app
