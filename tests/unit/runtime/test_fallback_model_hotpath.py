"""The lean serving path keeps its caches honest: what it skips and remembers must follow the model."""

from __future__ import annotations

import math

import torch

from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.testing import ConstHead, build, gate, seed
from fallbackformer.runtime.validation import InputSpec, InvalidInputError, check_batch

X1 = torch.zeros(1, 4)


def test_an_early_exit_turned_on_in_place_or_by_a_new_gate_is_seen() -> None:
    heads = {0: ConstHead(1), 1: ConstHead(2)}
    model, _, stages, _ = build([0.0, 0.0], heads=heads, thresholds=[math.inf, 0.5, 0.5], hedge="off")
    assert model(X1).served_by == ["primary"]  # exit_1 accepts nothing: its head is not even run
    model.gates["exit_1"].threshold.fill_(0.5)  # in place: the buffer's version counter moves
    assert model(X1).served_by == ["exit_1"] and stages[1].calls == 1
    model.gates["exit_1"].threshold.fill_(math.inf)
    assert model(X1).served_by == ["primary"]
    model.gates["exit_1"] = gate(0.5)  # a new gate object
    assert model(X1).served_by == ["exit_1"]
    model.gates["exit_1"].threshold = torch.tensor(math.inf)  # a new buffer
    assert model(X1).served_by == ["primary"]


def test_batch_one_and_batch_many_decide_alike() -> None:
    model, _, _, _ = build([0.0, 0.0], hedge="off")
    one = [model(X1[:, :]).served_by[0] for _ in range(3)]
    many = model(torch.zeros(5, 4)).served_by
    assert set(one) == set(many) == {"primary"}
    assert model.stats()["calls"] == 4 and model.stats()["served_by"] == {"primary": 8}


def test_check_batch_fast_path_returns_the_input_and_errors_are_unchanged() -> None:
    spec = InputSpec(shape=(1, 2, 2), value_range=(0.0, 1.0))
    x = torch.zeros(3, 1, 2, 2)
    assert check_batch(x, spec) is x
    assert check_batch(x.double(), spec).dtype == torch.float32
    for bad, match in [
        (torch.zeros(1, 2, 2), "no batch dimension"),
        (torch.zeros(3, 2, 2, 1), "does not match"),
        (torch.zeros(0, 1, 2, 2), "empty"),
        (torch.zeros(3, 1, 2, 2, dtype=torch.int64), "not floating"),
    ]:
        try:
            check_batch(bad, spec)
        except InvalidInputError as exc:
            assert match in str(exc)
        else:  # pragma: no cover
            raise AssertionError(f"{tuple(bad.shape)} {bad.dtype} passed")


def test_admission_reacts_to_a_stall_on_the_very_next_call() -> None:
    """The cached admission plan is rebuilt as soon as a sample may raise a p99."""
    model, _, stages, _ = build([[2.0, 8.5, 2.0, 2.0]], student_script=1.0, budget_ms=10.0, hedge="off")
    seed(model, {"stage_0": 2.0, "student": 1.0})
    assert model(X1).served_by == ["primary"]  # 0 + 2 + 1 <= 10
    assert model(X1).served_by == ["primary"]  # the stall: 8.5 ms, still within the budget
    out = model(X1)  # now stage 0's p99 is 8.5: 8.5 + 1 + 0 <= 10 still fits
    assert out.served_by == ["primary"] and stages[0].calls == 3
    model.profile.submit([("stage_0", 1, 9.5)])  # above the p99: added at once
    out = model(X1)  # 9.5 + 1 > 10: refused without starting the stage
    assert out.reason == ["deadline_predicted"] and stages[0].calls == 3


def test_counters_are_exact_whenever_they_are_read() -> None:
    model, _, _, _ = build([0.0], hedge="off")
    for k in range(1, 150):
        model(X1)
        if k % 37 == 0:
            assert model.stats()["calls"] == k
    assert model.stats()["served_by"] == {"primary": 149}
