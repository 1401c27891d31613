"""load(path, backend="onnxruntime"): stages, heads and the student in onnxruntime, the same runtime."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import fallbackformer as ff
from fallbackformer.export.bundle import MANIFEST, BundleError, load
from fallbackformer.export.onnx_export import check_onnx_parity
from fallbackformer.export.ort_backend import OrtModule
from fallbackformer.runtime.clock import FakeClock, ScriptedDelay
from fallbackformer.runtime.events import ListSink


def test_bundle_holds_hashed_graphs(onnx_bundle):
    m = json.loads((onnx_bundle / MANIFEST).read_text())
    graphs = {"model.onnx", "onnx/input_transform.onnx", "onnx/student.onnx"}
    graphs |= {f"onnx/stage_{i}.onnx" for i in range(4)} | {f"onnx/head_{i}.onnx" for i in range(4)}
    assert graphs <= set(m["files"])
    assert m["onnx"]["combined"] == "model.onnx" and len(m["onnx"]["stages"]) == 4


def test_backend_matches_torch(model, onnx_bundle, raw):
    x = raw(300, seed=5)
    x[9, 0, 0, 0] = float("inf")
    ort_model = load(onnx_bundle, backend="onnxruntime")
    assert isinstance(ort_model.primary.stages[0], OrtModule) and isinstance(ort_model.student, OrtModule)
    torch_model = load(onnx_bundle)
    for m in (ort_model, torch_model):
        m.policy = ff.Policy(budget_ms=1e6, on_invalid_input="default")
    expected, got = torch_model(x), ort_model(x)
    assert got.served_by == expected.served_by and got.reason == expected.reason
    assert torch.equal(got.prediction, expected.prediction)
    diff = (got.logits - expected.logits).abs().nan_to_num(0.0).max().item()
    assert diff < 1e-4
    assert len(set(got.served_by)) == 6
    # the combined graph shipped in the bundle agrees too
    assert check_onnx_parity(model, onnx_bundle / "model.onnx", x)["decisions_agree"]


def test_backend_batches_of_one(onnx_bundle, raw):
    ort_model, torch_model = load(onnx_bundle, backend="onnxruntime"), load(onnx_bundle)
    for i in range(5):
        x = raw(1, seed=100 + i)
        a, b = ort_model(x), torch_model(x)
        assert a.served_by == b.served_by and torch.equal(a.prediction, b.prediction)


def test_load_wires_clock_and_sinks(onnx_bundle, raw):
    clock, sink = FakeClock(), ListSink()
    ort_model = load(onnx_bundle, backend="onnxruntime", clock=clock, sinks=[sink])
    assert ort_model.clock is clock
    out = ort_model(raw(64, seed=3))
    fallbacks = [i for i, s in enumerate(out.served_by) if s in ("student", "default")]
    assert fallbacks and sorted(e.sample for e in sink.events if e.served_by in ("student", "default")) == fallbacks
    assert all(e.model_hashes["primary"] == ort_model.model_hashes["primary"] for e in sink.events)


def test_deadlines_work_with_onnxruntime_as_the_engine(onnx_bundle, raw):
    loaded = load(onnx_bundle, backend="onnxruntime")
    clock, sink = FakeClock(), ListSink()
    primary = loaded.primary
    primary.stages[1] = ScriptedDelay(primary.stages[1], clock, 20.0)  # stage 2 takes 20 ms
    # Hedging (a worker thread racing the student) is off: this test drives the fake clock alone.
    no_hedge = {"hedge": "off"} if "hedge" in {f.name for f in dataclasses.fields(ff.Policy)} else {}
    model = ff.FallbackModel(
        primary,
        loaded.student,
        {name: loaded.gates[name] for name in loaded.path_names},
        ff.Policy(budget_ms=5.0, **no_hedge),
        input_spec=loaded.input_spec,
        clock=clock,
        sinks=[sink],
    ).eval()
    out = model(raw(64, seed=3))
    assert primary.stages[1].calls == 1 and clock.now_ns() >= 20_000_000
    assert "exit_1" in out.served_by  # samples that exit before the slow stage keep their answer
    # Nothing after the slow stage runs (exit_2 reads its output, and may or may not serve after
    # the deadline depending on the runtime's rule); the rest falls back with a deadline reason.
    assert not {"exit_3", "primary"} & set(out.served_by)
    late = [r for s, r in zip(out.served_by, out.reason) if s not in ("exit_1", "exit_2")]
    assert late and all(r.startswith("deadline") for r in late)
    fallback_events = [e for e in sink.events if e.served_by in ("student", "default")]
    assert len(fallback_events) == len(late) and all(e.reason.startswith("deadline") for e in fallback_events)


def test_refuses_a_changed_stage_graph(onnx_bundle, tmp_path):
    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "b"))
    p = bundle / "onnx" / "stage_2.onnx"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # same size: the hash catches it (a size change is refused before hashing)
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"file onnx/stage_2\.onnx .* changed or corrupted"):
        load(bundle, backend="onnxruntime")
