"""The rungs section: every path of the ladder timed alone, b1 and b64, against the primary alone.

No timing is asserted: only that each contender is there, that the ratios are taken against the named
peer, where the rungs come from, and that the page shows the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fallbackformer.benchmarks import run_benchmark
from fallbackformer.benchmarks.rungs import CACHE_LOOKUP, PEER
from fallbackformer.rungs import Rung


def _cfg(tmp_path: Path, rungs: list[dict]) -> dict:
    return {"out_dir": str(tmp_path), "num_threads": 1, "ladder": {"rungs": rungs},
            "benchmark": {"sections": ["rungs"], "rungs": {"rounds": 2, "inner": 2}}}


def _system(digits_system, fallbacks=None) -> dict:
    return {"primary": digits_system.primary, "student": digits_system.student, "gates": digits_system.gates,
            "splits": digits_system.splits, "input_spec": digits_system.model.input_spec, "fallbacks": fallbacks}


def test_the_configs_rungs_fitted_on_the_primary_when_the_system_has_no_ladder(digits_system, tmp_path: Path) -> None:
    fit = [{"name": "tree", "kind": "decision_tree", "fit": {"max_depth": 3, "seed": 0}}]
    results, _ = run_benchmark(_cfg(tmp_path, fit), system=_system(digits_system))
    r = json.loads((tmp_path / "benchmark.json").read_text())["rungs"]
    assert r == json.loads(json.dumps(results["rungs"]))
    assert r["peer"] == PEER and r["rungs"] == ["tree"] and r["rungs_from"] == "fitted by the benchmark"
    assert [row["path"] for row in r["table"]] == [PEER, "student", "tree", CACHE_LOOKUP]
    rows = r["per_path"]
    for b in (1, 64):
        assert rows[PEER][f"ratio_b{b}"] == pytest.approx(1.0)  # the peer against itself, round by round
        for name, row in rows.items():
            assert row[f"b{b}_ms"] > 0 and row[f"ratio_b{b}"] > 0
            lo, hi = row[f"ratio_b{b}_iqr"]
            assert lo <= hi
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## The ladder's rungs, each alone" in page and "| cache_lookup |" in page and "| tree |" in page


def test_a_system_with_a_ladder_brings_its_own_rungs(digits_system, tmp_path: Path) -> None:
    own = [Rung("mirror", digits_system.student)]  # any model rung: the section times what the system holds
    results, _ = run_benchmark(_cfg(tmp_path, [{"name": "never", "kind": "linear"}]),
                               system=_system(digits_system, own))
    r = results["rungs"]
    assert r["rungs"] == ["mirror"] and r["rungs_from"] == "the system's ladder"
    assert set(r["per_path"]) == {PEER, "student", "mirror", CACHE_LOOKUP}
