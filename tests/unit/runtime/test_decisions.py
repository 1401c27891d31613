"""The decision module and the runtime, composed: what each holds, and that they decide alike."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import fallbackformer as ff
from fallbackformer.export.onnx_export import compare_decisions, runtime_decisions
from fallbackformer.runtime.breaker import BreakerState
from fallbackformer.runtime.decisions import Decisions

SPEC = ff.InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0))


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    primary = ff.create_model("digits_cnn_exits", num_classes=10, width=4).eval()
    student = ff.create_model("digits_mlp_student", num_classes=10, hidden=16).eval()
    # thresholds that send some samples down every path of these untrained models: each gate accepts
    # a fraction of a reference batch (the exits, the primary, the student)
    x = _inputs(256, seed=1000)
    with torch.no_grad():
        logits = primary(x) + [student(x)]
    gates = []
    for z, fraction in zip(logits, (0.3, 0.3, 0.3, 0.5, 0.6)):
        gate = ff.ConfidenceGate(temperature=1.0, threshold=0.0)
        conf = gate.confidence(z).sort(descending=True).values  # [N]
        k = int(fraction * len(conf))
        gate.threshold.fill_(float((conf[k - 1] + conf[k]) / 2))
        gates.append(gate)
    return primary, student, gates


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 16


@pytest.fixture
def model() -> ff.FallbackModel:
    primary, student, gates = _parts()
    return ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=1e6, hedge="off"), input_spec=SPEC).eval()


def test_the_decision_module_holds_every_weight_and_nothing_of_the_runtime(model):
    assert [name for name, _ in model.named_children()] == ["decisions"]
    assert model.primary is model.decisions.primary and model.student is model.decisions.student
    assert model.gates is model.decisions.gates and model.path_names == model.decisions.path_names
    weights = {id(t) for t in model.state_dict(keep_vars=True).values()}
    parts = [model.primary, model.student, *model.gates.values()]
    assert weights == {id(t) for part in parts for t in part.state_dict(keep_vars=True).values()}
    for runtime_part in ("policy", "clock", "profile", "sinks", "breaker"):
        assert not hasattr(model.decisions, runtime_part)


def test_whole_batch_decisions_equal_the_runtime_walk(model):
    x = _inputs(200)
    want = runtime_decisions(model, x)
    with torch.no_grad():
        got = dict(zip(("prediction", "served_by", "confidence", "logits"), model.decisions(x)))
    report = compare_decisions(want, got)
    assert report["decisions_agree"], report
    assert set(report["served_by_counts"]) == set(range(6))  # every exit, the primary, the student, the default
    assert report["max_abs_diff_confidence"] < 1e-6


def test_the_decisions_depend_on_the_inputs_only(model):
    x = _inputs(64, seed=2)
    with torch.no_grad():
        first = model.decisions(x)
        again = model.decisions(x)
        rows = [model.decisions(x[i:i + 1]) for i in range(8)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(first[1][:8], torch.cat([r[1] for r in rows]))  # a sample's path: not its batch's
    assert torch.equal(first[0][:8], torch.cat([r[0] for r in rows]))


def test_the_fallback_rungs_are_a_named_sequence_the_student_first():
    primary, student, gates = _parts()
    decisions = Decisions(primary, [student], gates)
    assert decisions.fallback_names == ["student"] and decisions.student is student
    assert decisions.codes == ["exit_1", "exit_2", "exit_3", "primary", "student", "default"]
    with pytest.raises(ValueError, match="must name each"):
        Decisions(primary, [student, student], gates)
    two = Decisions(primary, [student, student], gates + [gates[-1]], fallback_names=["student", "again"])
    assert two.codes[-3:] == ["student", "again", "default"] and list(two.rungs) == ["again"]
    with pytest.raises(ValueError, match="veto"):
        Decisions(primary, [student, student], gates + [gates[-1]], fallback_names=["student", "again"],
                  veto=["student"])
    with pytest.raises(TypeError, match="MultiExitNet"):
        Decisions(student, [student], gates)


def test_a_policy_is_applied_when_it_is_set_and_cannot_change_in_place(model):
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.policy.rollback = True  # type: ignore[misc]
    model.policy = dataclasses.replace(model.policy, rollback=True)
    assert model.breaker is not None and model.breaker.state == BreakerState.FORCED_OPEN  # before any call
    assert model(_inputs(2)).reason == ["breaker_open"] * 2
    model.set_rollback(False)
    assert model.breaker is None  # the policy describes none
    with pytest.raises(TypeError, match="dataclasses.replace"):
        model.policy = {"budget_ms": 5.0}  # type: ignore[assignment]


def test_a_thread_may_serve_under_its_own_policy(model):
    base = model.policy
    mine = dataclasses.replace(base, budget_ms=7.0)
    seen: list[float] = []
    with model.policy_override(mine):
        assert model.policy is mine
        other = threading.Thread(target=lambda: seen.append(model.policy.budget_ms))
        other.start()
        other.join(10.0)
    assert seen == [base.budget_ms] and model.policy is base


def test_the_export_graph_shares_the_decision_module(model):
    from fallbackformer.export.graph import CombinedGraph

    graph = CombinedGraph(model)
    assert graph.decisions is model.decisions
    x = _inputs(32, seed=3)
    with torch.no_grad():
        for a, b in zip(graph(x), model.decisions(x)):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
