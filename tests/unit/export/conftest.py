"""A tiny untrained FallbackModel whose gates send a mix of samples down every path."""

from __future__ import annotations

import pytest
import torch

import fallbackformer as ff

DIGITS_SPEC = ff.InputSpec(shape=(1, 8, 8), dtype="float32", value_range=(0.0, 16.0), description="raw digits")

# Fraction of the reference batch each gate accepts: exits, primary, student.
ACCEPT = (0.3, 0.3, 0.3, 0.5, 0.6)


def raw_batch(n: int, seed: int = 0) -> torch.Tensor:
    """Raw digits-like input [n, 1, 8, 8] in 0..16."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 16


def tiny_model(seed: int = 0, accept=ACCEPT, policy: ff.Policy | None = None, **kwargs) -> ff.FallbackModel:
    """Registry-built digits models (narrow), gates with thresholds between two reference scores."""
    torch.manual_seed(seed)
    primary = ff.create_model("digits_cnn_exits", width=4).eval()
    student = ff.create_model("digits_mlp_student", hidden=16).eval()
    x = raw_batch(256, seed=seed + 1000)
    with torch.no_grad():
        logits = primary(x) + [student(x)]
    gates = []
    for i, (z, a) in enumerate(zip(logits, accept)):
        gate = ff.ConfidenceGate(temperature=0.5 + 0.25 * i, threshold=0.0)
        conf = gate.confidence(z).sort(descending=True).values  # [N]
        k = max(1, int(a * len(conf)))
        if k >= len(conf):
            gate.threshold.fill_(0.0)  # accepts every finite answer
        else:
            gate.threshold.fill_(float((conf[k - 1] + conf[k]) / 2))  # midway: no ties with these scores
        gates.append(gate)
    policy = policy or ff.Policy(budget_ms=1e6)
    kwargs.setdefault("input_spec", DIGITS_SPEC)
    return ff.FallbackModel(primary, student, gates, policy, class_names=[str(i) for i in range(10)], **kwargs).eval()


@pytest.fixture(scope="session")
def model() -> ff.FallbackModel:
    """Shared by every export test: do not mutate it (use ``make_model`` for a private one)."""
    return tiny_model()


@pytest.fixture(scope="session")
def onnx_bundle(model, tmp_path_factory):
    """``model`` saved with ONNX graphs (its ``model.onnx`` is the where variant). Read-only."""
    from fallbackformer.export.bundle import save

    return save(model, tmp_path_factory.mktemp("onnx_bundle") / "bundle", onnx=True)


@pytest.fixture(scope="session")
def graphs(model, onnx_bundle, tmp_path_factory):
    """The combined graphs of ``model``: ``{"where": path, "cond": path}``. Read-only."""
    from fallbackformer.export.onnx_export import export_onnx

    cond = export_onnx(model, tmp_path_factory.mktemp("onnx") / "cond.onnx", variant="cond")
    return {"where": onnx_bundle / "model.onnx", "cond": cond}


@pytest.fixture
def make_model():
    """The factory: ``make_model(seed=0, accept=ACCEPT, policy=None, **FallbackModel kwargs)``."""
    return tiny_model


@pytest.fixture
def raw():
    """The input factory: ``raw(n, seed=0)`` -> [n, 1, 8, 8] in 0..16."""
    return raw_batch
