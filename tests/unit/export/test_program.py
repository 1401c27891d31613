"""torch.export of the combined model: a .pt2 that answers like the runtime, at any batch size."""

from __future__ import annotations

import json

import pytest
import torch

from fallbackformer.export.onnx_export import compare_decisions, runtime_decisions
from fallbackformer.export.program import export_program


@pytest.mark.parametrize("variant", ["where", "cond"])
def test_exported_program_matches_the_runtime(model, raw, tmp_path, variant):
    path = export_program(model, tmp_path / f"{variant}.pt2", variant=variant)
    extra = {"fallbackformer.json": ""}
    program = torch.export.load(str(path), extra_files=extra)  # our own file, just written
    info = json.loads(extra["fallbackformer.json"])
    assert info["served_by_codes"][-1] == "default" and info["variant"] == variant
    module = program.module()
    for n in (1, 50):
        x = raw(n, seed=20 + n)
        got = dict(zip(info["outputs"], module(x)))
        report = compare_decisions(runtime_decisions(model, x), got)
        assert report["decisions_agree"] and report["max_abs_diff"] < 1e-5, report
