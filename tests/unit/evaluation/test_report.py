"""write_report: the JSON has the accepted schema, the HTML is self-contained with every figure."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.evaluation.report import write_report
from fallbackformer.evaluation.shift_eval import evaluate


@pytest.fixture(scope="module")
def evaluation():
    torch.manual_seed(0)
    primary = ff.MultiExitNet([nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), nn.Linear(8, 8)], {0: nn.Linear(8, 4), 1: nn.Linear(8, 4)})
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    g = {"alpha": 0.05, "delta": 0.1, "method": "ltt_hb"}
    gates = [ff.ConfidenceGate(1.0, t, guarantee=g) for t in (0.3, 0.28, 0.26)]
    model = ff.FallbackModel(primary.eval(), student.eval(), gates, ff.Policy(budget_ms=1e4)).eval()
    gen = torch.Generator().manual_seed(0)
    sets = {k: (torch.rand(40, 1, 8, 8, generator=gen) * 16, torch.randint(0, 4, (40,), generator=gen))
            for k in ("clean", "rotate/1", "rotate/3", "fog/1", "fog/3")}
    return evaluate(model, sets, held_out=["fog"], latency_samples=2, stage_reps=2, budgets_ms=[0.01, 1.0, 100.0], progress=False)


def test_report_files(evaluation, tmp_path) -> None:
    paths = write_report(evaluation, tmp_path, extra={"bundle": "synthetic"})
    doc = json.loads(paths["json"].read_text())
    for key in ("clean", "rotate/1", "rotate/3", "fog/1", "fog/3"):
        e = doc[key]
        assert {"primary", "student", "system", "exit_1"} <= set(e["accuracy"])
        for field in ("fallback_rate", "served_by", "selective_risk", "coverage", "ece", "aurc", "latency_ms", "flops", "slices"):
            assert field in e, (key, field)
        assert "system" in e["selective_risk"] and "alpha" in e["selective_risk"]["system"]
    assert {"mce", "relative_drop"} <= set(doc["summary"])
    assert doc["summary"]["held_out"]["corruptions"] == ["fog"]
    assert doc["meta"]["bundle"] == "synthetic"

    page = paths["html"].read_text()
    imgs = re.findall(r"<img [^>]*src='([^']*)'", page)
    n_figs = len(list((tmp_path / "figures").glob("*.png")))
    assert len(imgs) == n_figs >= 10
    assert all(src.startswith("data:image/png;base64,iVBOR") for src in imgs)
    assert not re.search(r"(src|href)=['\"]?(https?:|file:|/)", page), "the report must be self-contained"
    for fig in ("accuracy_vs_severity", "fallback_rate_vs_severity", "accuracy_vs_budget", "reliability_primary",
                "risk_coverage_primary", "exit_distribution_severity"):
        assert f"id='fig-{fig}'" in page
    # the random-label model breaks its guarantees: the flags must be visible
    assert "class=\"broken" in page or "class=\"exceeded" in page
    md = paths["md"].read_text()
    assert "| set |" in md and "## Across severities" in md and "figures/accuracy_vs_severity.png" in md
    assert "## Calibration drift" not in md and "drift" not in doc  # the study was not asked for
    # the online controller's label-free estimate against the truth, per set (issue 14)
    assert doc["fog/1"]["label_free"]["method"] == "mean_confidence"
    assert "## Label-free accuracy estimate" in md and "| fog/1 | yes |" in md
    assert "<h2>Label-free accuracy estimate</h2>" in page


def test_report_shows_the_drift_study(evaluation, tmp_path) -> None:
    import dataclasses

    after = {"alert": {"accuracy": 0.4, "coverage": 1.0, "selective_accuracy": 0.4, "n_after": 96},
             "student": {"accuracy": 0.6, "coverage": 0.8, "selective_accuracy": 0.75, "n_after": 96}}
    drift = {
        "config": {"severity": 3, "requests": 120, "batch_size": 8, "clean_requests": 200, "seed": 0,
                   "gate": "exit_1", "window": 100, "level": 0.01, "check_every": 25, "horizon": 5000},
        "clean": {"requests": 200, "false_alarm": False, "detected_after": None},
        "sets": {"rotate/3": {"corruption": "rotate", "held_out": False, "detected_after": 24, "after": after},
                 "fog/3": {"corruption": "fog", "held_out": True, "detected_after": None,
                           "after": {p: {"accuracy": None, "coverage": None, "selective_accuracy": None, "n_after": 0}
                                     for p in ("alert", "student")}}},
        "summary": {"n_sets": 2, "detected": 1, "median_detected_after": 24,
                    "mean_accuracy_after": {"alert": 0.4, "student": 0.6}, "student_better": ["rotate/3"]},
    }
    paths = write_report(dataclasses.replace(evaluation, drift=drift), tmp_path)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "## Calibration drift" in md and "raised it on 1 of 2 sets" in md and "no false alarm" in md
    assert "| rotate/3 |  | 24 | 0.400 | 100.0% | 0.600 | 80.0% | student |" in md
    assert "| fog/3 | yes | never |" in md
    assert "<h2>Calibration drift</h2>" in page and "id='fig-drift_policies'" in page
    assert json.loads(paths["json"].read_text())["drift"]["summary"]["detected"] == 1
