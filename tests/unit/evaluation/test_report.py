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
