"""ff.export_triton: configs that Triton's own protobuf schema parses, matching the graph, and ORT parity."""

from __future__ import annotations

import ast
from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.export.onnx_export import compare_decisions, run_onnx, runtime_decisions

BUNDLE = Path(__file__).resolve().parents[3] / "checkpoints" / "digits"
TYPES = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    model = ff.load(BUNDLE)
    out = ff.export_triton(model, tmp_path_factory.mktemp("repo"), name="digits", bundle=BUNDLE, max_batch_size=32)
    return model, out


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _per_sample(t: mc.ModelTensorReshape | None, dims) -> list[int]:
    return list(t.shape) if t is not None else list(dims)


def test_onnx_config_parses_and_matches_the_graph(repository):
    model, out = repository
    assert out["onnx"] == out["onnx_config"].parent / "1" / "model.onnx"
    cfg = _config(out["onnx_config"])
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("digits", "onnxruntime_onnx", 32)
    graph = onnx.load(str(out["onnx"])).graph
    for tensors, entries in ((graph.input, cfg.input), (graph.output, cfg.output)):
        assert [t.name for t in tensors] == [e.name for e in entries]
        for t, e in zip(tensors, entries):
            assert TYPES[t.type.tensor_type.elem_type] == e.data_type, t.name
            graph_dims = [d.dim_value for d in t.type.tensor_type.shape.dim][1:]  # batch axis dropped
            assert _per_sample(e.reshape if e.HasField("reshape") else None, e.dims) == graph_dims, t.name
    queue = cfg.dynamic_batching.default_queue_policy
    assert queue.default_timeout_microseconds == int(model.policy.budget_ms * 1000)
    assert queue.timeout_action == mc.ModelQueuePolicy.REJECT
    codes = cfg.parameters["served_by_codes"].string_value.split(",")
    assert codes == ff.export.served_by_codes(model.path_names)
    meta = {p.key: p.value for p in onnx.load(str(out["onnx"])).metadata_props}
    assert meta["served_by_codes"].split(",") == codes


def test_python_backend_model_keeps_the_deadline(repository):
    model, out = repository
    cfg = _config(out["python_config"])
    assert (cfg.name, cfg.backend) == ("digits_deadline", "python")
    assert [o.name for o in cfg.output] == ["prediction", "confidence", "served_by", "reason"]
    assert [o.data_type for o in cfg.output] == [mc.TYPE_INT64, mc.TYPE_FP32, mc.TYPE_STRING, mc.TYPE_STRING]
    assert list(cfg.input[0].dims) == list(model.input_spec.shape)
    tree = ast.parse(out["python"].read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel")
    assert {f.name for f in cls.body if isinstance(f, ast.FunctionDef)} >= {"initialize", "execute", "finalize"}
    copy = ff.load(out["bundle"])  # verified: every hash of the copied bundle holds
    assert copy.policy.budget_ms == model.policy.budget_ms


def test_onnxruntime_on_the_exported_graph_decides_like_the_runtime(repository):
    model, out = repository
    x, _ = load_digits_splits(seed=0)["test"]
    got = run_onnx(str(out["onnx"]), x)
    parity = compare_decisions(runtime_decisions(model, x), got)
    assert parity["decisions_agree"], parity


def test_a_bundle_of_another_model_is_refused(tmp_path):
    model = ff.load(BUNDLE)
    model.policy = __import__("dataclasses").replace(model.policy, budget_ms=7.0)
    with pytest.raises(ValueError, match="is not this model's"):
        ff.export_triton(model, tmp_path, name="digits", bundle=BUNDLE)


@pytest.mark.slow
def test_fresh_export_without_a_bundle(tmp_path):
    model = ff.load(BUNDLE)
    out = ff.export_triton(model, tmp_path, name="d")
    assert _config(out["onnx_config"]).name == "d" and ff.load(out["bundle"]).path_names == model.path_names
    x = load_digits_splits(seed=0)["test"][0][:64]
    assert compare_decisions(runtime_decisions(model, x), run_onnx(str(out["onnx"]), x))["decisions_agree"]
