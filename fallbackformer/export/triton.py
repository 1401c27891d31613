"""Triton Inference Server model repository: the combined ONNX graph, and a deadline-keeping model.

:func:`export_triton` writes two models into a repository folder::

    <dir>/<name>/config.pbtxt             platform onnxruntime_onnx; dynamic batching; served_by codes
    <dir>/<name>/1/model.onnx             the combined graph of ff.export_onnx (the decisions, no deadline)
    <dir>/<name>_deadline/config.pbtxt    backend python
    <dir>/<name>_deadline/1/model.py      TritonPythonModel: ff.load(bundle) and the full runtime
    <dir>/<name>_deadline/1/bundle/       a copy of the bundle (verified again when Triton loads it)

The ONNX model cannot keep the latency budget (a graph has no clock). Triton still bounds the time
a request waits in its queue: ``default_queue_policy`` rejects a request that waited longer than the
policy budget. The ``_deadline`` model runs the fallbackformer runtime inside Triton, so the deadline,
admission, hedging, the breaker, events and reasons hold there too (the Python environment of the
backend needs fallbackformer and torch).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fallbackformer.export.graph import served_by_codes

if TYPE_CHECKING:
    from fallbackformer.runtime.fallback_model import FallbackModel

#: ONNX TensorProto element type -> Triton data type
_ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 6: "TYPE_INT32", 11: "TYPE_FP64", 9: "TYPE_BOOL", 10: "TYPE_FP16"}

_PYTHON_MODEL = '''"""Triton Python backend: the fallbackformer runtime with its deadline (written by ff.export_triton)."""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import fallbackformer as ff
from fallbackformer.serving.budget import RequestBudgets


class TritonPythonModel:
    """Loads the bundle next to this file with ff.load (verified) and answers each request in its budget."""

    def initialize(self, args):
        torch.set_num_threads(1)
        self.model = ff.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundle"))
        self.budgets = RequestBudgets(self.model)
        spec = self.model.input_spec
        lo, hi = spec.value_range if spec.value_range is not None else (0.0, 1.0)
        example = torch.rand((8, *spec.shape)) * (hi - lo) + lo
        self.model.warm_up(example.to(getattr(torch, spec.dtype)), repeats=10)

    def _budget_ms(self, request):
        try:  # request parameters (Triton >= 23.02): {"budget_ms": ...}
            params = json.loads(request.parameters() or "{}")
        except Exception:
            return None
        value = params.get("budget_ms")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            try:
                with self.budgets.apply(self._budget_ms(request)):
                    out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            except ff.InvalidInputError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
                continue
            tensors = [
                pb_utils.Tensor("prediction", out.prediction.cpu().numpy().astype(np.int64)),
                pb_utils.Tensor("confidence", out.confidence.float().cpu().numpy().astype(np.float32)),
                pb_utils.Tensor("served_by", np.array([s.encode() for s in out.served_by], dtype=np.object_)),
                pb_utils.Tensor("reason", np.array([r.encode() for r in out.reason], dtype=np.object_)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        self.model.close(timeout_s=1.0)
'''


def _tensor_block(kind: str, name: str, data_type: str, dims: list[int]) -> str:
    """One input/output entry; a per-sample scalar is ``dims: [1]`` reshaped to ``[]`` (batched models)."""
    if dims:
        return f'{kind} [\n  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}\n]'
    return (f'{kind} [\n  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: [ 1 ]\n'
            f'    reshape: {{ shape: [ ] }}\n  }}\n]')


def _graph_io(onnx_path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, Triton type, per-sample dims) of the graph's inputs and outputs (the batch axis dropped)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def entries(values: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = _ONNX_TO_TRITON.get(t.elem_type)
            if dtype is None:
                raise ValueError(f"ONNX tensor {v.name!r} has element type {t.elem_type}, which has no Triton mapping here")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
            out.append((v.name, dtype, dims))
        return out

    return entries(graph.input), entries(graph.output)


def _batching(budget_ms: float) -> str:
    budget_us = max(1, int(round(budget_ms * 1000)))
    delay_us = max(1, min(1000, budget_us // 10))  # at most a tenth of the budget spent gathering a batch
    return (
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {budget_us}\n"
        "    allow_timeout_override: true\n"
        "  }\n"
        "}"
    )


def _parameters(params: dict[str, str]) -> str:
    return "\n".join(f'parameters {{\n  key: "{k}"\n  value {{ string_value: "{v}" }}\n}}' for k, v in params.items())


def _bundle_graph(bundle: str | Path, model: "FallbackModel", variant: str) -> Path | None:
    """The bundle's combined graph when it holds one of ``variant`` (after checking every file's sha256).

    Raises:
        ValueError: the bundle is not this model's (other served_by codes or another budget).
    """
    from fallbackformer.export.bundle import read_manifest, verify_files

    manifest = read_manifest(bundle)
    codes = served_by_codes(model.path_names)
    if list(manifest.get("served_by_codes", [])) != codes or \
            float(manifest.get("policy", {}).get("budget_ms", -1)) != float(model.policy.budget_ms):
        raise ValueError(
            f"bundle {bundle} is not this model's: its served_by codes {manifest.get('served_by_codes')} and "
            f"budget {manifest.get('policy', {}).get('budget_ms')} ms differ from the model's {codes} and "
            f"{model.policy.budget_ms} ms; pass the bundle the model was loaded from, or bundle=None to save a fresh one"
        )
    verify_files(bundle, manifest)
    section = manifest.get("onnx") or {}
    if section.get("combined") and section.get("combined_variant") == variant:
        return Path(bundle) / section["combined"]
    return None


def export_triton(
    model: "FallbackModel",
    path: str | Path,
    name: str = "model",
    *,
    bundle: str | Path | None = None,
    max_batch_size: int = 64,
    variant: str = "where",
    instances: int = 1,
) -> dict[str, Path]:
    """Write a Triton model repository with the combined ONNX model and a deadline-keeping Python model.

    Args:
        model: the model to export (built by the registry, so that it can be saved as a bundle).
        path: the repository folder (created; the two model folders in it are replaced).
        name: the ONNX model's name; the Python-backend model is ``<name>_deadline``.
        bundle: the bundle folder this model was loaded from, copied into the Python model (its
            files verified first); its combined graph is reused when it has one of ``variant``.
            Default: ``ff.save(model, ...)`` writes a fresh bundle and the graph is exported.
        max_batch_size: Triton's ``max_batch_size`` for both models.
        variant: the combined graph's variant (``"where"`` or ``"cond"``, see :func:`export_onnx`).
        instances: model instances per model (``instance_group`` count, on CPU).

    Returns:
        ``{"onnx": <model.onnx>, "onnx_config": ..., "python": <model.py>, "python_config": ..., "bundle": ...}``.

    Raises:
        ValueError: a bad name or size; the message names the value and the fix.
    """
    from fallbackformer.export.bundle import save
    from fallbackformer.export.onnx_export import export_onnx

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"Triton model name must be a plain folder name; got {name!r}")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1; got {max_batch_size!r}")
    root = Path(path)
    onnx_dir, py_dir = root / name, root / f"{name}_deadline"
    for d in (onnx_dir, py_dir):
        if d.exists():
            shutil.rmtree(d)
        (d / "1").mkdir(parents=True)
    budget_ms = float(model.policy.budget_ms)
    codes = ",".join(served_by_codes(model.path_names))
    params = {"served_by_codes": codes, "budget_ms": f"{budget_ms:g}"}

    onnx_path = onnx_dir / "1" / "model.onnx"
    combined = _bundle_graph(bundle, model, variant) if bundle is not None else None
    if combined is not None:  # the bundle's verified graph of this model: no second export
        shutil.copyfile(combined, onnx_path)
    else:
        export_onnx(model, onnx_path, variant=variant)
    inputs, outputs = _graph_io(onnx_path)
    parts = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]
    parts += [_tensor_block("input", n, t, d) for n, t, d in inputs]
    parts += [_tensor_block("output", n, t, d) for n, t, d in outputs]
    parts += [_batching(budget_ms), f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]",
              _parameters(params)]
    onnx_config = onnx_dir / "config.pbtxt"
    onnx_config.write_text("\n".join(parts) + "\n")

    bundle_dir = py_dir / "1" / "bundle"
    if bundle is not None:
        shutil.copytree(bundle, bundle_dir)
    else:
        save(model, bundle_dir)
    py_model = py_dir / "1" / "model.py"
    py_model.write_text(_PYTHON_MODEL)
    x_dims = [n for n in inputs if n[0] == "x"][0][2]
    parts = [f'name: "{name}_deadline"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
             _tensor_block("input", "x", "TYPE_FP32", x_dims),
             _tensor_block("output", "prediction", "TYPE_INT64", []),
             _tensor_block("output", "confidence", "TYPE_FP32", []),
             _tensor_block("output", "served_by", "TYPE_STRING", []),
             _tensor_block("output", "reason", "TYPE_STRING", []),
             _batching(budget_ms), f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]",
             _parameters(params)]
    py_config = py_dir / "config.pbtxt"
    py_config.write_text("\n".join(parts) + "\n")
    return {"onnx": onnx_path, "onnx_config": onnx_config, "python": py_model, "python_config": py_config,
            "bundle": bundle_dir}
