"""BENCHMARKS.md comes from its template: every placeholder filled from the JSON, no number written in."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fallbackformer.benchmarks.report import FORMATS, TEMPLATE, placeholders, render_markdown

_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d+(?:\.\d+)*")


def _fake_results() -> dict[str, Any]:
    """Results holding the sentinel 7 at every path the template names (tables as one-row lists)."""
    results: dict[str, Any] = {}
    for key in placeholders(TEMPLATE.read_text()):
        path, _, form = key.partition("|")
        *parents, leaf = path.split(".")
        node = results
        for p in parents:
            node = node.setdefault(p, {})
        value: Any = {"range": [7.0, 7.0], "table": [{"alpha": 7.0, "saved": 7.0}]}.get(form, 7.0)
        node.setdefault(leaf, value)
    return results


def test_template_has_no_hard_coded_number() -> None:
    text = re.sub(r"\$\{[^}]*\}", "", TEMPLATE.read_text())
    assert _NUMBER.findall(text) == []


def test_every_placeholder_is_filled_from_the_json() -> None:
    page = render_markdown(_fake_results())
    assert "${" not in page and "$" not in page
    assert {form for key in placeholders(TEMPLATE.read_text()) if (form := key.partition("|")[2])} <= set(FORMATS)
    # every number on the page is the sentinel, formatted: none comes from anywhere but the JSON
    assert set(_NUMBER.findall(page)) <= {"7", "7.0", "7.00", "7.000", "7.0000", "700.0"}
    assert "## Evidence cost" in page and "With the router" in page and "combined graph, cond" in page


def test_missing_required_field_is_an_error_and_status_sections_render() -> None:
    results = _fake_results()
    del results["overhead"]["ratio_b1"]
    with pytest.raises(KeyError):
        render_markdown(results)
    results = _fake_results()
    results["compile"] = {"status": "compile failed: no compiler"}
    results["extra"] = {"answer": 42}
    page = render_markdown(results)
    assert "## torch.compile" in page and "compile failed: no compiler" in page and "## extra" in page


def test_undefined_and_infinite_figures_read_as_such() -> None:
    """benchmark.json stores NaN as null and infinities as "inf" (fallbackformer.common.jsonsafe)."""
    results = _fake_results()
    results["early_exit"]["router"]["accuracy_answered"] = None  # no answer given: undefined
    results["early_exit"]["router"]["router_threshold"] = "inf"  # nothing certified
    page = render_markdown(results)
    line = next(row for row in page.splitlines() if row.startswith("With the router"))
    assert "threshold inf," in line and "accuracy of the answers given n/a" in line
