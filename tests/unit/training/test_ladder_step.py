"""The pipeline's ladder step: rungs fitted on the primary, gates calibrated (clean or on the router's
mixture), the assembled model serves through them and decides as its whole-batch graph."""

from __future__ import annotations

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.shift import ShiftSuite
from fallbackformer.export.onnx_export import compare_decisions, runtime_decisions
from fallbackformer.rungs import CacheConfig, Coarse
from fallbackformer.training.ladder_step import LadderConfig, build_ladder, gate_data
from fallbackformer.training.router_step import RouterConfig

GROUPS = {"loop": [0, 6, 8, 9], "straight": [1, 4, 7], "curve": [2, 3, 5]}


def _config(**kw) -> LadderConfig:
    rungs = [{"name": "forest", "kind": "random_forest", "fit": {"n_estimators": 4, "max_depth": 5}},
             {"name": "linear", "kind": "linear"}]
    return LadderConfig(rungs=rungs, alpha=0.1, method="ltt_hb", veto=["forest", "linear"],
                        cache=CacheConfig(max_entries=64), default=Coarse(GROUPS, min_mass=0.5), **kw)


def test_the_ladder_step_fits_gates_and_serves(digits_system):
    s = digits_system
    ladder = build_ladder(_config(), s.primary, s.student, s.splits)
    assert [r.name for r in ladder.fallbacks] == ["forest", "linear"] and ladder.veto == ("forest", "linear")
    report = ladder.report
    assert report["gates_calibrated_on"] == "calibration" and report["n_gate"] == s.splits["calibration"][1].numel()
    for name in ("forest", "linear"):
        r = report["rungs"][name]
        assert 0.5 < r["accuracy_gate_data"] <= 1.0 and r["guarantee"]["alpha"] == 0.1
    model = ff.FallbackModel(s.primary, s.student, s.gates, ff.Policy(budget_ms=1e6, hedge="off"),
                             input_spec=s.model.input_spec, **ladder.model_kwargs()).eval()
    x = s.splits["test"][0][:200]
    want = runtime_decisions(model, x)
    with torch.no_grad():
        got = dict(zip(("prediction", "served_by", "confidence", "logits"), model.decisions(x)))
    assert compare_decisions(want, got)["decisions_agree"]
    out = model(x)
    coarse = (out.prediction == -1) & out.prediction_set.any(1) & ~out.prediction_set.all(1)
    assert bool(coarse.any()) or "default" not in out.served_by  # a default row answers a group when it can


def test_with_a_router_the_gates_calibrate_on_its_mixture(digits_system):
    splits = digits_system.splits
    router_cfg = RouterConfig(clean_weight=0.5, corruptions=["gaussian_noise"], severities=[3], seed=0)
    x, y, where = gate_data(splits, router_cfg, ShiftSuite())
    x_cal, y_cal = splits["calibration"]
    assert "mixture" in where and torch.equal(y, y_cal)
    changed = (x != x_cal).flatten(1).any(1).double().mean().item()
    assert 0.3 < changed < 0.7  # about half the calibration images corrupted, the others clean
    assert gate_data(splits, None, None)[2] == "calibration"
    with pytest.raises(ValueError, match="kind"):
        LadderConfig(rungs=[{"name": "svm", "kind": "svm"}])
