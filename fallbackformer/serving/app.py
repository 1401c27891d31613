"""The HTTP server: Open Inference Protocol v2 routes and ``/metrics`` on FastAPI.

One :class:`ModelServer` serves one :class:`~fallbackformer.FallbackModel` under one name. Inference
runs on a dedicated thread pool (never on the event loop), so a slow model does not hold the health
checks. At most ``serve.workers`` requests (one per core by default) run the model at once; a request
that finds them all busy is answered at once on the event loop by the safe default, recorded by the
model (``deadline_predicted``; :mod:`fallbackformer.serving.overload`). The latency budget of a
request runs from its arrival: the model gets what is left of ``min(parameters.budget_ms,
policy.budget_ms)`` after the body was read and parsed and the request waited for a worker, less the
time recent requests needed to get back to the client once the model had answered
(:class:`~fallbackformer.serving.overload.ReturnAllowance`); per-call budgets are race-free
(:class:`~fallbackformer.serving.budget.RequestBudgets`).

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
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from fallbackformer.monitoring.prometheus import ServerMetrics
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import usable_cores
from fallbackformer.runtime.validation import InvalidInputError
from fallbackformer.runtime.warm import freeze_heap
from fallbackformer.serving import protocol as oip
from fallbackformer.serving.budget import RequestBudgets
from fallbackformer.serving.overload import InflightBound, ReturnAllowance

log = logging.getLogger("fallbackformer.serving")

#: a request with less than this left for the model (after its wait and the return allowance) is
#: answered by the safe default at once, recorded (``FallbackModel.shed``)
MIN_CALL_BUDGET_MS = 1.0
#: seconds between two probes of the hop back to the event loop (ReturnAllowance)
PROBE_EVERY_S = 0.01


@dataclass
class ServeSettings:
    """How the server runs (the ``serve`` node of ``configs/serve.yaml``).

    Attributes:
        workers: requests that run the model at once, each on its own inference thread (``None``:
            one per core the process may use). A request that finds them all busy does not queue:
            the safe default answers it at once, recorded ``deadline_predicted`` (more threads would
            share the same cores and interpreter lock, and every request would miss its deadline).
        max_body_bytes: larger request bodies get 413.
        warm_up_batch: batch size of the warm-up example built from the input spec.
        warm_up_repeats: timed calls per measurement in ``model.warm_up``.
        warm_up_batch_sizes: batch sizes profiled (default ``[1, warm_up_batch]``).
        drain_timeout_s: at shutdown, wait this long for requests in flight.
        close_timeout_s: at shutdown, wait this long for each hedging worker in ``model.close``.
        version: the model version reported by the protocol.
        freeze_gc: after the warm-up, collect once and freeze the heap
            (:func:`~fallbackformer.runtime.warm.freeze_heap`): a full collection of a torch process
            stops every thread for 100-500 ms on the 2-core dev machine, longer than any budget.
    """

    workers: int | None = None
    max_body_bytes: int = 1 << 20
    warm_up_batch: int = 8
    warm_up_repeats: int = 10
    warm_up_batch_sizes: list[int] | None = None
    drain_timeout_s: float = 10.0
    close_timeout_s: float = 1.0
    version: str = "1"
    freeze_gc: bool = True

    def __post_init__(self) -> None:
        for name in ("workers", "max_body_bytes", "warm_up_batch", "warm_up_repeats"):
            v = getattr(self, name)
            if name == "workers" and v is None:
                continue
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
        self.bound = InflightBound(self.settings.workers or usable_cores())
        self.allowance = ReturnAllowance()
        self._shed_counter = Counter(
            "fallbackformer_server_shed", "Inference requests answered by the safe default without running the "
            "model: every inference slot busy, or no time left for it (recorded by the model as deadline_predicted).",
            registry=self.metrics.registry)
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
        if s.freeze_gc:
            frozen = freeze_heap()
            log.info("heap frozen after the warm-up: %d objects (%.0f ms)", frozen["frozen"], 1e3 * frozen["seconds"])
        self.state.ready.set()
        log.info("model %r is warm and ready", self.name)

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._executor = ThreadPoolExecutor(self.bound.slots, thread_name_prefix="ff-serve")
        self._warm_thread = threading.Thread(target=self.warm_up, name="ff-serve-warm-up", daemon=True)
        self._warm_thread.start()
        probe = asyncio.get_running_loop().create_task(self._probe())
        try:
            yield
        finally:
            probe.cancel()
            await self._shutdown()

    async def _probe(self) -> None:
        """Measure the hop from a thread back to the event loop every ``PROBE_EVERY_S`` (the return
        allowance's floor of evidence when no request runs the model)."""
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="ff-serve-probe") as probe:
            while True:
                await asyncio.sleep(PROBE_EVERY_S)
                done_ns = await loop.run_in_executor(probe, time.monotonic_ns)
                self.allowance.add((time.monotonic_ns() - done_ns) / 1e6)

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

    def _parse(self, body: bytes, header_length: str | None) -> tuple[oip.InferRequest, float]:
        """The request and its budget. Raises ``oip.ProtocolError`` (400) with the reason."""
        req = oip.parse_infer_request(body, self.spec, header_length)
        try:
            return req, self.budgets.effective_ms(req.budget_ms)
        except ValueError as exc:
            raise oip.ProtocolError(str(exc)) from None

    def infer_sync(self, body: bytes, header_length: str | None, arrival_ns: int) -> tuple[dict[str, Any], int]:
        """Parse, answer and encode one request (on a worker thread); the response and when the model
        answered (``time.monotonic_ns()``).

        The model gets the budget left after the wait so far and the return allowance; when nothing
        is left, the default answers at once (``FallbackModel.shed``).

        Raises:
            oip.ProtocolError: a bad request (400) with the reason.
        """
        req, budget_ms = self._parse(body, header_length)
        waited_ms = (time.monotonic_ns() - arrival_ns) / 1e6
        call_ms = budget_ms - waited_ms - self.allowance.ms
        x = torch.from_numpy(req.x)
        try:
            if call_ms < MIN_CALL_BUDGET_MS:
                out = self.model.shed(x, f"budget spent before the model could start ({waited_ms:.1f} ms waited)")
                self._shed_counter.inc()
            else:
                with self.budgets.apply(call_ms):
                    out = self.model(x)
        except InvalidInputError as exc:
            raise oip.ProtocolError(str(exc)) from None
        done_ns = time.monotonic_ns()
        return oip.infer_response(out, self.name, req, budget_ms, self.settings.version), done_ns

    def shed_sync(self, req: oip.InferRequest, budget_ms: float, detail: str) -> dict[str, Any]:
        """Answer one request by the safe default at once, recorded with ``detail``."""
        try:
            out = self.model.shed(torch.from_numpy(req.x), detail)
        except InvalidInputError as exc:
            raise oip.ProtocolError(str(exc)) from None
        self._shed_counter.inc()
        return oip.infer_response(out, self.name, req, budget_ms, self.settings.version)

    def _shed_reason(self, body: bytes, header: str | None, arrival_ns: int
                     ) -> tuple[oip.InferRequest, float, str] | None:
        """``(request, budget, detail)`` when the request must be shed on the loop, else ``None`` (it
        then holds an inference slot): every slot is busy, or the return allowance leaves the model
        nothing of the budget."""
        # (the policy's budget: a request that asks for less is checked again on its thread)
        left_ms = self.budgets.base.budget_ms - (time.monotonic_ns() - arrival_ns) / 1e6 - self.allowance.ms
        if left_ms >= MIN_CALL_BUDGET_MS and self.bound.try_acquire():
            return None
        req, budget_ms = self._parse(body, header)
        if self.bound.busy >= self.bound.slots:
            return req, budget_ms, self.bound.detail
        return req, budget_ms, f"answers take {self.allowance.ms:.1f} ms to come back; the budget leaves the model none"

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

        async def infer(request: Request) -> JSONResponse:
            arrival_ns = time.monotonic_ns()
            t0 = time.perf_counter()
            with self.state.lock:
                self.state.in_flight += 1
            try:
                self._check_name(request.path_params["name"])
                if not self.state.ready.is_set():
                    raise oip.ProtocolError(
                        f"model {self.name!r} is not ready ({self.state.warm_error or 'warming up'}); "
                        "retry when /v2/health/ready answers 200", status=503)
                body = await self._read_body(request)
                header = request.headers.get("inference-header-content-length")
                shed = self._shed_reason(body, header, arrival_ns)
                if shed is not None:  # the default, now, on the loop
                    response = ok(self.shed_sync(*shed), "infer")
                else:
                    try:
                        result, done_ns = await asyncio.get_running_loop().run_in_executor(
                            self._executor, self.infer_sync, body, header, arrival_ns)
                    finally:
                        self.bound.release()
                    response = ok(result, "infer")
                    self.allowance.add((time.monotonic_ns() - done_ns) / 1e6)
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

        # Plain Starlette routes, not FastAPI's: no dependency solving on the hot path (it cost about a
        # third of the event loop's time per request under load); the handler reads the path itself.
        for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
            app.add_route(path, infer, methods=["POST"], include_in_schema=False)

        @app.get("/metrics")
        async def scrape() -> Response:
            metrics.requests.labels("metrics", "200").inc()
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return app
