"""Issue 14's label-free goal on the shipped demo bundle: the online controller's label-free estimate is
within 5 pt of the accuracy of the answered requests on at least 80% of the 96 sets (clean and every
shift set of the test split, held-out corruptions included). Slow (a few minutes on 2 cores):
``pytest -m slow tests/integration/test_label_free_slow.py -s`` prints the per-set table.

If the shipped bundle predates the ``label_free`` manifest section, the estimator is fitted here
exactly as the main job fits it (calibration split, tunable corruptions only, default settings).
"""

from __future__ import annotations

import pytest

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.data.shift import HELD_OUT, ShiftSuite
from fallbackformer.evaluation.governance_report import label_free_line, label_free_rows, label_free_summary
from fallbackformer.evaluation.label_free_eval import measure_label_free
from fallbackformer.evaluation.report_tables import md_table
from fallbackformer.runtime.label_free import label_free_estimator
from fallbackformer.training.label_free_fit import LabelFreeConfig, fit_label_free

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_label_free_estimate_within_5pt_on_80_percent_of_the_sets() -> None:
    model = ff.load("checkpoints/digits")
    splits = load_digits_splits(seed=0)
    suite = ShiftSuite()  # configs/shift/default.yaml: 15 tunable + 4 held-out corruptions x 5 severities
    if label_free_estimator(model) is None:
        x_cal, y_cal = splits["calibration"]
        model.label_free, report = fit_label_free(model, x_cal, y_cal, suite, LabelFreeConfig())
        assert not {w.split("/")[0] for w in report["loco"]["linear"]["per_corruption"]} & HELD_OUT
    x, y = splits["test"]
    entries = measure_label_free(model, {"clean": (x, y), **suite.build(x, y)}, suite.held_out)
    s = label_free_summary(entries)
    print("\n" + md_table(label_free_rows(entries)) + "\n" + label_free_line(entries))
    assert s["all"][1] == 96 and s["held_out"][1] == 20
    assert s["share"] >= 0.80, label_free_line(entries)
