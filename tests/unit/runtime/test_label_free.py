"""The label-free estimate: window statistics, each method's arithmetic, the JSON form, the controller."""

from __future__ import annotations

import math

import pytest
import torch

from fallbackformer.runtime.label_free import LabelFreeEstimator, WindowStats, max_softmax
from fallbackformer.runtime.online_risk import FeedbackConfig, OnlineRiskController

NAN = float("nan")


def _window() -> WindowStats:
    w = WindowStats(window=4, atc_threshold=0.6)
    for served, conf, pred, msp in [("primary", 0.9, 1, 0.8), ("exit_1", 0.7, 1, 0.6), ("default", NAN, -1, NAN),
                                    ("student", 0.5, 2, 0.4)]:
        w.add(served, conf, pred, msp)
    return w


def test_window_statistics_by_hand() -> None:
    f = _window().features()
    assert f["coverage"] == pytest.approx(3 / 4)
    assert f["mean_confidence"] == pytest.approx(0.7)
    assert f["mean_max_softmax"] == pytest.approx(0.6)
    assert f["pred_max_share"] == pytest.approx(2 / 3)
    assert f["pred_entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert f["above_threshold"] == pytest.approx(2 / 3)  # 0.9 and 0.7 exceed 0.6
    assert {k: v for k, v in f.items() if k.startswith("served:")} == {
        "served:primary": 0.25, "served:exit_1": 0.25, "served:student": 0.25}  # the default is no path


def test_the_window_slides_and_long_streams_do_not_drift() -> None:
    w = _window()
    w.add("primary", 0.3, 3, 0.2)  # the first request (primary, 0.9, class 1) leaves
    f = w.features()
    assert len(w) == 4 and f["coverage"] == pytest.approx(3 / 4)
    assert f["mean_confidence"] == pytest.approx(0.5) and f["pred_max_share"] == pytest.approx(1 / 3)
    assert f["pred_entropy"] == pytest.approx(math.log(3)) and f["above_threshold"] == pytest.approx(1 / 3)
    gen = torch.Generator().manual_seed(0)
    long = WindowStats(window=50, atc_threshold=0.5)
    items = []
    for _ in range(1000):  # 8 x window evictions trigger a recount; sums must match a fresh window
        r = torch.rand(3, generator=gen).tolist()
        item = ("default" if r[0] < 0.2 else "primary", r[1], int(r[2] * 10), r[2])
        long.add(*item)
        items.append(item)
    fresh = WindowStats.of(*zip(*items[-50:]), atc_threshold=0.5)
    for k, v in fresh.features().items():
        assert long.features()[k] == pytest.approx(v, abs=1e-12), k


def test_no_answer_gives_no_estimate() -> None:
    w = WindowStats(window=3)
    w.add("default", NAN, -1)
    assert w.features() is None and LabelFreeEstimator.mean_confidence().estimate(w) is None


def _trees() -> LabelFreeEstimator:
    # tree 1 splits on coverage at 0.5 (left leaf -0.2, right leaf 0.1); tree 2 is one leaf, 0.05
    trees = {"feature": [[0, -2, -2], [-2]], "threshold": [[0.5, -2.0, -2.0], [-2.0]],
             "left": [[1, -1, -1], [-1]], "right": [[2, -1, -1], [-1]], "value": [[0.0, -0.2, 0.1], [0.05]]}
    return LabelFreeEstimator("boosted_trees", ("coverage", "served:student"),
                              {"init": 0.8, "learning_rate": 0.5, "trees": trees})


def test_each_method_by_hand() -> None:
    f = {"coverage": 0.75, "mean_confidence": 0.7, "pred_max_share": 0.5, "pred_entropy": 1.0,
         "mean_max_softmax": 0.6, "above_threshold": 0.4, "served:primary": 0.75}
    assert LabelFreeEstimator.mean_confidence().estimate(f) == pytest.approx(0.7)
    doc = LabelFreeEstimator("doc", params={"reference_accuracy": 0.98, "reference_confidence": 0.95})
    assert doc.estimate(f) == pytest.approx(0.98 - (0.95 - 0.7))
    assert LabelFreeEstimator("atc", params={"threshold": 0.6}).estimate(f) == pytest.approx(0.4)
    lin = LabelFreeEstimator("linear", ("coverage", "served:student"),
                             {"mean": [0.5, 0.1], "scale": [0.25, 0.1], "coef": [0.1, -0.2], "intercept": 0.6})
    # served:student is absent (the student served nothing): 0
    assert lin.estimate(f) == pytest.approx(0.6 + 0.1 * (0.75 - 0.5) / 0.25 - 0.2 * (0.0 - 0.1) / 0.1)
    assert _trees().estimate(f) == pytest.approx(0.8 + 0.5 * (0.1 + 0.05))
    assert _trees().estimate({**f, "coverage": 0.4}) == pytest.approx(0.8 + 0.5 * (-0.2 + 0.05))
    assert _trees().estimate({**f, "coverage": 0.5}) == pytest.approx(0.8 + 0.5 * (-0.2 + 0.05))  # <= goes left
    high = LabelFreeEstimator("doc", params={"reference_accuracy": 1.0, "reference_confidence": 0.5})
    assert high.estimate(f) == 1.0  # clipped to [0, 1]
    assert lin.estimate({**f, "coverage": NAN}) is None  # a statistic missing: no estimate


def test_json_round_trip_and_clear_errors() -> None:
    est = _trees()
    back = LabelFreeEstimator.from_config(est.to_config())
    assert back == est and back.estimate({"coverage": 0.9}) == est.estimate({"coverage": 0.9})
    with pytest.raises(ValueError, match="method 'magic' is unknown"):
        LabelFreeEstimator.from_config({"method": "magic"})
    with pytest.raises(ValueError, match=r"needs params \['threshold'\]"):
        LabelFreeEstimator.from_config({"method": "atc", "params": {}})
    bad = est.to_config()
    bad["params"]["trees"]["left"][0] = [5, -1, -1]
    with pytest.raises(ValueError, match="child outside its tree"):
        LabelFreeEstimator.from_config(bad)
    with pytest.raises(ValueError, match="not window statistics"):
        LabelFreeEstimator.from_config({**est.to_config(), "features": ["coverage", "colour"]})
    with pytest.raises(ValueError, match="JSON object"):
        LabelFreeEstimator.from_config([1, 2])


def test_max_softmax_tolerates_missing_logits() -> None:
    assert max_softmax(torch.tensor([[0.0, 0.0]]), 1) == [0.5]
    assert all(math.isnan(v) for v in max_softmax(torch.zeros(2, 0), 2))  # a call refused as invalid input
    assert all(math.isnan(v) for v in max_softmax(None, 3))


def test_the_controller_reports_its_estimator_and_events_refresh_every_few_requests() -> None:
    doc = LabelFreeEstimator("doc", params={"reference_accuracy": 1.0, "reference_confidence": 0.9})
    ctl = OnlineRiskController({"router": torch.tensor(0.5)}, {"router": 0.1}, FeedbackConfig(window=10, estimate_every=4),
                               routed=True, estimator=doc)
    assert ctl.label_free_accuracy() is None
    ctl.remember("a", torch.tensor([1, 2]), ["primary", "default"], torch.tensor([0.8, NAN]), torch.zeros(2, 3))
    assert ctl.event_state()["label_free_accuracy"] == pytest.approx(0.9)  # 1 - (0.9 - 0.8)
    st = ctl.state()
    assert st["label_free_method"] == "doc" and "difference of confidences" in st["label_free_description"]
    assert st["label_free_window"] == {"requests": 2, "answered": 1}
    ctl.remember("b", torch.tensor([1]), ["primary"], torch.tensor([0.6]))  # mean 0.7: fresh 0.8
    assert ctl.event_state()["label_free_accuracy"] == pytest.approx(0.9)  # 1 new request < 4: not yet
    assert ctl.label_free_accuracy() == pytest.approx(0.8)  # readers of stats() always get it fresh
    for i in range(4):  # 4 more requests: the events' figure is recomputed
        ctl.remember(f"c{i}", torch.tensor([1]), ["primary"], torch.tensor([0.6]))
    assert ctl.event_state()["label_free_accuracy"] == pytest.approx(1 - (0.9 - (0.8 + 0.6 * 5) / 6))
    plain = OnlineRiskController({"router": torch.tensor(0.5)}, {"router": 0.1}, routed=True)
    assert plain.state()["label_free_method"] == "mean_confidence"
