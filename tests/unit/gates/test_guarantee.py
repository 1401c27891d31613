"""The typed Guarantee: one constructor, attributes, and the manifest's JSON form kept key for key."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from fallbackformer.common.jsonsafe import json_safe
from fallbackformer.gates.guarantee import CALIBRATION_SPLIT, Guarantee, certified, statement

DEMO = Path(__file__).resolve().parents[3] / "checkpoints" / "digits" / "manifest.json"


def test_every_guarantee_of_the_shipped_bundle_reads_and_writes_back_byte_for_byte():
    manifest = json.loads(DEMO.read_text())
    stored = [g["guarantee"] for g in manifest["gates"].values()] + [manifest["router"]["guarantee"]]
    for raw in stored:
        g = Guarantee.from_dict(raw)
        assert json.dumps(json_safe(g.to_dict()), sort_keys=True) == json.dumps(raw, sort_keys=True)
    router = Guarantee.from_dict(manifest["router"]["guarantee"])
    assert router.covers["clean_weight"] == 0.5 and router.n == 270 and router.satisfied
    assert router.statement.startswith("With probability >= 0.90") and router.kind == "high_probability"
    assert statement(router.risk, router.kind, router.alpha, router.delta, router.covers) == router.statement
    gate = Guarantee.from_dict(manifest["gates"]["exit_1"]["guarantee"])
    assert gate.threshold == math.inf and not gate.satisfied and gate.details["n_min"] == 230
    assert gate.covers == {"clean_weight": 1.0, "corruptions": [], "severities": []}


def test_certified_fills_risk_kind_covers_and_statement_from_the_method():
    common = dict(alpha=0.1, delta=0.05, n=300, threshold=0.7, satisfied=True, reason="ok")
    ltt = certified(method="ltt_hb", **common)
    crc = certified(method="crc", **common)
    emp = certified(method="empirical", **common)
    assert (ltt.risk, ltt.kind) == ("selective_risk", "high_probability")
    assert (crc.risk, crc.kind) == ("joint_error_rate", "expectation")
    assert (emp.risk, emp.kind) == ("selective_risk", "none")
    assert ltt.statement == ("With probability >= 0.95 over the calibration draw, the selective risk (errors among "
                             "accepted answers) is <= 0.1, for requests drawn like the calibration split. It says "
                             "nothing about shifted inputs.")
    assert crc.statement.startswith("In expectation over calibration draws, the share of requests answered wrongly")
    assert "NOT a statistical guarantee" in emp.statement
    assert dict(CALIBRATION_SPLIT) == {"clean_weight": 1.0, "corruptions": (), "severities": ()}
    ltt.covers["corruptions"].append("fog")  # a guarantee's covers is its own copy
    assert certified(method="ltt_hb", **common).covers["corruptions"] == []


def test_the_json_form_stores_covers_and_statement_only_when_they_say_more_than_the_defaults():
    plain = certified(alpha=0.1, delta=0.1, method="ltt_binom", n=10, threshold=0.5, satisfied=True, reason="ok",
                      n_min=3)
    d = plain.to_dict()
    assert "covers" not in d and "statement" not in d and d["n_min"] == 3 and d["n_cal"] == 10
    mixture = plain.replace(covers={"clean_weight": 0.5, "corruptions": ["fog"], "severities": [1]})
    d = mixture.to_dict()
    assert d["covers"]["corruptions"] == ["fog"] and "1 corruptions (fog)" in d["statement"]
    assert Guarantee.from_dict(d) == mixture and Guarantee.from_dict(plain.to_dict()) == plain
    assert Guarantee.from_dict(json.loads(json.dumps(json_safe(plain.replace(threshold=math.inf).to_dict())))).threshold == math.inf


def test_a_partial_or_broken_guarantee():
    g = Guarantee.from_dict({"alpha": 0.05, "delta": 0.1, "method": "ltt_hb"})  # a hand-written one
    assert (g.n, g.threshold, g.satisfied, g.risk) == (0, math.inf, False, "selective_risk")
    with pytest.raises(ValueError, match=r"needs \['alpha'\]"):
        Guarantee.from_dict({"method": "crc"})
    with pytest.raises(ValueError, match="JSON object"):
        Guarantee.from_dict(["alpha", 0.1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.alpha = 0.2  # type: ignore[misc]
