"""Open Inference Protocol v2 (KServe / Triton HTTP/REST): request parsing and response building.

Pure functions, no web framework: :mod:`fallbackformer.serving.app` calls them. The input is one
tensor ``x`` (FP32, ``[B, *input_spec.shape]``) in the JSON form (``data`` flat or nested, row-major)
or in Triton's binary tensor extension (``parameters.binary_data_size`` with the JSON header length
in the ``Inference-Header-Content-Length`` header; what ``tritonclient`` sends by default). Outputs
are always answered in the JSON form, which every OIP client reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fallbackformer.runtime.output import FallbackOutput
from fallbackformer.runtime.validation import InputSpec

INPUT_NAME = "x"
INPUT_DATATYPE = "FP32"
#: name -> (OIP datatype, per-sample shape after the batch axis)
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "prediction": ("INT64", ()),
    "confidence": ("FP32", ()),
    "served_by": ("BYTES", ()),
    "reason": ("BYTES", ()),
}


class ProtocolError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    """A parsed OIP inference request.

    Attributes:
        x: the input batch, float32 ``[B, ...]``.
        id: the client's request id ("" when none), echoed in the response.
        budget_ms: ``parameters.budget_ms`` of the request, or ``None``.
        outputs: the output names asked for (all four when the request names none).
    """

    x: np.ndarray
    id: str = ""
    budget_ms: float | None = None
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))


def parse_infer_request(body: bytes, spec: InputSpec | None, header_length: str | None = None) -> InferRequest:
    """Parse and check an OIP ``/infer`` body.

    Args:
        body: the raw request body.
        spec: the model's input spec (its per-sample shape is required of ``x``).
        header_length: the ``Inference-Header-Content-Length`` header (binary tensor extension).

    Raises:
        ProtocolError: malformed JSON, a missing or extra input, a wrong datatype or shape, data
            that does not fill the shape, or a bad ``budget_ms``; the message names the value and the fix.
    """
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length must be an integer; got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        body, binary = body[:n], body[n:]
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON in the request body: {exc}; send an OIP v2 inference request") from None
    if not isinstance(req, dict):
        raise ProtocolError(f"the request body must be a JSON object with 'inputs'; got {type(req).__name__}")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"'inputs' must be a list holding exactly one tensor named {INPUT_NAME!r}; got {inputs!r:.200}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise ProtocolError(f"unknown input {tensor.get('name')!r}; this model takes one input named {INPUT_NAME!r}")
    if tensor.get("datatype") != INPUT_DATATYPE:
        raise ProtocolError(f"input {INPUT_NAME!r} has datatype {tensor.get('datatype')!r}; send {INPUT_DATATYPE}")
    shape = _shape(tensor.get("shape"), spec)
    x = _tensor_data(tensor, shape, binary)
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"'parameters' must be a JSON object; got {params!r:.100}")
    budget = params.get("budget_ms")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        raise ProtocolError(f"parameters.budget_ms must be a number > 0 (milliseconds); got {budget!r}")
    outputs = _requested_outputs(req.get("outputs"))
    rid = req.get("id", "")
    return InferRequest(x=x, id=str(rid) if rid is not None else "", budget_ms=budget, outputs=outputs)


def _shape(shape: Any, spec: InputSpec | None) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in shape):
        raise ProtocolError(f"input {INPUT_NAME!r} needs 'shape', a list of non-negative ints [B, ...]; got {shape!r:.100}")
    if shape[0] == 0:
        raise ProtocolError("input batch is empty (B=0); send at least one sample")
    if spec is not None and tuple(shape[1:]) != tuple(spec.shape):
        want = ", ".join(map(str, spec.shape))
        raise ProtocolError(f"input {INPUT_NAME!r} has shape {shape}; this model takes [B, {want}] ({spec.description or 'raw input'})")
    return tuple(shape)


def _tensor_data(tensor: dict[str, Any], shape: tuple[int, ...], binary: bytes) -> np.ndarray:
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if size != count * 4 or len(binary) < size:
            raise ProtocolError(
                f"binary_data_size {size} (with {len(binary)} binary bytes sent) does not match shape {list(shape)}: "
                f"FP32 needs {count * 4} bytes"
            )
        return np.frombuffer(binary[:size], dtype="<f4").reshape(shape).astype(np.float32, copy=True)
    data = tensor.get("data")
    if data is None:
        raise ProtocolError(f"input {INPUT_NAME!r} has no 'data'; send the values row-major, flat or nested")
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"input {INPUT_NAME!r} data is not a regular array of numbers ({exc}); send FP32 values") from None
    if arr.size != count:
        raise ProtocolError(f"input {INPUT_NAME!r} has {arr.size} values but shape {list(shape)} needs {count}")
    if arr.ndim != 1 and arr.shape != shape:
        raise ProtocolError(f"input {INPUT_NAME!r} data is nested as {list(arr.shape)} but shape says {list(shape)}")
    return arr.reshape(shape)


def _requested_outputs(outputs: Any) -> list[str]:
    if outputs is None:
        return list(OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError(f"'outputs' must be a list of {{'name': ...}} objects; got {outputs!r:.100}")
    names = [o.get("name") for o in outputs]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    return names or list(OUTPUTS)


def infer_response(out: FallbackOutput, model_name: str, request: InferRequest, budget_ms: float,
                   version: str = "1") -> dict[str, Any]:
    """The OIP response for one call: the requested outputs, per sample, in the JSON form."""
    b = len(out)
    values = {
        "prediction": out.prediction.detach().cpu().tolist(),
        "confidence": [None if c != c else c for c in out.confidence.detach().float().cpu().tolist()],
        "served_by": list(out.served_by),
        "reason": list(out.reason),
    }
    resp: dict[str, Any] = {
        "model_name": model_name,
        "model_version": version,
        "outputs": [
            {"name": n, "datatype": OUTPUTS[n][0], "shape": [b, *OUTPUTS[n][1]], "data": values[n]}
            for n in request.outputs
        ],
        "parameters": {"budget_ms": budget_ms, "latency_ms": out.latency_ms},
    }
    if request.id:
        resp["id"] = request.id
    return resp


def model_metadata(model_name: str, spec: InputSpec | None, version: str = "1") -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs and outputs with names, datatypes and shapes (-1: any batch)."""
    per_sample = list(spec.shape) if spec is not None else []
    return {
        "name": model_name,
        "versions": [version],
        "platform": "fallbackformer",
        "inputs": [{"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, *per_sample]}],
        "outputs": [{"name": n, "datatype": d, "shape": [-1, *s]} for n, (d, s) in OUTPUTS.items()],
    }


def example_batch(spec: InputSpec | None, batch: int = 8) -> np.ndarray:
    """A valid batch for warm-up: mid-range values of the input spec (seeded)."""
    if spec is None:
        raise ValueError(
            "the model has no input_spec, so the server cannot build a warm-up batch or check shapes; "
            "build the FallbackModel with input_spec=InputSpec(shape=...)"
        )
    lo, hi = spec.value_range if spec.value_range is not None else (0.0, 1.0)
    rng = np.random.default_rng(0)
    return (rng.random((batch, *spec.shape)) * (hi - lo) + lo).astype(np.float32)
