"""The ladder in the combined ONNX graph: tree and linear rungs with their codes, decisions as the runtime's."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fallbackformer as ff
from fallbackformer.export.graph import CombinedGraph
from fallbackformer.export.onnx_export import compare_decisions, export_onnx, run_onnx, runtime_decisions
from fallbackformer.rungs import CacheConfig, Rung
from fallbackformer.training.rung_fit import fit_linear_rung, fit_tree_rung

_spec = importlib.util.spec_from_file_location(
    "_ladder_runtime_tests", Path(__file__).parents[1] / "runtime" / "test_ladder_runtime.py")
_parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parts)


@pytest.mark.parametrize("veto, veto_below", [pytest.param((), math.inf, marks=pytest.mark.slow),
                                              (("tree", "linear"), math.inf), (("tree", "linear"), 0.6)])
def test_tree_and_linear_rungs_export_with_decisions_identical_to_the_runtime(tmp_path, veto, veto_below):
    base = _parts._ladder()
    x_train = _parts._inputs(300, seed=7)
    tree = fit_tree_rung(base.primary, x_train, kind="random_forest", n_estimators=5, max_depth=3).module
    linear = fit_linear_rung(base.primary, x_train).module
    ref = _parts._inputs(256, seed=1000)
    with torch.no_grad():
        rungs = [Rung("tree", tree.eval(), _parts._gate_for(tree(ref).float(), 0.5)),
                 Rung("linear", linear.eval(), _parts._gate_for(linear(ref).float(), 0.5))]
    model = base.rebuild(fallbacks=rungs, veto=veto, veto_below=veto_below)
    path = export_onnx(model, tmp_path / "ladder.onnx")
    x = _parts._inputs(300)
    report = compare_decisions(runtime_decisions(model, x), run_onnx(path, x))
    assert report["decisions_agree"], report
    assert 5 in report["served_by_counts"]  # a rung serves in the graph too (code 5: the tree)


def test_the_export_says_what_stays_in_the_runtime(tmp_path):
    model = _parts._ladder(cache=CacheConfig(max_entries=4, ttl_ms=math.inf))
    with pytest.warns(UserWarning, match="response cache"):  # (the graph warns as it is built for export)
        CombinedGraph(model)
