"""Bounds as code: the degradation block is checked against the bundle's own evaluation."""

from __future__ import annotations

import pytest

import fallbackformer as ff
from fallbackformer.export.bounds import BoundsWarning, check_bounds
from fallbackformer.export.bundle import BundleError



def _limits(evaluation, **kw):
    return [b.limit for b in check_bounds(kw, evaluation)]


def test_each_limit_reads_its_metric(evaluation) -> None:
    # drop = 100 * (0.95 - 0.948) = 0.2 pt; coverage = 0.99; fallback 0.04; accuracy 0.948
    assert _limits(evaluation, max_fallback_rate=0.05, max_accuracy_drop_pt=0.5, min_coverage=0.98, min_accuracy=0.9) == []
    assert _limits(evaluation, max_fallback_rate=0.03, max_accuracy_drop_pt=0.1, min_coverage=0.995, min_accuracy=0.95) == [
        "max_fallback_rate", "max_accuracy_drop_pt", "min_coverage", "min_accuracy"]


def test_bounds_name_their_evaluation_and_slices(evaluation) -> None:
    deg = {"slices": {"per_class/3": {"max_accuracy_drop_pt": 2.0, "max_fallback_rate": 0.2}},
           "bounds": [{"evaluation": "shift", "max_relative_drop": 0.25}]}
    (b1, b2) = check_bounds(deg, evaluation)
    assert (b1.slice, b1.limit, round(b1.value, 6)) == ("per_class/3", "max_accuracy_drop_pt", 3.0)
    assert (b2.evaluation, b2.limit, b2.value) == ("shift", "max_relative_drop", 0.3)


def test_a_bound_without_evidence_is_a_breach_and_unknown_limits_warn(evaluation) -> None:
    (b,) = check_bounds({"bounds": [{"evaluation": "fog", "max_fallback_rate": 0.1}]}, evaluation)
    assert b.value is None and "cannot be checked" in b.message
    with pytest.warns(BoundsWarning, match="max_acc_drop"):
        assert check_bounds({"max_acc_drop": 1.0}, evaluation) == []
    with pytest.raises(ValueError, match="on_breach"):
        check_bounds({"on_breach": "ignore"}, evaluation)


def test_save_refuses_a_bundle_outside_its_bounds(tiny, tmp_path, evaluation) -> None:
    with pytest.raises(BundleError, match="max_fallback_rate 0.01"):
        ff.save(tiny, tmp_path / "b", evaluation=evaluation, degradation={"max_fallback_rate": 0.01})
    assert not (tmp_path / "b").exists()
    ok = ff.save(tiny, tmp_path / "ok", evaluation=evaluation, degradation={"max_fallback_rate": 0.1})
    assert ff.load(ok).bounds_breaches == []


def test_signal_loads_loudly(tiny, tmp_path, evaluation) -> None:
    deg = {"max_fallback_rate": 0.01, "on_breach": "signal"}
    with pytest.warns(BoundsWarning, match="OUTSIDE ITS SIGNED-OFF BOUNDS"):
        path = ff.save(tiny, tmp_path / "b", evaluation=evaluation, degradation=deg)
    with pytest.warns(BoundsWarning):
        model = ff.load(path)
    assert [b.limit for b in model.bounds_breaches] == ["max_fallback_rate"]


def test_load_refuses_when_bounds_were_tightened_in_the_manifest(tiny, tmp_path, evaluation) -> None:
    import json

    from fallbackformer.export.bundle import MANIFEST, manifest_digest

    path = ff.save(tiny, tmp_path / "b", evaluation=evaluation, degradation={"max_fallback_rate": 0.1})
    m = json.loads((path / MANIFEST).read_text())
    m["degradation"]["max_fallback_rate"] = 0.02
    m["manifest_sha256"] = manifest_digest(m)  # a consistent re-save by hand
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="breaks its own acceptable degradation"):
        ff.load(path)


def test_demo_bundle_satisfies_its_bounds() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    assert ff.load(root / "checkpoints" / "digits").bounds_breaches == []
