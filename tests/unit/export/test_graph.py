"""CombinedGraph in eager torch: the runtime's per-sample decisions, for both variants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.export.graph import CombinedGraph, served_by_codes
from fallbackformer.export.onnx_export import compare_decisions, runtime_decisions


def _graph_out(model, x, variant):
    graph = CombinedGraph(model, variant).eval()
    with torch.no_grad():
        return dict(zip(("prediction", "served_by", "confidence", "logits"), graph(x)))


@pytest.mark.parametrize("variant", ["where", "cond"])
def test_graph_matches_runtime_on_a_mixed_batch(model, raw, variant):
    x = raw(300)
    x[5, 0, 0, 0] = float("nan")  # invalid: non-finite
    x[7, 0, 3, 3] = 40.0  # invalid: outside 0..16
    ref = runtime_decisions(model, x)
    got = _graph_out(model, x, variant)
    report = compare_decisions(ref, got)
    assert report["decisions_agree"], report
    assert report["max_abs_diff"] < 1e-5 and report["max_abs_diff_confidence"] < 1e-6
    assert set(report["served_by_counts"]) == set(range(6))  # every code occurs
    assert got["served_by"][5] == got["served_by"][7] == 5  # invalid -> default


def test_served_by_code_table():
    assert served_by_codes(["exit_1", "primary", "student"]) == ["exit_1", "primary", "student", "default"]


@pytest.mark.parametrize("variant", ["where", "cond"])
def test_batch_that_exits_at_the_first_exit(make_model, raw, variant):
    model = make_model(accept=(1.0, 0.3, 0.3, 0.5, 0.6))
    model.gates["exit_1"].threshold.fill_(0.0)  # accepts every finite answer
    x = raw(16)
    got = _graph_out(model, x, variant)
    assert (got["served_by"] == 0).all()
    assert compare_decisions(runtime_decisions(model, x), got)["decisions_agree"]


class _PoisonHead(nn.Module):
    """A head whose logits are +inf for samples with a positive first feature."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h):
        z = self.head(h)
        return torch.where(h[:, :1] > 0, torch.full_like(z, float("inf")), z)


@pytest.mark.parametrize("variant", ["where", "cond"])
def test_non_finite_logits_go_to_the_student_like_the_runtime(variant):
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Linear(16, 16)]
    heads = {0: _PoisonHead(nn.Linear(16, 4)), 1: nn.Linear(16, 4)}
    primary = ff.MultiExitNet(stages, heads, input_transform=nn.Identity())
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    gates = [ff.ConfidenceGate(1.0, 0.3), ff.ConfidenceGate(1.0, 0.3), ff.ConfidenceGate(1.0, 0.3)]
    model = ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=1e6), input_spec=ff.InputSpec((1, 8, 8))).eval()
    x = torch.randn(64, 1, 8, 8)
    out = model(x)
    assert "nonfinite_output" in out.reason
    got = _graph_out(model, x, variant)
    report = compare_decisions(runtime_decisions(model, x), got)
    assert report["decisions_agree"], report
