"""A tiny registry-built FallbackModel to save as a bundle (untrained: bundles test metadata, not skill)."""

from __future__ import annotations

import pytest
import torch

import fallbackformer as ff

EVALUATION = {
    "accuracy": {"primary": 0.95, "system": 0.948, "student": 0.9},
    "fallback_rate": 0.04,
    "served_by": {"exit_1": 0.5, "primary": 0.46, "student": 0.03, "default": 0.01},
    "relative_drop": {"system": 0.3},
    "slices": {"per_class": {"3": {"accuracy": 0.90, "accuracy_primary": 0.93, "fallback_rate": 0.1}}},
}


def tiny_model(seed: int = 0) -> ff.FallbackModel:
    torch.manual_seed(seed)
    primary = ff.create_model("digits_cnn_exits", width=4).eval()
    student = ff.create_model("digits_mlp_student", hidden=16).eval()
    gates = [ff.ConfidenceGate(temperature=1.0, threshold=0.5) for _ in range(primary.num_exits + 1)]
    return ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=1e6)).eval()


@pytest.fixture(scope="module")
def tiny() -> ff.FallbackModel:
    return tiny_model()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, object]:
    """Two key pairs (alice, mallory) as PEM files and bytes."""
    from fallbackformer.export.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    out: dict[str, object] = {}
    for name in ("alice", "mallory"):
        priv, pub = generate_keypair()
        (d / f"{name}.pem").write_bytes(priv)
        (d / f"{name}.pub").write_bytes(pub)
        out[name] = (d / f"{name}.pem", d / f"{name}.pub")
    return out


@pytest.fixture
def evaluation() -> dict:
    """An evaluation summary in evaluate()'s headline form, plus a shift aggregate and one slice."""
    import copy

    return copy.deepcopy(EVALUATION)
