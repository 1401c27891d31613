"""The manifest's label_free section: the fitted estimator travels with the bundle and is checked at load."""

from __future__ import annotations

import json

import pytest

from fallbackformer.export.bundle import DIGEST_FIELD, MANIFEST, BundleError, load, manifest_digest, save
from fallbackformer.governance.governor import govern
from fallbackformer.runtime.online_risk import FeedbackConfig
from fallbackformer.runtime.label_free import LabelFreeEstimator, label_free_estimator

LINEAR = LabelFreeEstimator("linear", ("coverage", "served:student"),
                            {"mean": [0.5, 0.1], "scale": [0.25, 0.1], "coef": [0.1, -0.2], "intercept": 0.6},
                            fit={"chosen_by": "a test"})


def test_the_estimator_round_trips_and_the_controller_uses_it(make_model, raw, tmp_path) -> None:
    model = make_model()
    plain = save(model, tmp_path / "plain")
    assert "label_free" not in json.loads((plain / MANIFEST).read_text())  # nothing fitted: no section
    assert label_free_estimator(load(plain)) is None
    model.label_free = LINEAR
    path = save(model, tmp_path / "b")
    assert json.loads((path / MANIFEST).read_text())["label_free"]["method"] == "linear"
    loaded = load(path)
    assert label_free_estimator(loaded) == LINEAR
    gov = govern(loaded, feedback=FeedbackConfig(alpha=0.1))  # these gates carry no guarantee
    out = loaded(raw(64))
    st = gov.stats()["feedback"]
    assert st["label_free_method"] == "linear"
    assert st["label_free_accuracy"] == pytest.approx(LINEAR.estimate(gov.controller._window))
    assert out.request_id
    again = save(loaded, tmp_path / "again")  # a loaded bundle re-saved keeps its estimator
    assert json.loads((again / MANIFEST).read_text())["label_free"] == json.loads((path / MANIFEST).read_text())["label_free"]


def test_a_broken_section_is_refused_naming_it(make_model, tmp_path) -> None:
    model = make_model()
    model.label_free = LINEAR
    path = save(model, tmp_path / "b")
    m = json.loads((path / MANIFEST).read_text())
    m["label_free"]["params"]["coef"] = [0.1]
    m[DIGEST_FIELD] = manifest_digest(m)
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"label_free.*one entry per feature"):
        load(path)
