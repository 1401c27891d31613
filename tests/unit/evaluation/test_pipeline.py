"""scripts/evaluate.py's function: a saved bundle, the composed config, the report on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import fallbackformer as ff
from fallbackformer.evaluation.pipeline import run_evaluation

CONFIGS = str(Path(__file__).resolve().parents[3] / "configs")


def test_evaluate_config_composes() -> None:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["bundle=/nowhere"])
    assert cfg.shift.severities == [1, 2, 3, 4, 5] and len(cfg.shift.names) >= 12 and len(cfg.shift.held_out) >= 3
    assert not set(cfg.shift.names) & set(cfg.shift.held_out)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        smoke = compose(config_name="evaluate", overrides=["bundle=/nowhere", "shift=smoke"])
    assert len(smoke.shift.names) + len(smoke.shift.held_out) == 3 and len(smoke.shift.severities) == 3


def test_run_evaluation_on_a_bundle(digits_system, tmp_path) -> None:
    bundle = tmp_path / "bundle"
    ff.save(digits_system.fresh_model(), bundle)
    out = tmp_path / "eval"
    overrides = [
        f"bundle={bundle}", "shift=smoke", f"shift.cache_dir={tmp_path / 'cache'}", f"out_dir={out}",
        "evaluation.latency_samples=2", "evaluation.stage_reps=2", "evaluation.progress=false",
        "evaluation.budgets_ms=[0.01,1000.0]", "report.save_pngs=false",
    ]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    metrics, objects = run_evaluation(cfg)
    doc = json.loads((out / "report.json").read_text())
    expected = {"clean"} | {f"{n}/{s}" for n in ("gaussian_noise", "rotate", "fog") for s in (1, 3, 5)}
    assert expected <= set(doc)
    for key in expected:
        assert {"primary", "student", "system"} <= set(doc[key]["accuracy"])
    assert {"mce", "relative_drop"} <= set(doc["summary"])
    assert (out / "report.html").stat().st_size > 50_000 and (out / "report.md").exists()
    assert metrics["accuracy"]["system"] == pytest.approx(doc["clean"]["accuracy"]["system"])
    assert doc["fog/5"]["held_out"] is True


def test_missing_bundle_is_a_clear_error(tmp_path) -> None:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"bundle={tmp_path / 'nope'}", f"out_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="nope"):
        run_evaluation(cfg)
