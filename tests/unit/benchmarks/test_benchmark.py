"""The benchmark runs end to end on tiny settings and writes benchmark.json and BENCHMARKS.md.

No timing is asserted: only that every figure is there, consistent, and on the page.
"""

from __future__ import annotations

import json
from pathlib import Path

from fallbackformer.benchmarks import register_section, run_benchmark, unregister_section


def test_benchmark_sections_on_tiny_settings(digits_system, tmp_path: Path) -> None:
    cfg = {
        "out_dir": str(tmp_path),
        "num_threads": 1,
        "num_classes": 10,
        "router": {"corruptions": ["gaussian_noise", "rotate"], "severities": [3, 5], "seed": 0},
        "benchmark": {
            "sections": ["overhead", "evidence", "deadline", "early_exit", "onnxruntime", "custom"],
            "overhead": {"primary": "digits_cnn_exits", "student": "digits_mlp_student", "width": 8, "rounds": 2, "inner": 3,
                         "realistic": {"width": 4, "image_size": 16, "rounds": 2, "inner": 1}},
            "evidence": {"rounds": 2, "inner": 2},
            "deadline": {"budget_ms": 20.0, "calls": 30, "stall_probability": 0.2, "stall_ms": 60.0, "margin_ms": 1.0},
            "early_exit": {"rounds": 1, "inner": 2, "b1_samples": 3, "alpha_sweep": [0.05]},
            "onnxruntime": {"variants": ["where"], "backend": True, "threads": 1, "repeats": 2, "rounds": 1},
        },
    }
    system = {
        "primary": digits_system.primary,
        "student": digits_system.student,
        "gates": digits_system.gates,
        "splits": digits_system.splits,
        "input_spec": digits_system.model.input_spec,
    }

    @register_section("custom")
    def custom(ctx):
        return {"answer": 42, "cores": ctx.machine["logical_cores"]}

    try:
        results, objects = run_benchmark(cfg, system=system)
    finally:
        unregister_section("custom")
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(saved) == {"machine", "config", "overhead", "evidence", "deadline", "early_exit", "onnxruntime", "custom"}
    assert saved["machine"]["torch"] and saved["machine"]["cpu"] and "loaded" in saved["machine"]
    assert len(saved["machine"]["load_average_end"]) == 3
    o = results["overhead"]
    assert o["ratio_b1"] > 0 and o["ratio_b64"] > 0 and "goal_met" in o
    assert o["ratio_floor_b1"] > 0 and o["ratio_floor_b64"] > 0 and o["ratio_gate_only_b1"] > 0
    assert o["ratio_b1_iqr"][0] <= o["ratio_b1"] <= o["ratio_b1_iqr"][1]
    assert o["ratio_vs_gated_peer_b1"] > 0 and o["ratio_vs_gated_peer_b64"] > 0 and "added_us_vs_gated_peer_b1" in o
    assert o["realistic"]["ratio_vs_gated_peer_b1"] > 0 and o["realistic"]["gflops_b1"] > 0
    ev = results["evidence"]
    assert "status" not in ev, ev
    for b in (1, 64):
        assert ev[f"ratio_b{b}"] > 0 and f"added_us_b{b}" in ev and ev[f"peer_ratio_b{b}"] > 0
    assert objects["system"]["router"] is not None  # fitted by the benchmark: the system had none
    d = results["deadline"]
    for variant in ("fallbackformer", "naive_timeout", "no_wrapper"):
        assert {"p50_ms", "p99_ms", "p999_ms", "max_ms", "misses"} <= set(d[variant])
    assert d["no_wrapper"]["max_ms"] >= 60.0  # the stall is there
    assert d["fallbackformer"]["max_ms"] < d["no_wrapper"]["max_ms"]
    e = results["early_exit"]
    assert 0.0 <= e["compute_saved"] <= e["oracle_compute_saved"] + 1e-9 <= 1.0 + 1e-9
    assert abs(e["compute_saved"] - e["compute_saved_measured"]) < 0.02  # per-sample count vs measured FLOPs
    assert e["flops_check_rel_err"] < 1e-6 and len(e["alpha_sweep"]) == 1
    r = e["router"]
    assert r["compute_saved"] <= 1.0 - r["student_flops_share"] + 1e-9  # the student is paid for every sample
    assert abs(sum(r["served_by"].values()) - 1.0) < 1e-9 and 0.0 <= r["coverage"] <= 1.0
    assert r["compute_saved_measured"] <= r["compute_saved"] + 1e-6  # the scorers cost something too
    ort = results["onnxruntime"]
    assert set(ort) >= {"torch_ms", "onnx_where", "ort_backend", "decisions_identical"} and "onnx_cond" not in ort
    for row in ("onnx_where", "ort_backend"):
        for b in ("b1", "b64"):
            assert ort[row]["ms"][b] > 0 and ort[row]["ratio"][b] > 0
            lo, hi = ort[row]["ratio_spread"][b]
            assert lo <= ort[row]["ratio"][b] <= hi
        assert ort[row]["decisions_identical"] is True  # the same answers, whatever the engine
    assert results["custom"] == {"answer": 42, "cores": saved["machine"]["logical_cores"]}
    md = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in ("## Overhead", "## Evidence cost", "## Deadline", "## Early exits", "## onnxruntime", "## custom"):
        assert heading in md
    assert "${" not in md and "combined graph, cond" not in md  # optional rows of variants not run are dropped
    assert "bundle, backend=\"onnxruntime\"" in md and "not available" not in md and "With the router" in md


def test_a_ladder_bundle_gives_the_sections_the_exit_and_student_gates() -> None:
    """A bundle with rungs (the shipped demo) hands the sections one gate per exit and the student;
    its rungs travel in ``fallbacks`` (the evidence section once got all seven gates and refused)."""
    from hydra import compose, initialize_config_dir

    import fallbackformer as ff
    from fallbackformer.benchmarks.context import build_system

    root = Path(__file__).resolve().parents[3]
    demo = root / "checkpoints" / "digits"
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=[f"bundle={demo}"])
    system = build_system(cfg)
    primary = system["primary"]
    assert [r.name for r in system["fallbacks"]] == ["forest", "linear"]
    assert len(system["gates"]) == primary.num_exits + 1
    model = ff.FallbackModel(primary, system["student"], system["gates"], ff.Policy(budget_ms=1e4),
                             input_spec=system["input_spec"])
    assert model.path_names == primary.exit_names + ["student"]
