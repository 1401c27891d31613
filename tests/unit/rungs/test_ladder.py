"""A model rung: a served_by name the runtime does not use, a model, its gate's decision."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.rungs.ladder import Rung, check_ladder


def _linear_rung() -> nn.Module:
    torch.manual_seed(0)
    m = ff.create_model("linear_rung", num_features=4, num_classes=3).eval()
    with torch.no_grad():
        m.linear.weight.copy_(torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0.1, 0]], dtype=torch.float64))
        m.linear.bias.zero_()
    return m


def test_decide_is_the_gates_decision_on_the_models_logits():
    gate = ff.ConfidenceGate(temperature=1.0, threshold=0.9)
    rung = Rung("linear", _linear_rung(), gate)
    x = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [float("nan"), 0, 0, 0]])
    out = rung.decide(x)
    p = torch.softmax(torch.tensor([4.0, 0.0, 0.0]), 0).max().item()
    assert out.accepted.tolist() == [True, False, False]
    assert out.confidence[0].item() == pytest.approx(p, abs=1e-6) and math.isnan(out.confidence[2])
    assert out.prediction[0].item() == 0 and out.logits.shape == (3, 3)
    ungated = Rung("linear", _linear_rung()).decide(x)
    assert not ungated.accepted.any() and torch.isnan(ungated.confidence).all()


def test_manifest_entry_is_json_and_rebuilds_the_model_and_gate():
    gate = ff.ConfidenceGate(temperature=1.5, threshold=0.8)
    entry = json.loads(json.dumps(Rung("tree_b", _linear_rung(), gate).to_dict()))
    assert entry["name"] == "tree_b" and entry["model"]["registry_name"] == "linear_rung"
    assert ff.create_model(entry["model"]["registry_name"], **entry["model"]["registry_kwargs"]).linear.in_features == 4
    assert ff.ConfidenceGate.from_config(entry["gate"]).threshold.item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="not built by create_model"):
        Rung("plain", nn.Linear(4, 3)).to_dict()


@pytest.mark.parametrize("name, match", [
    ("primary", "taken by the runtime"), ("default", "taken by the runtime"), ("cache", "taken by the runtime"),
    ("exit_2", "taken by the runtime"), ("Tree", "not a served_by name"), ("", "not a served_by name"),
    ("a" * 33, "not a served_by name"), ("tree-1", "not a served_by name"),
])
def test_names_the_runtime_uses_or_cannot_report_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        Rung(name, _linear_rung())


def test_a_ladder_has_unique_rungs():
    m = _linear_rung()
    assert check_ladder([Rung("student", m), Rung("linear", m)]) == ["student", "linear"]
    with pytest.raises(ValueError, match="two rungs are named 'linear'"):
        check_ladder([Rung("linear", m), Rung("linear", m)])
    with pytest.raises(TypeError, match="fallbacks\\[0\\] is a Linear; wrap it"):
        check_ladder([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="gate must be a ConfidenceGate"):
        Rung("linear", m, gate="strict")
