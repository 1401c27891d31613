"""A label-free estimate of the accuracy of the answered requests in a window.

Without labels, the online controller (:mod:`fallbackformer.runtime.online_risk`) still reports how
accurate the answers of the last ``window`` requests probably were. It reads only what a deployed
model emits per request: who served it, the served confidence (the router's probability, or the
gate's calibrated confidence), the predicted class and the served logits. :class:`WindowStats` keeps
these per request and turns a window into a few statistics (all over the requests in the window;
"answered" means not served by the safe default):

* ``coverage``: the answered share;
* ``mean_confidence``: the mean served confidence of the answered requests;
* ``served:<path>``: the share of requests each path served;
* ``pred_max_share``, ``pred_entropy``: the largest share and the entropy (nats) of the predicted
  classes among the answered (answers collapsing onto few classes is a sign of shift);
* ``mean_max_softmax``: the mean max-softmax of the served logits of the answered;
* ``above_threshold``: the share of answered whose confidence exceeds the ATC threshold (when set).

:class:`LabelFreeEstimator` maps them to an accuracy in [0, 1] by one of :data:`METHODS`:

* ``mean_confidence``: ``mean_confidence`` itself (average confidence, no fitting);
* ``doc``: difference of confidences (Guillory et al. 2021): the clean reference's accuracy minus
  how far the mean confidence fell below the reference's;
* ``atc``: average thresholded confidence (Garg et al. 2022): ``above_threshold``, the threshold
  chosen on the calibration mixture so that the share above it equals the accuracy there;
* ``linear`` and ``boosted_trees``: a regression from the statistics to the accuracy, fitted on
  windows of the calibration split under the tunable corruptions (gradient-boosted trees of depth 2
  for the latter, evaluated here with numpy).

The fitting and the honest choice among them (leave-one-corruption-out) live in
:mod:`fallbackformer.training.label_free_fit`; this module is what a loaded bundle needs: the
parameters are plain JSON (the manifest's ``label_free`` section).

>>> w = WindowStats(window=4)
>>> for who, c, p in [("primary", 0.9, 1), ("student", 0.7, 2), ("default", float("nan"), -1)]:
...     w.add(who, c, p, c)
>>> round(w.features()["coverage"], 3), round(LabelFreeEstimator.mean_confidence().estimate(w), 3)
(0.667, 0.8)
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fallbackformer.gates import scores
from fallbackformer.runtime import reasons as R

__all__ = ["METHODS", "DESCRIPTIONS", "WindowStats", "LabelFreeEstimator", "label_free_estimator", "SERVED_PREFIX",
           "max_softmax"]

METHODS = ("mean_confidence", "doc", "atc", "linear", "boosted_trees")
SERVED_PREFIX = "served:"
BASE_FEATURES = ("coverage", "mean_confidence", "pred_max_share", "pred_entropy", "mean_max_softmax")

DESCRIPTIONS = {
    "mean_confidence": "mean served confidence of the answered requests",
    "doc": "difference of confidences against the clean calibration reference",
    "atc": "average thresholded confidence (threshold fitted on the calibration mixture)",
    "linear": "linear regression on window statistics, fitted under the tunable corruptions",
    "boosted_trees": "gradient-boosted trees on window statistics, fitted under the tunable corruptions",
}


class WindowStats:
    """The last ``window`` requests and their statistics, updated in O(1) per request.

    Args:
        window: requests kept (answered or not).
        atc_threshold: confidence threshold of ``above_threshold`` (``None``: not computed).
    """

    def __init__(self, window: int, atc_threshold: float | None = None) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r}; use an int >= 1 (requests in the label-free window)")
        self.window = window
        self.atc_threshold = atc_threshold
        self._items: deque[tuple[str, bool, float, int, float]] = deque()
        self._evicted = 0
        self._reset_sums()

    def _reset_sums(self) -> None:
        self.served: Counter[str] = Counter()
        self.classes: Counter[int] = Counter()
        self.answered = 0
        self._conf = [0.0, 0]  # sum, count (finite confidences of answered requests)
        self._msp = [0.0, 0]  # sum, count (finite max-softmax of answered requests)
        self._above = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, served: str, confidence: float, prediction: int, max_softmax: float = math.nan) -> None:
        """One request: who served it, its confidence, its class and its served max-softmax."""
        item = (served, served != R.DEFAULT, float(confidence), int(prediction), float(max_softmax))
        self._items.append(item)
        self._count(item, 1)
        if len(self._items) > self.window:
            self._count(self._items.popleft(), -1)
            self._evicted += 1
            if self._evicted >= 8 * self.window:  # float sums: recount now and then, so no drift builds up
                self._evicted = 0
                self._reset_sums()
                for it in self._items:
                    self._count(it, 1)

    def _count(self, item: tuple[str, bool, float, int, float], sign: int) -> None:
        served, answered, conf, pred, msp = item
        self.served[served] += sign
        if not answered:
            return
        self.answered += sign
        self.classes[pred] += sign
        if math.isfinite(conf):
            self._conf[0] += sign * conf
            self._conf[1] += sign
            if self.atc_threshold is not None and conf > self.atc_threshold:
                self._above += sign
        if math.isfinite(msp):
            self._msp[0] += sign * msp
            self._msp[1] += sign

    def features(self) -> dict[str, float] | None:
        """The window's statistics (see the module docstring), or ``None`` before any answered request."""
        n = len(self._items)
        if not n or self.answered <= 0 or self._conf[1] <= 0:
            return None
        shares = [c / self.answered for c in self.classes.values() if c > 0]
        out = {
            "coverage": self.answered / n,
            "mean_confidence": self._conf[0] / self._conf[1],
            "pred_max_share": max(shares),
            "pred_entropy": -sum(p * math.log(p) for p in shares),
            "mean_max_softmax": self._msp[0] / self._msp[1] if self._msp[1] else math.nan,
        }
        if self.atc_threshold is not None:
            out["above_threshold"] = self._above / self._conf[1]
        out.update({SERVED_PREFIX + k: v / n for k, v in self.served.items() if v > 0 and k != R.DEFAULT})
        return out

    @classmethod
    def of(cls, served: Sequence[str], confidence: Sequence[float], prediction: Sequence[int],
           max_softmax: Sequence[float] | None = None, atc_threshold: float | None = None) -> "WindowStats":
        """One window holding every request given (a whole evaluation set, say)."""
        if not (len(served) == len(confidence) == len(prediction)) or (
                max_softmax is not None and len(max_softmax) != len(served)):
            raise ValueError(f"served ({len(served)}), confidence ({len(confidence)}), prediction "
                             f"({len(prediction)}) and max_softmax must have one entry per request")
        w = cls(max(1, len(served)), atc_threshold)
        msp = max_softmax if max_softmax is not None else [math.nan] * len(served)
        for s, c, p, m in zip(served, confidence, prediction, msp):
            w.add(s, c, p, m)
        return w


@dataclass(frozen=True)
class LabelFreeEstimator:
    """Window statistics -> estimated accuracy of the answered requests (see the module docstring).

    Attributes:
        method: one of :data:`METHODS`.
        features: the statistics a regression reads, in order (``linear``, ``boosted_trees``).
        params: the method's fitted numbers (JSON): ``doc``: ``reference_accuracy``,
            ``reference_confidence``; ``atc``: ``threshold``; ``linear``: ``mean``, ``scale``, ``coef``,
            ``intercept``; ``boosted_trees``: ``init``, ``learning_rate``, ``trees`` (``feature``,
            ``threshold``, ``left``, ``right``, ``value``: one list per tree, sklearn's node layout).
        fit: how it was fitted and chosen (data, leave-one-corruption-out figures); informative only.
    """

    method: str = "mean_confidence"
    features: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)
        if self.method == "boosted_trees":
            object.__setattr__(self, "_trees", _TreeArrays(self.params["trees"], len(self.features)))

    @classmethod
    def mean_confidence(cls) -> "LabelFreeEstimator":
        """The unfitted default: the mean served confidence of the answered requests."""
        return cls("mean_confidence")

    @property
    def description(self) -> str:
        """One line naming the method."""
        return DESCRIPTIONS[self.method]

    @property
    def atc_threshold(self) -> float | None:
        """The ATC threshold (``None`` for every other method)."""
        return float(self.params["threshold"]) if self.method == "atc" else None

    def estimate(self, window: WindowStats | Mapping[str, float] | None) -> float | None:
        """The estimated accuracy in [0, 1], or ``None`` (no answered request, or a statistic missing)."""
        feats = window.features() if isinstance(window, WindowStats) else window
        if feats is None:
            return None
        p = self.params
        if self.method == "mean_confidence":
            value = feats["mean_confidence"]
        elif self.method == "doc":
            value = p["reference_accuracy"] - (p["reference_confidence"] - feats["mean_confidence"])
        elif self.method == "atc":
            value = feats.get("above_threshold", math.nan)
        else:
            x = self.vector(feats)
            if x is None:
                return None
            if self.method == "linear":
                z = (x - np.asarray(p["mean"])) / np.asarray(p["scale"])
                value = float(p["intercept"] + z @ np.asarray(p["coef"]))
            else:
                value = float(p["init"] + p["learning_rate"] * self._trees.predict(x))  # type: ignore[attr-defined]
        return min(1.0, max(0.0, float(value))) if math.isfinite(value) else None

    def vector(self, feats: Mapping[str, float]) -> np.ndarray | None:
        """``feats`` in :attr:`features` order (a path that served nothing: 0); ``None`` if one is missing."""
        x = [feats.get(f, 0.0 if f.startswith(SERVED_PREFIX) else math.nan) for f in self.features]
        return np.asarray(x, dtype=np.float64) if all(math.isfinite(v) for v in x) else None

    def to_config(self) -> dict[str, Any]:
        """The JSON stored in the bundle's manifest (section ``label_free``)."""
        return {"method": self.method, "features": list(self.features), "params": dict(self.params),
                "fit": dict(self.fit)}

    @classmethod
    def from_config(cls, config: Any) -> "LabelFreeEstimator":
        """Rebuild from :meth:`to_config`; raises ``ValueError`` naming what is wrong."""
        if not isinstance(config, Mapping):
            raise ValueError(f"label_free must be a JSON object; got {type(config).__name__}")
        feats = config.get("features", [])
        if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
            raise ValueError(f"label_free.features must be a list of statistic names; got {feats!r}")
        params, fit = config.get("params", {}), config.get("fit", {})
        if not isinstance(params, Mapping) or not isinstance(fit, Mapping):
            raise ValueError("label_free.params and label_free.fit must be JSON objects")
        return cls(str(config.get("method")), tuple(feats), dict(params), dict(fit))


class _TreeArrays:
    """Regression trees in sklearn's node layout, flattened into one node table walked with numpy.

    A leaf points to itself (feature 0, both children itself), so every tree takes ``depth`` steps.
    """

    def __init__(self, trees: Mapping[str, Any], width: int) -> None:
        feature, threshold, left, right, value, roots = [], [], [], [], [], []
        for f, t, lo, hi, v in zip(*(trees[k] for k in ("feature", "threshold", "left", "right", "value"))):
            m, base = len(f), len(feature)
            if not m or not len(t) == len(lo) == len(hi) == len(v) == m:
                raise ValueError("label_free trees: each tree needs feature, threshold, left, right and value "
                                 "lists of one length")
            roots.append(base)
            for i in range(m):
                leaf = lo[i] < 0
                if not leaf and not (i < lo[i] < m and i < hi[i] < m and 0 <= f[i] < width):
                    raise ValueError(f"label_free trees: node {i} has a child outside its tree (children follow "
                                     f"their parent) or splits on a feature outside 0..{width - 1}")
                feature.append(0 if leaf else int(f[i]))
                threshold.append(0.0 if leaf else float(t[i]))
                left.append(base + (i if leaf else int(lo[i])))
                right.append(base + (i if leaf else int(hi[i])))
                value.append(float(v[i]))
        self.feature, self.threshold = np.array(feature, dtype=np.int64), np.array(threshold)
        self.left, self.right = np.array(left, dtype=np.int64), np.array(right, dtype=np.int64)
        self.value, self.roots = np.array(value), np.array(roots, dtype=np.int64)
        depth = np.zeros(len(feature), dtype=np.int64)  # children follow their parent: one pass in order
        for i in range(len(feature)):
            if self.left[i] != i:
                depth[self.left[i]] = depth[self.right[i]] = depth[i] + 1
        self.depth = int(depth.max())

    def predict(self, x: np.ndarray) -> float:
        """Sum over trees of the leaf value ``x`` reaches (go left when ``x[feature] <= threshold``)."""
        x = x.astype(np.float32).astype(np.float64)  # sklearn's trees split float32 inputs
        node = self.roots
        for _ in range(self.depth):
            node = np.where(x[self.feature[node]] <= self.threshold[node], self.left[node], self.right[node])
        return float(self.value[node].sum())


_REQUIRED = {"doc": ("reference_accuracy", "reference_confidence"), "atc": ("threshold",),
             "linear": ("mean", "scale", "coef", "intercept"), "boosted_trees": ("init", "learning_rate", "trees")}


def _validate(est: LabelFreeEstimator) -> None:
    if est.method not in METHODS:
        raise ValueError(f"label_free.method {est.method!r} is unknown; use one of {list(METHODS)}")
    missing = [k for k in _REQUIRED.get(est.method, ()) if k not in est.params]
    if missing:
        raise ValueError(f"label_free method {est.method!r} needs params {missing}; refit it "
                         "(fallbackformer.training.label_free_fit.fit_label_free)")
    if est.method in ("linear", "boosted_trees") and not est.features:
        raise ValueError(f"label_free method {est.method!r} names no features")
    unknown = [f for f in est.features if f not in BASE_FEATURES and not f.startswith(SERVED_PREFIX)]
    if unknown:
        raise ValueError(f"label_free.features {unknown} are not window statistics; known: "
                         f"{list(BASE_FEATURES)} and '{SERVED_PREFIX}<path>'")
    if est.method == "linear" and not (len(est.params["mean"]) == len(est.params["scale"])
                                       == len(est.params["coef"]) == len(est.features)):
        raise ValueError("label_free linear params mean, scale and coef need one entry per feature")
    if est.method == "boosted_trees":
        trees = est.params["trees"]
        keys = ("feature", "threshold", "left", "right", "value")
        if not isinstance(trees, Mapping) or any(k not in trees for k in keys) or not trees["feature"] or len(
                {len(trees[k]) for k in keys}) != 1:
            raise ValueError(f"label_free trees need lists {list(keys)} with one entry per tree")


def max_softmax(logits: torch.Tensor | None, n: int) -> list[float]:
    """Per request the max-softmax of its served logits ``[n, C]`` (NaN where there are none: a
    default's NaN row, or the empty logits of a call refused as invalid input)."""
    if logits is None or logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] == 0:
        return [math.nan] * n
    return scores.max_softmax(logits.detach()).tolist()


def label_free_estimator(model: Any) -> LabelFreeEstimator | None:
    """The estimator a model carries: ``model.label_free`` (set by the main job), else its bundle's
    ``label_free`` section, else ``None``."""
    est = getattr(model, "label_free", None)
    if est is None:
        est = (getattr(model, "bundle_sections", None) or {}).get("label_free")
    return est if isinstance(est, LabelFreeEstimator) else None
