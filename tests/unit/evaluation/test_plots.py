"""Every figure renders to a non-trivial PNG without a display."""

from __future__ import annotations

import torch

from fallbackformer.evaluation import plots as P


def test_every_plot_writes_png(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(200, generator=g)
    ok = torch.rand(200, generator=g) < conf
    figs = {
        "rel": P.reliability_diagram(conf, ok, "exit_1", path=tmp_path / "rel.png"),
        "rc": P.risk_coverage_curve(conf, ok, "x", alpha=0.05, operating_point=(0.3, 0.04), path=tmp_path / "rc.png"),
        "sev": P.accuracy_vs_severity({"primary": {0: 0.9, 1: 0.8}, "system": {0: 0.95, 1: 0.85}}, path=tmp_path / "sev.png"),
        "fb": P.fallback_rate_vs_severity({"mean": {0: 0.1, 3: 0.4}}, path=tmp_path / "fb.png"),
        "bud": P.accuracy_vs_budget([0.1, 1.0, 10.0], {"clean": [0.2, 0.8, 0.9]}, {"clean": [1.0, 0.3, 0.0]}, path=tmp_path / "bud.png"),
        "exit": P.exit_distribution({"clean": {"exit_1": 3, "primary": 5}, "fog/1": {"student": 2, "default": 1}}, path=tmp_path / "exit.png"),
    }
    for name in figs:
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert P.figure_to_base64(figs["rel"]).startswith("data:image/png;base64,iVBOR")


def test_empty_inputs_do_not_crash() -> None:
    empty = torch.tensor([])
    P.reliability_diagram(empty, empty.bool(), "empty")
    P.risk_coverage_curve(empty, empty.bool(), "empty", alpha=0.1)
