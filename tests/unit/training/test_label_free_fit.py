"""Fitting the label-free estimator: every candidate's fit, leave-one-corruption-out, the choice, and a
fit on a trained digits system that never draws a held-out corruption."""

from __future__ import annotations

import numpy as np
import pytest
from fallbackformer.data.shift import ShiftSuite
from fallbackformer.runtime.label_free import LabelFreeEstimator, WindowStats, max_softmax
from fallbackformer.training.label_free_fit import (
    LabelFreeConfig, Requests, Window, choose_method, fit_label_free, fit_method, leave_one_corruption_out, mix_windows,
    window_of,
)

FEATURES = ["coverage", "mean_confidence", "pred_max_share", "pred_entropy", "mean_max_softmax", "served:primary"]


def _windows(seed: int = 0) -> list[Window]:
    """Accuracy = coverage ** 2 in every group; the mean confidence stays near 0.9 whatever the accuracy."""
    rng = np.random.default_rng(seed)
    out = []
    for group in ["clean", "a", "b", "c", "d"]:
        for i in range(12 if group != "clean" else 1):
            cov = 1.0 if group == "clean" else float(rng.uniform(0.3, 1.0))
            acc = round(cov ** 2 * 100) / 100
            conf = np.clip(rng.normal(0.9, 0.02, 100), 0, 1)
            feats = {"coverage": cov, "mean_confidence": float(conf.mean()), "pred_max_share": float(rng.uniform(0.1, 0.3)),
                     "pred_entropy": 2.0, "mean_max_softmax": 0.5, "served:primary": cov}
            out.append(Window(f"{group}/{i}", group, feats, acc, 100, conf, np.arange(100) < acc * 100))
    return out


def test_loco_prefers_what_tracks_the_accuracy_and_counts_by_hand() -> None:
    windows = _windows()
    cfg = LabelFreeConfig(trees=50)
    loco = leave_one_corruption_out(windows, FEATURES, cfg)
    scored = [w for w in windows if w.corruption != "clean"]
    by_hand = sum(abs(w.features["mean_confidence"] - w.accuracy) <= 0.05 + 1e-12 for w in scored)
    assert loco["mean_confidence"]["within"] == by_hand and loco["mean_confidence"]["n"] == len(scored) == 48
    assert loco["linear"]["within"] > loco["mean_confidence"]["within"] + 10
    assert choose_method(loco, cfg.candidates) in ("linear", "boosted_trees")
    tie = {"doc": {"within": 3, "mae": 0.1}, "linear": {"within": 3, "mae": 0.1}, "atc": {"within": 3, "mae": 0.2}}
    assert choose_method(tie, ["doc", "atc", "linear"]) == "doc"  # a tie goes to the simpler method


def test_each_candidate_fits_what_it_should() -> None:
    windows = _windows()
    cfg = LabelFreeConfig(trees=50)
    doc = fit_method("doc", windows, FEATURES, cfg)
    clean = windows[0]
    assert doc.params["reference_accuracy"] == pytest.approx(1.0)
    assert doc.params["reference_confidence"] == pytest.approx(clean.confidences.mean())
    atc = fit_method("atc", windows, FEATURES, cfg)
    conf = np.concatenate([w.confidences for w in windows])
    right = np.concatenate([w.correct for w in windows]).mean()
    assert np.mean(conf > atc.params["threshold"]) == pytest.approx(right, abs=2 / len(conf))  # Garg et al.'s rule
    lin = fit_method("linear", windows, FEATURES, cfg)
    assert lin.estimate(windows[5].features) == pytest.approx(windows[5].accuracy, abs=0.08)


def test_stored_trees_predict_exactly_as_sklearn_on_new_points() -> None:
    from sklearn.ensemble import GradientBoostingRegressor

    windows = _windows()
    cfg = LabelFreeConfig(trees=40, depth=3)
    est = LabelFreeEstimator.from_config(fit_method("boosted_trees", windows, FEATURES, cfg).to_config())
    x = np.array([[w.features[f] for f in FEATURES] for w in windows])
    y = np.array([w.accuracy for w in windows])
    ref = GradientBoostingRegressor(n_estimators=40, max_depth=3, learning_rate=cfg.learning_rate, random_state=0)
    ref.fit(x, y, sample_weight=np.full(len(y), 100.0))
    new = np.random.default_rng(1).uniform(x.min(0), x.max(0) + 1e-9, size=(50, len(FEATURES)))
    mine = [est.estimate(dict(zip(FEATURES, row))) for row in new]
    assert np.allclose(mine, np.clip(ref.predict(new), 0, 1), atol=1e-12)


def test_a_fit_on_a_trained_system_draws_only_tunable_corruptions(digits_system, monkeypatch) -> None:
    suite = ShiftSuite(names=["gaussian_noise", "rotate", "occlusion"], held_out=["fog", "zigzag"], severities=[1, 4])
    drawn = []
    real = suite.corrupt
    monkeypatch.setattr(suite, "corrupt", lambda x, name, sev, seed=0: drawn.append(name) or real(x, name, sev, seed))
    x, y = digits_system.splits["calibration"]
    model = digits_system.fresh_model()
    est, report = fit_label_free(model, x, y, suite, LabelFreeConfig(seeds=1, trees=30))
    assert set(drawn) == {"gaussian_noise", "rotate", "occlusion"} and len(drawn) == 6
    assert report["n_windows"] == 7 and set(report["loco"]) == set(LabelFreeConfig().candidates)
    assert est.method in report["loco"] and est.fit["loco"] == report["loco"]
    assert all(r["n"] == 6 for r in report["loco"].values())  # every corrupted window scored once, left out
    out = model(x[:64])
    window = WindowStats.of(out.served_by, out.confidence.tolist(), out.prediction.tolist(),
                            max_softmax(out.logits, len(out)), atc_threshold=est.atc_threshold)
    assert 0.0 <= est.estimate(window) <= 1.0
    with pytest.raises(ValueError, match="candidates"):
        LabelFreeConfig(candidates=["oracle"])


def _served(key: str, group: str, n: int, right: float, rng: np.random.Generator) -> Window:
    served = tuple(rng.choice(["primary", "exit_1", "default"], size=n, p=[0.5, 0.3, 0.2]))
    ok = rng.random(n) < right
    req = Requests(served, np.where(np.array(served) == "default", np.nan, rng.uniform(0.5, 1.0, n)),
                   np.where(np.array(served) == "default", -1, rng.integers(0, 10, n)), rng.uniform(0.3, 1.0, n), ok)
    return window_of(key, group, req)


def test_mixtures_combine_served_requests_position_by_position() -> None:
    rng = np.random.default_rng(3)
    served = [_served("clean", "clean", 60, 0.95, rng)] + [
        _served(f"{g}/{i}", g, 60, r, rng) for g in ("a", "b") for i, r in enumerate((0.9, 0.5, 0.2))]
    mixed = mix_windows(served, LabelFreeConfig(mixtures=3, mix_seed=1))
    assert len(mixed) == 3 * 6 and all(m.mixed and m.corruption in ("a", "b") for m in mixed)
    assert mix_windows(served, LabelFreeConfig(mixtures=3, mix_seed=1))[5].features == mixed[5].features  # seeded
    by_key = {w.key: w for w in served}
    for m in mixed:
        own, partner = (by_key[k] for k in m.key.split("+"))
        assert partner.corruption in (own.corruption, "clean")
        req = m.requests
        assert len(req.served) == 60  # every position once: from the window itself or from its partner
        ans = np.array([s != "default" for s in req.served])
        assert m.accuracy == pytest.approx(req.correct[ans].mean()) and m.n_answered == ans.sum()
        def rows(r: Requests) -> set:  # (path, max-softmax, class): the max-softmax is never NaN here
            return set(zip(r.served, r.max_softmax.tolist(), r.prediction.tolist()))

        assert rows(req) <= rows(own.requests) | rows(partner.requests)
    cfg = LabelFreeConfig(candidates=["mean_confidence", "linear"], mixtures=3)
    loco = leave_one_corruption_out(served + mixed, ["coverage", "mean_confidence"], cfg)
    assert loco["linear"]["n"] == 6  # mixtures train the folds; only served windows are scored
    assert mix_windows(served, LabelFreeConfig(mixtures=0)) == []
    with pytest.raises(ValueError, match="mixtures"):
        LabelFreeConfig(mixtures=-1)
