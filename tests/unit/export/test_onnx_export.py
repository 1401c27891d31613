"""The combined ONNX graph: checked, dynamic batch, per-sample parity with the runtime, If skipping."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from fallbackformer.export.onnx_export import (
    check_onnx_parity,
    onnxruntime_vs_torch,
    ort_session,
    run_onnx,
)

CODES = ["exit_1", "exit_2", "exit_3", "primary", "student", "default"]


@pytest.mark.parametrize("variant", ["where", "cond"])
def test_graph_is_checked_and_documents_its_codes(graphs, variant):
    proto = onnx.load(str(graphs[variant]))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["served_by_codes"].split(",") == CODES and meta["variant"] == variant
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["prediction", "served_by", "confidence", "logits"]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch axis
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    assert len(ifs) == (4 if variant == "cond" else 0)  # 3 later segments + the student


@pytest.mark.parametrize("variant", ["where", "cond"])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_parity_with_the_runtime(model, graphs, raw, variant, n):
    x = raw(n, seed=n)
    if n > 10:
        x[3, 0, 1, 1] = float("nan")  # invalid samples get the default in both
        x[4, 0, 2, 2] = -5.0
    report = check_onnx_parity(model, graphs[variant], x)
    assert report["decisions_agree"], report
    assert report["max_abs_diff"] < 1e-4 and report["max_abs_diff_confidence"] < 1e-4
    out = run_onnx(graphs[variant], x)
    assert out["prediction"].dtype == torch.int64 and out["served_by"].dtype == torch.int64
    assert out["logits"].shape == (n, 10)
    if n > 10:
        assert set(report["served_by_counts"]) == set(range(6))


def _executed_convs(path, x, folder) -> int:
    """How many convolutions onnxruntime ran for one call (from its profiler; Conv+Relu fuse)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.log_severity_level = 3
    opts.profile_file_prefix = str(folder / f"prof_{path.stem}")
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x.numpy()})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return sum(1 for e in events if e.get("cat") == "Node" and e.get("args", {}).get("op_name") in ("Conv", "FusedConv")
               and e["name"].endswith("_kernel_time"))


def test_cond_variant_skips_the_later_stages_when_the_batch_has_exited(model, graphs, raw, tmp_path):
    pool = raw(400, seed=11)
    out = run_onnx(graphs["cond"], pool)
    early = pool[out["served_by"] == 0][:8]  # every sample exits at exit_1
    late = pool[out["served_by"] == 3][:8]  # every sample walks to the primary
    assert len(early) == len(late) == 8
    assert _executed_convs(graphs["cond"], early, tmp_path) == 1  # stage 1 only
    assert _executed_convs(graphs["cond"], late, tmp_path) == 4
    assert _executed_convs(graphs["where"], early, tmp_path) == 4  # the where variant always runs all
    for x in (early, late):
        assert check_onnx_parity(model, graphs["cond"], x)["decisions_agree"]


def test_onnxruntime_vs_torch_reports_ratios(model, graphs, raw):
    r = onnxruntime_vs_torch(model, raw(1), raw(64), repeats=3, onnx_paths=graphs)
    for row in ("onnx_where", "onnx_cond"):
        assert r[row]["decisions_identical"]
        assert set(r[row]["ratio"]) == {"b1", "b64"} and all(v > 0 for v in r[row]["ratio"].values())
    assert ort_session(graphs["where"]).get_inputs()[0].name == "x"
