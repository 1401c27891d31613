"""ONNX parity on the trained digits system: the whole clean test split and a shift set.

Both combined graphs (``where``, ``cond``) in onnxruntime, and the onnxruntime backend
(``ff.load(path, backend="onnxruntime")``), against the PyTorch runtime: logits to 1e-4 and
identical decisions (prediction and served_by) for every sample.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.shift import corrupt
from fallbackformer.export.onnx_export import (
    compare_decisions,
    export_onnx,
    run_onnx,
    runtime_decisions,
)

pytestmark = pytest.mark.integration

SHIFTS = [("gaussian_noise", 3), ("rotate", 3), ("fog", 4), ("occlusion", 5)]
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "checkpoints" / "digits"


@pytest.fixture(scope="module")
def sets(digits_system) -> dict[str, torch.Tensor]:
    x, _ = digits_system.splits["test"]
    shifted = torch.cat([corrupt(x, name, sev, seed=0) for name, sev in SHIFTS])
    return {"clean_test": x, "shift": shifted}


@pytest.fixture(scope="module")
def exported(digits_system, tmp_path_factory):
    """A bundle with ONNX graphs (its model.onnx is the where variant) and the cond graph."""
    folder = tmp_path_factory.mktemp("parity")
    bundle = ff.save(digits_system.model, folder / "bundle", onnx=True)
    cond = export_onnx(digits_system.model, folder / "cond.onnx", variant="cond")
    return {"bundle": bundle, "where": bundle / "model.onnx", "cond": cond}


@pytest.mark.parametrize("engine", ["where", "cond", "ort_backend"])
@pytest.mark.parametrize("set_name", ["clean_test", "shift"])
def test_parity(digits_system, sets, exported, engine, set_name):
    x = sets[set_name]
    expected = runtime_decisions(digits_system.model, x)
    if engine == "ort_backend":
        got = runtime_decisions(ff.load(exported["bundle"], backend="onnxruntime"), x)
    else:
        got = run_onnx(exported[engine], x)
    report = compare_decisions(expected, got)
    assert report["decisions_agree"], report
    assert report["max_abs_diff"] <= 1e-4, report
    assert report["max_abs_diff_confidence"] <= 1e-4, report
    assert len(report["served_by_counts"]) >= 3  # several paths really serve


@pytest.mark.skipif(not (DEMO_BUNDLE / "manifest.json").exists(), reason="no demo bundle in checkpoints/")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_demo_bundle_loads_with_both_backends(backend, sets):
    model = ff.load(DEMO_BUNDLE, backend=backend)
    out = model(sets["clean_test"][:64])
    assert len(out) == 64 and set(out.served_by) <= set(model.path_names) | {"default"}
