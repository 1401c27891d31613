"""ONNX parity on the shipped demo bundle (trained, routed): the whole clean test split and shift sets.

The bundle's combined graph (``model.onnx``, the ``where`` variant) in onnxruntime, and the
onnxruntime backend (``ff.load(path, backend="onnxruntime")``, per-stage graphs), against the
PyTorch runtime: logits to 1e-4 and identical decisions (prediction and served_by) for every sample.
The ``cond`` variant refuses a router; its parity is checked on the tiny gated model in
``tests/unit/export/test_onnx_export.py`` (every served_by code reached).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.data.shift import corrupt
from fallbackformer.export.onnx_export import compare_decisions, run_onnx, runtime_decisions

pytestmark = pytest.mark.integration

SHIFTS = [("gaussian_noise", 3), ("rotate", 3), ("fog", 4), ("occlusion", 5)]
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "checkpoints" / "digits"


@pytest.fixture(scope="module")
def sets() -> dict[str, torch.Tensor]:
    x, _ = load_digits_splits(seed=0)["test"]
    shifted = torch.cat([corrupt(x, name, sev, seed=0) for name, sev in SHIFTS])
    return {"clean_test": x, "shift": shifted}


@pytest.fixture(scope="module")
def demo() -> ff.FallbackModel:
    assert (DEMO_BUNDLE / "manifest.json").exists(), "the demo bundle ships in checkpoints/digits"
    return ff.load(DEMO_BUNDLE)


@pytest.mark.parametrize("engine", ["where", "ort_backend"])
@pytest.mark.parametrize("set_name", ["clean_test", "shift"])
def test_parity(demo, sets, engine, set_name):
    x = sets[set_name]
    expected = runtime_decisions(demo, x)
    if engine == "ort_backend":
        got = runtime_decisions(ff.load(DEMO_BUNDLE, backend="onnxruntime"), x)
    else:
        got = run_onnx(DEMO_BUNDLE / "model.onnx", x)
    report = compare_decisions(expected, got)
    assert report["decisions_agree"], report
    assert report["max_abs_diff"] <= 1e-4, report
    assert report["max_abs_diff_confidence"] <= 1e-4, report
    assert len(report["served_by_counts"]) >= 3  # several paths really serve


def test_the_demo_graph_carries_the_router(demo):
    assert demo.router is not None  # the parity above covers routed decisions, not only gates


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_demo_bundle_loads_with_both_backends(backend, sets):
    model = ff.load(DEMO_BUNDLE, backend=backend)
    out = model(sets["clean_test"][:64])
    assert len(out) == 64 and set(out.served_by) <= set(model.path_names) | {"default"}
