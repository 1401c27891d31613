"""Fit the label-free accuracy estimator and choose it honestly: leave one corruption out.

The data: windows of the **calibration split** (disjoint from what trained the models and the
router's scorers), clean and under every tunable corruption at every severity, each drawn with
``seeds`` different corruption seeds. Each window is served by the model with its latency budget
lifted (the decisions depend on the inputs only), and gives the statistics a deployed model sees
(:class:`~fallbackformer.runtime.label_free.WindowStats`) and, from the calibration labels, the
accuracy of its answered requests. Held-out corruptions are never drawn (refused).

Every candidate of :data:`~fallbackformer.runtime.label_free.METHODS` is scored by
leave-one-corruption-out: fitted on the windows of all other corruptions (and clean), it estimates
the windows of the one left out; a window counts when the estimate lies within ``tolerance`` of
the accuracy. The candidate with the most such windows wins (ties: the smaller mean absolute error,
then the simpler method), and is refitted on every window.

>>> est, report = fit_label_free(model, x_cal, y_cal, suite, LabelFreeConfig())   # doctest: +SKIP
>>> model.label_free = est            # ff.save stores it in the manifest's label_free section
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fallbackformer.data.protocol import ShiftSuiteLike
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.label_free import (
    BASE_FEATURES, METHODS, SERVED_PREFIX, LabelFreeEstimator, WindowStats, max_softmax,
)

__all__ = ["LabelFreeConfig", "Window", "fit_label_free", "calibration_windows", "fit_method", "leave_one_corruption_out",
           "choose_method"]


@dataclass
class LabelFreeConfig:
    """How the label-free estimator is fitted and chosen (``configs/label_free/default.yaml``).

    Attributes:
        seeds: corruption seeds per (corruption, severity): more windows, a steadier fit.
        seed: the first corruption seed (``seed, seed + 1, ...``).
        candidates: the methods compared (a subset of ``METHODS``).
        tolerance: a window's estimate counts as right within this many accuracy points.
        batch_size: request size when serving the windows.
        trees: boosted trees: number of trees.
        learning_rate: boosted trees: shrinkage.
        depth: boosted trees: depth of each tree.
    """

    seeds: int = 6
    seed: int = 11
    candidates: Sequence[str] = field(default_factory=lambda: list(METHODS))
    tolerance: float = 0.05
    batch_size: int = 512
    trees: int = 150
    learning_rate: float = 0.05
    depth: int = 2

    def __post_init__(self) -> None:
        bad = [c for c in self.candidates if c not in METHODS]
        if bad or not self.candidates:
            raise ValueError(f"LabelFreeConfig.candidates={list(self.candidates)!r}; use a non-empty subset of {list(METHODS)}")
        if self.seeds < 1 or not 0 < self.tolerance < 1:
            raise ValueError(f"LabelFreeConfig seeds={self.seeds!r} must be >= 1 and tolerance={self.tolerance!r} in (0, 1)")


@dataclass
class Window:
    """One served window: its statistics, the accuracy of its answers, the answered confidences."""

    key: str
    corruption: str  # "clean" or the corruption's name
    features: dict[str, float]
    accuracy: float
    n_answered: int
    confidences: np.ndarray  # answered requests' confidences
    correct: np.ndarray  # answered requests' correctness


@torch.inference_mode()
def serve_window(model: Any, key: str, corruption: str, x: Tensor, y: Tensor, batch_size: int) -> Window | None:
    """Serve ``x`` and describe it as a :class:`Window` (``None`` when nothing was answered)."""
    outs = [model(xb) for xb in x.split(batch_size)]
    served = [s for o in outs for s in o.served_by]
    conf = torch.cat([o.confidence.float().cpu() for o in outs]).tolist()
    pred = torch.cat([o.prediction.cpu() for o in outs])
    msp = [m for o in outs for m in max_softmax(o.logits.cpu(), len(o))]
    stats = WindowStats.of(served, conf, pred.tolist(), msp)
    feats = stats.features()
    answered = np.array([s != R.DEFAULT for s in served])
    if feats is None or not answered.any():
        return None
    ok = (pred == y.cpu()).numpy()[answered]
    return Window(key, corruption, feats, float(ok.mean()), int(answered.sum()),
                  np.asarray(conf, dtype=np.float64)[answered], ok)


def calibration_windows(model: Any, x: Tensor, y: Tensor, suite: ShiftSuiteLike, config: LabelFreeConfig) -> list[Window]:
    """Clean plus every tunable corruption x severity x seed of ``(x, y)``, served with the budget lifted."""
    held = set(suite.held_out)
    names = [n for n in suite.names if n not in held]
    if not names:
        raise ValueError(f"the shift suite has no tunable corruption (names {list(suite.names)}); "
                         "the label-free estimator is fitted under the tunable ones only")
    lifted = model.rebuild(policy=dataclasses.replace(model.policy, budget_ms=1e9, hedge="off")).eval()
    windows = [serve_window(lifted, "clean", "clean", x, y, config.batch_size)]
    for name in names:
        for sev in suite.severities:
            for i in range(config.seeds):
                xs = suite.corrupt(x, name, int(sev), seed=config.seed + i)
                windows.append(serve_window(lifted, f"{name}/{sev}@{config.seed + i}", name, xs, y, config.batch_size))
    return [w for w in windows if w is not None]


def _matrix(windows: Sequence[Window], features: Sequence[str]) -> np.ndarray:
    return np.array([[w.features.get(f, 0.0 if f.startswith(SERVED_PREFIX) else math.nan) for f in features]
                     for w in windows], dtype=np.float64)


def fit_method(method: str, windows: Sequence[Window], features: Sequence[str], config: LabelFreeConfig) -> LabelFreeEstimator:
    """One candidate fitted on ``windows`` (weights: answered requests per window)."""
    acc = np.array([w.accuracy for w in windows])
    weight = np.array([w.n_answered for w in windows], dtype=np.float64)
    if method == "mean_confidence":
        return LabelFreeEstimator.mean_confidence()
    if method == "doc":
        ref = [w for w in windows if w.corruption == "clean"] or list(windows)
        conf = np.concatenate([w.confidences for w in ref])
        return LabelFreeEstimator("doc", params={"reference_accuracy": float(np.concatenate([w.correct for w in ref]).mean()),
                                                 "reference_confidence": float(conf.mean())})
    if method == "atc":
        conf = np.concatenate([w.confidences for w in windows])
        right = float(np.concatenate([w.correct for w in windows]).mean())
        return LabelFreeEstimator("atc", params={"threshold": float(np.quantile(conf, 1.0 - right))})
    x = _matrix(windows, features)
    keep = np.isfinite(x).all(1)
    x, acc, weight = x[keep], acc[keep], weight[keep]
    if method == "linear":
        return _fit_linear(x, acc, weight, features)
    return _fit_trees(x, acc, weight, features, config)


def _fit_linear(x: np.ndarray, acc: np.ndarray, weight: np.ndarray, features: Sequence[str]) -> LabelFreeEstimator:
    from sklearn.linear_model import LinearRegression

    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    reg = LinearRegression().fit((x - mean) / scale, acc, sample_weight=weight)
    return LabelFreeEstimator("linear", tuple(features), {
        "mean": mean.tolist(), "scale": scale.tolist(), "coef": reg.coef_.tolist(), "intercept": float(reg.intercept_)})


def _fit_trees(x: np.ndarray, acc: np.ndarray, weight: np.ndarray, features: Sequence[str],
               config: LabelFreeConfig) -> LabelFreeEstimator:
    from sklearn.ensemble import GradientBoostingRegressor

    gbr = GradientBoostingRegressor(n_estimators=config.trees, max_depth=config.depth,
                                    learning_rate=config.learning_rate, random_state=0)
    gbr.fit(x, acc, sample_weight=weight)
    trees = [t[0].tree_ for t in gbr.estimators_]
    params = {
        "init": float(np.ravel(gbr.init_.constant_)[0]),
        "learning_rate": float(gbr.learning_rate),
        "trees": {"feature": [t.feature.tolist() for t in trees], "threshold": [t.threshold.tolist() for t in trees],
                  "left": [t.children_left.tolist() for t in trees], "right": [t.children_right.tolist() for t in trees],
                  "value": [t.value[:, 0, 0].tolist() for t in trees]},
    }
    est = LabelFreeEstimator("boosted_trees", tuple(features), params)
    mine = np.array([params["init"] + params["learning_rate"] * est._trees.predict(row) for row in x])  # type: ignore[attr-defined]
    if not np.allclose(mine, gbr.predict(x), atol=1e-9):  # the numpy walk must be sklearn's prediction
        raise RuntimeError("the stored trees do not reproduce sklearn's prediction; report this as a bug")
    return est


def _estimate(est: LabelFreeEstimator, w: Window) -> float | None:
    if est.method != "atc":
        return est.estimate(w.features)
    return est.estimate({**w.features, "above_threshold": float((w.confidences > est.atc_threshold).mean())})


def leave_one_corruption_out(windows: Sequence[Window], features: Sequence[str],
                             config: LabelFreeConfig) -> dict[str, dict[str, Any]]:
    """Per candidate: windows within tolerance, windows scored, mean absolute error, per corruption hits."""
    groups = sorted({w.corruption for w in windows if w.corruption != "clean"})
    out: dict[str, dict[str, Any]] = {}
    for method in config.candidates:
        hits, n, err, per = 0, 0, 0.0, {}
        for g in groups:
            est = fit_method(method, [w for w in windows if w.corruption != g], features, config)
            test = [w for w in windows if w.corruption == g]
            e = [abs(v - w.accuracy) if (v := _estimate(est, w)) is not None else 1.0 for w in test]
            h = sum(x <= config.tolerance + 1e-12 for x in e)
            per[g] = f"{h}/{len(test)}"
            hits, n, err = hits + h, n + len(test), err + sum(e)
        out[method] = {"within": hits, "n": n, "share": hits / n if n else None, "mae": err / n if n else None,
                       "per_corruption": per}
    return out


def choose_method(loco: dict[str, dict[str, Any]], candidates: Sequence[str]) -> str:
    """The most windows within tolerance; ties: the smaller mean absolute error, then the earlier
    (simpler) candidate."""
    order = list(candidates)
    return max(order, key=lambda m: (loco[m]["within"], -loco[m]["mae"], -order.index(m)))


def fit_label_free(model: Any, x: Tensor, y: Tensor, suite: ShiftSuiteLike,
                   config: LabelFreeConfig | None = None) -> tuple[LabelFreeEstimator, dict[str, Any]]:
    """Fit every candidate, choose by leave-one-corruption-out, refit the winner on every window.

    Args:
        model: the assembled :class:`~fallbackformer.runtime.fallback_model.FallbackModel`.
        x: the calibration split's raw inputs.
        y: its labels.
        suite: the shift suite (its tunable ``names``, ``severities`` and ``corrupt``).
        config: the settings.

    Returns:
        ``(estimator, report)``; the report (also in ``estimator.fit``) holds the leave-one-out table.
    """
    config = config or LabelFreeConfig()
    windows = calibration_windows(model, x, y, suite, config)
    features = [*[f for f in BASE_FEATURES], *[SERVED_PREFIX + p for p in model.path_names]]
    groups = {w.corruption for w in windows if w.corruption != "clean"}
    if len(groups) < 2:
        loco: dict[str, dict[str, Any]] = {}
        best = "mean_confidence"  # nothing to leave out honestly: the method that needs no fitting
    else:
        loco = leave_one_corruption_out(windows, features, config)
        best = choose_method(loco, config.candidates)
    est = fit_method(best, windows, features, config)
    report = {
        "data": (f"calibration split ({int(y.shape[0])} inputs): clean plus {len(groups)} tunable corruptions x "
                 f"severities {list(suite.severities)} x {config.seeds} corruption seeds from {config.seed}; "
                 "served with the latency budget lifted"),
        "n_windows": len(windows),
        "chosen_by": f"leave-one-corruption-out: most windows within {config.tolerance:.2f} of the accuracy "
                     "of the answered requests (ties: smaller mean absolute error)",
        "tolerance": config.tolerance,
        "loco": loco,
    }
    return dataclasses.replace(est, fit=report), report
