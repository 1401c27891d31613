"""The label-free estimate per set: its entry (estimate against the accuracy of the answered), the
summary by tunable / held-out and the table (the report's section: tests/unit/evaluation/test_report.py)."""

from __future__ import annotations

import types

import pytest
import torch

from fallbackformer.evaluation.governance_report import label_free_line, label_free_rows, label_free_summary
from fallbackformer.evaluation.label_free_eval import label_free_entry
from fallbackformer.runtime.label_free import LabelFreeEstimator

NAN = float("nan")


def test_entry_by_hand() -> None:
    served = ["primary", "exit_1", "default", "student"]
    conf = torch.tensor([0.9, 0.8, NAN, 0.7])
    pred = torch.tensor([1, 2, -1, 3])
    y = torch.tensor([1, 0, 5, 3])  # answered: right, wrong, right -> 2/3
    plain = types.SimpleNamespace()  # no estimator: the mean confidence
    e = label_free_entry(plain, served, conf, pred, [0.5] * 4, y)
    assert e["method"] == "mean_confidence" and e["estimate"] == pytest.approx(0.8)
    assert e["accuracy_answered"] == pytest.approx(2 / 3) and e["n_answered"] == 3 and e["n"] == 4
    assert e["error"] == pytest.approx(0.8 - 2 / 3) and e["within"] is False
    atc = types.SimpleNamespace(label_free=LabelFreeEstimator("atc", params={"threshold": 0.75}))
    e = label_free_entry(atc, served, conf, pred, [0.5] * 4, y)
    assert e["method"] == "atc" and e["estimate"] == pytest.approx(2 / 3) and e["within"] is True
    none = label_free_entry(plain, ["default"], torch.tensor([NAN]), torch.tensor([-1]), [NAN], torch.tensor([0]))
    assert none["estimate"] is None and none["accuracy_answered"] is None and none["within"] is None


def test_summary_rows_and_line() -> None:
    def e(within, held=False):
        return {"held_out": held, "label_free": {"method": "linear", "estimate": 0.9, "accuracy_answered": 0.92,
                                                 "n_answered": 10, "n": 12, "error": -0.02, "within": within}}

    entries = {"clean": e(True), "rotate/1": e(False), "rotate/2": e(True), "fog/1": e(True, True), "fog/2": e(None, True)}
    s = label_free_summary(entries)
    assert s == {"method": "linear", "all": [3, 4], "tunable": [2, 3], "held_out": [1, 1], "share": 0.75}
    rows = label_free_rows(entries)
    assert rows[1] == ["clean", "", "10/12", "0.920", "0.900", "-2.0", "yes"]
    assert rows[2][-1] == "NO" and rows[5][-1] == "n/a" and rows[4][1] == "yes"
    assert "within 5 pt of the accuracy of the answered requests on 3/4 sets (0.75); tunable 2/3, held-out 1/1" in \
        label_free_line(entries)


def test_the_evaluation_measures_the_estimator_the_model_carries(digits_system) -> None:
    """The evaluation serves a rebuilt copy (deadline lifted): the copy must carry the fitted estimator,
    or every report would measure the mean confidence under the fitted method's name."""
    from fallbackformer.evaluation.shift_eval import evaluate

    model = digits_system.fresh_model()
    model.label_free = LabelFreeEstimator("doc", params={"reference_accuracy": 1.0, "reference_confidence": 0.5})
    assert model.rebuild(policy=model.policy).label_free is model.label_free
    x, y = digits_system.splits["test"]
    ev = evaluate(model, {"clean": (x[:40], y[:40])}, latency_samples=0, sweep=False, num_threads=1, progress=False)
    lf = ev.per_set["clean"]["label_free"]  # doc: 1 - (0.5 - the mean confidence of the answered)
    assert lf["method"] == "doc" and lf["n"] == 40
    assert lf["estimate"] == pytest.approx(min(1.0, 0.5 + _mean_answered_conf(model, x[:40])))


def _mean_answered_conf(model, x) -> float:
    out = model.rebuild(policy=model.policy)(x)
    answered = torch.tensor([s != "default" for s in out.served_by])
    return float(out.confidence[answered].double().mean())
