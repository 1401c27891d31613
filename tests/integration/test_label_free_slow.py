"""Issue 14's label-free goal on the shipped demo bundle: the online controller's label-free estimate is
within 5 pt of the accuracy of the answered requests on at least 80% of the 96 sets (clean and every
shift set of the test split, held-out corruptions included). Slow (a few minutes on 2 cores):
``pytest -m slow tests/integration/test_label_free_slow.py -s`` prints the per-set tables.

Two estimators are held to it: the one the bundle carries (what a user of ``ff.load`` gets), and one
fitted afresh on the bundle's models exactly as the main job fits it (calibration split, tunable
corruptions only, ``configs/label_free/default.yaml``), so the method is checked, not one stored fit.
"""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.data.shift import HELD_OUT, ShiftSuite
from fallbackformer.evaluation.governance_report import label_free_line, label_free_rows, label_free_summary
from fallbackformer.evaluation.label_free_eval import measure_label_free
from fallbackformer.evaluation.report_tables import md_table
from fallbackformer.runtime.label_free import label_free_estimator
from fallbackformer.training.label_free_fit import fit_label_free

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _default_config():
    from pathlib import Path

    with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
        return instantiate(compose(config_name="label_free_table", overrides=["bundle=unused"]).label_free)


def _check(model, splits, suite, who: str) -> None:
    x, y = splits["test"]
    entries = measure_label_free(model, {"clean": (x, y), **suite.build(x, y)}, suite.held_out)
    s = label_free_summary(entries)
    print(f"\n{who}\n" + md_table(label_free_rows(entries)) + "\n" + label_free_line(entries))
    assert s["all"][1] == 96 and s["held_out"][1] == 20
    assert s["share"] >= 0.80, f"{who}: {label_free_line(entries)}"


def test_label_free_estimate_within_5pt_on_80_percent_of_the_sets() -> None:
    model = ff.load("checkpoints/digits")
    splits = load_digits_splits(seed=0)
    suite = ShiftSuite()  # configs/shift/default.yaml: 15 tunable + 4 held-out corruptions x 5 severities
    assert label_free_estimator(model) is not None, "the shipped bundle carries no label_free section"
    _check(model, splits, suite, f"stored estimator ({label_free_estimator(model).method})")
    x_cal, y_cal = splits["calibration"]
    est, report = fit_label_free(model, x_cal, y_cal, suite, _default_config())
    assert not set(report["loco"][est.method]["per_corruption"]) & HELD_OUT  # never tuned on a held-out corruption
    refit = model.rebuild(policy=dataclasses.replace(model.policy))
    refit.label_free = est
    _check(refit, splits, suite, f"refitted ({est.method})")
