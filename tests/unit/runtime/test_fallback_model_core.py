"""FallbackModel core behaviour: paths, reasons, per-sample exits, user-built primaries, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.runtime.events import ListSink

SPEC = ff.InputSpec(shape=(4,), value_range=(-10.0, 10.0))


class Const(nn.Module):
    """Logits that put all mass on one class, with a chosen sharpness, for every sample."""

    def __init__(self, cls: int, sharp: float = 10.0, num_classes: int = 3) -> None:
        super().__init__()
        self.cls, self.sharp, self.c = cls, sharp, num_classes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(h.shape[0], self.c)
        out[:, self.cls] = self.sharp
        return out


class Raise(nn.Module):
    def forward(self, h):
        raise RuntimeError("boom")


class NaNHead(nn.Module):
    def forward(self, h):
        return torch.full((h.shape[0], 3), float("nan"))


class FirstFeatureHead(nn.Module):
    """Confident on samples whose first feature is > 0, unsure otherwise."""

    def forward(self, h):
        out = torch.zeros(h.shape[0], 3)
        out[:, 0] = torch.where(h[:, 0] > 0, 20.0, 0.0)
        return out


def gate(threshold: float) -> ff.ConfidenceGate:
    return ff.ConfidenceGate(temperature=1.0, threshold=threshold)


def user_model(heads=None, student=None, thresholds=(0.9, 0.9, 0.5), **policy) -> ff.FallbackModel:
    """A user-built primary: two linear blocks, an exit after the first; any module as student."""
    stages = [nn.Linear(4, 4), nn.Identity()]
    heads = heads or {0: Const(1, sharp=0.0), 1: Const(2)}
    primary = ff.MultiExitNet(stages, heads)
    student = student or Const(0)
    gates = [gate(t) for t in thresholds]
    return ff.FallbackModel(primary, student, gates, ff.Policy(**{"budget_ms": 1e6, **policy}), input_spec=SPEC)


def test_user_built_primary_serves_and_names_paths():
    model = user_model()
    out = model(torch.zeros(5, 4))
    assert out.served_by == ["primary"] * 5
    assert out.reason == [""] * 5
    assert out.prediction.tolist() == [2] * 5
    assert out.logits.shape == (5, 3)
    assert torch.all(out.confidence > 0.99)


def test_rejecting_gate_moves_to_next_exit_then_student_then_default():
    model = user_model(heads={0: Const(1, sharp=0.0), 1: Const(2, sharp=0.0)}, thresholds=(0.9, 0.9, 0.5))
    out = model(torch.zeros(3, 4))
    assert out.served_by == ["student"] * 3 and out.reason == ["low_confidence"] * 3
    assert out.prediction.tolist() == [0, 0, 0]
    # the student rejecting too: the safe default (abstain -> -1, or the configured class)
    model = user_model(heads={0: Const(1, sharp=0.0), 1: Const(2, sharp=0.0)}, student=Const(0, sharp=0.0))
    out = model(torch.zeros(3, 4))
    assert out.served_by == ["default"] * 3 and out.reason == ["low_confidence"] * 3
    assert out.prediction.tolist() == [-1, -1, -1]
    assert torch.isnan(out.confidence).all()
    model = user_model(heads={0: Const(1, sharp=0.0), 1: Const(2, sharp=0.0)}, student=Const(0, sharp=0.0), default_class=1)
    assert model(torch.zeros(2, 4)).prediction.tolist() == [1, 1]


def test_per_sample_exits_keep_original_order():
    # exit 1 accepts samples whose first feature is > 0; the others go on to the primary.
    primary = ff.MultiExitNet([nn.Identity(), nn.Identity()], {0: FirstFeatureHead(), 1: Const(2)})
    model = ff.FallbackModel(primary, Const(0), [gate(0.9), gate(0.9), gate(0.5)], ff.Policy(budget_ms=1e6))
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 0, 0, 0], [-3.0, 0, 0, 0]])
    out = model(x)
    assert out.served_by == ["exit_1", "primary", "exit_1", "primary"]
    assert out.prediction.tolist() == [0, 2, 0, 2]


def test_primary_error_goes_to_student_and_is_recorded():
    sink = ListSink()
    model = user_model(heads={0: Const(1, sharp=0.0), 1: Raise()})
    model.sinks.append(sink)
    out = model(torch.zeros(4, 4))
    assert out.served_by == ["student"] * 4 and out.reason == ["primary_error"] * 4
    assert len(sink.events) == 4 and {e.reason for e in sink.events} == {"primary_error"}
    assert "RuntimeError" in sink.events[0].detail
    stats = model.stats()
    assert stats["reasons"] == {"primary_error": 4} and stats["fallback_rate"] == 1.0


def test_nonfinite_logits_fall_back():
    model = user_model(heads={0: Const(1, sharp=0.0), 1: NaNHead()})
    out = model(torch.zeros(2, 4))
    assert out.served_by == ["student"] * 2 and out.reason == ["nonfinite_output"] * 2


def test_wrong_output_shape_is_a_primary_error():
    class Bad(nn.Module):
        def forward(self, h):
            return torch.zeros(h.shape[0])

    model = user_model(heads={0: Const(1, sharp=0.0), 1: Bad()})
    out = model(torch.zeros(2, 4))
    assert out.reason == ["primary_error"] * 2 and out.served_by == ["student"] * 2


def test_bad_input_raises_clear_errors():
    model = user_model()
    with pytest.raises(ff.InvalidInputError, match=r"shape \(2, 5\).*\[B, 4\]"):
        model(torch.zeros(2, 5))
    with pytest.raises(ff.InvalidInputError, match="no batch dimension"):
        model(torch.zeros(4))
    with pytest.raises(ff.InvalidInputError, match=r"dtype torch.int64.*x.float\(\)"):
        model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ff.InvalidInputError, match="non-finite.*sample 1"):
        model(torch.tensor([[0.0] * 4, [float("nan")] * 4]))
    with pytest.raises(ff.InvalidInputError, match="outside the input range"):
        model(torch.full((1, 4), 255.0))
    with pytest.raises(ff.InvalidInputError, match="torch.Tensor"):
        model([[0.0] * 4])


def test_bad_samples_get_the_default_when_the_policy_says_so():
    model = user_model(on_invalid_input="default")
    out = model(torch.tensor([[0.0] * 4, [float("nan")] * 4, [0.0] * 4]))
    assert out.served_by == ["primary", "default", "primary"]
    assert out.reason == ["", "invalid_input", ""]


def test_gates_must_match_the_paths():
    primary = ff.MultiExitNet([nn.Identity()], {0: Const(1)})
    with pytest.raises(ValueError, match="expected 2, one per path"):
        ff.FallbackModel(primary, Const(0), [gate(0.5)])
    with pytest.raises(ValueError, match="missing"):
        ff.FallbackModel(primary, Const(0), {"primary": gate(0.5)})
    with pytest.raises(TypeError, match="MultiExitNet"):
        ff.FallbackModel(nn.Linear(4, 3), Const(0), [gate(0.5), gate(0.5)])


def test_multi_exit_net_validates_heads():
    with pytest.raises(ValueError, match="last stage"):
        ff.MultiExitNet([nn.Identity(), nn.Identity()], {0: Const(1)})
    with pytest.raises(ValueError, match=r"head keys \[5\]"):
        ff.MultiExitNet([nn.Identity()], {0: Const(1), 5: Const(1)})


def test_trained_digits_system_meets_its_accuracy(digits_system):
    x, y = digits_system.splits["test"]
    out = digits_system.model(x)
    acc = (out.prediction == y).float().mean().item()
    primary_acc = (digits_system.primary(x)[-1].argmax(1) == y).float().mean().item()
    assert primary_acc > 0.9 and acc >= primary_acc - 0.02
    assert set(out.served_by) <= set(digits_system.model.path_names) | {"default"}


class SteppingClock:
    """Each reading advances time by ``step_ms``: a primary whose stages are slow."""

    def __init__(self, step_ms: float) -> None:
        self.t, self.step = 0, int(step_ms * 1e6)

    def now_ns(self) -> int:
        self.t += self.step
        return self.t


def test_over_budget_goes_to_student_with_deadline_exceeded():
    primary = ff.MultiExitNet([nn.Identity(), nn.Identity(), nn.Identity()], {0: Const(1, sharp=0.0), 2: Const(2)})
    model = ff.FallbackModel(primary, Const(0), [gate(0.9), gate(0.5), gate(0.5)],
                             ff.Policy(budget_ms=3.0, hedge="off"), clock=SteppingClock(1.0))  # the inline checks
    out = model(torch.zeros(2, 4))
    assert out.served_by == ["student"] * 2 and out.reason == ["deadline_exceeded"] * 2
    # a generous budget: the primary serves
    model.policy = ff.Policy(budget_ms=1000.0, hedge="off")
    assert model(torch.zeros(2, 4)).served_by == ["primary"] * 2
