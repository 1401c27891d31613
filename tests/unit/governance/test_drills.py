"""Fallback drills: one per reason of the closed vocabulary, each passing on the demo bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fallbackformer as ff
from fallbackformer.governance import drills as D
from fallbackformer.governance.audit import verify_log

ROOT = Path(__file__).resolve().parents[3]
BUNDLE = ROOT / "checkpoints" / "digits"


def test_every_reason_has_a_drill() -> None:
    # A new reason in ff.REASONS without a drill fails here.
    assert D.drill_reasons() == set(ff.REASONS)
    assert len({d.name for d in D.DRILLS}) == len(D.DRILLS)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("drill")
    rep = D.run_drills(BUNDLE, out, D.DrillSettings(seed=0))
    D.write_report(rep, out)
    return rep, out


def test_every_drill_passes_on_the_demo_bundle_with_its_reason_in_the_chained_log(report) -> None:
    rep, out = report
    assert rep.passed, [(r.name, r.failures) for r in rep.results if not r.passed]
    by_name = {r.name: r for r in rep.results}
    assert by_name["hang"].evidence["latency_ms"] <= by_name["hang"].evidence["budget_ms"]
    assert by_name["stall"].evidence["stage_0_runs"] == 0  # admission refused before the stall
    assert by_name["breaker_open"].evidence["breaker_state"] == "OPEN"
    assert "RuntimeError" in by_name["exception"].evidence["detail"]
    assert verify_log(out / D.AUDIT_LOG).ok
    logged = {json.loads(line)["reason"] for line in (out / D.AUDIT_LOG).read_text().splitlines()}
    assert set(ff.REASONS) <= logged


def test_report_files_name_each_reason_with_pass_fail(report) -> None:
    rep, out = report
    data = json.loads((out / "drill.json").read_text())
    assert data["passed"] is True and data["audit"]["ok"] is True
    assert {r["reason"] for r in data["results"]} == set(ff.REASONS)
    assert all(r["passed"] and r["evidence"]["fault"] for r in data["results"])
    html = (out / "drill.html").read_text()
    assert html.count("PASS") >= len(D.DRILLS) and "FAIL" not in html


def test_a_drill_whose_fault_gives_another_reason_fails(tmp_path, monkeypatch) -> None:
    rollback = next(d for d in D.DRILLS if d.name == "rollback_switch")
    wrong = D.Drill(rollback.name, ff.REASONS[0], rollback.run)  # gives breaker_open, not low_confidence
    monkeypatch.setattr(D, "DRILLS", (wrong,))
    rep = D.run_drills(BUNDLE, tmp_path)
    assert not rep.passed and "breaker_open" in rep.results[0].failures[0]
    assert rep.uncovered_reasons  # and the vocabulary is no longer covered


def test_drill_config_composes_into_settings() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="drill", overrides=["bundle=checkpoints/digits"])
    assert instantiate(cfg.drills) == D.DrillSettings(seed=0, batch_size=8, max_drift_calls=50)
    with pytest.raises(ValueError, match="batch_size"):
        D.DrillSettings(batch_size=0)
