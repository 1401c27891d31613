"""The main job end to end on tiny settings, and the bundle it writes loaded in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="run",
            overrides=["experiment=fast", f"+output_dir={out}", f"bundle_dir={out}/bundle",
                       f"shift.cache_dir={out}/shift_cache"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    from fallbackformer.training.pipeline import run

    summary, objects = run(cfg)
    return out, summary, objects


def test_summary_has_the_promised_keys(tiny_run):
    out, summary, _ = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["bundle"] == summary["bundle"]
    for key in ("primary", "student", "system"):
        assert 0.0 <= on_disk["accuracy"][key] <= 1.0
    assert set(on_disk["served_by"]) >= {"exit_1", "exit_2", "exit_3", "primary", "student", "default"}
    assert abs(sum(on_disk["served_by"].values()) - 1.0) < 1e-9
    assert 0.0 <= on_disk["fallback_rate"] <= 1.0
    assert len(on_disk["shift"]) >= 9
    for row in on_disk["shift"].values():
        assert set(row) >= {"accuracy_system", "accuracy_primary", "accuracy_student", "fallback_rate"}
    assert on_disk["onnx"]["decisions_agree"] == 1.0
    assert on_disk["onnx"]["max_abs_diff"] < 1e-4
    assert set(on_disk["seconds"]) >= {"total", "train", "distill", "calibrate", "label_free", "evaluate"}
    # the label-free estimator: fitted and chosen on the calibration split, stored in the bundle (issue 14)
    from fallbackformer.runtime.label_free import METHODS

    lf = on_disk["label_free"]
    assert lf["method"] in METHODS and lf["test_sets"]["all"][1] <= len(on_disk["shift"]) + 1
    assert json.loads((Path(summary["bundle"]) / "manifest.json").read_text())["label_free"]["method"] == lf["method"]


def test_bundle_loads_in_a_fresh_process_without_lightning_or_hydra(tiny_run):
    out, summary, objects = tiny_run
    x = objects["splits"]["test"][0][:64]
    torch.save(x, out / "x.pt")
    # the deadline is lifted on both sides: the comparison is of decisions, not of this machine's load
    in_process = objects["model"].rebuild()
    in_process.policy = dataclasses.replace(in_process.policy, budget_ms=1e9)
    expected = in_process(x).prediction
    assert (expected >= 0).float().mean() > 0.5, "the tiny system should answer most clean images"
    code = (
        "import dataclasses, sys, torch, fallbackformer as ff\n"
        f"model = ff.load({summary['bundle']!r})\n"
        "model.policy = dataclasses.replace(model.policy, budget_ms=1e9)\n"
        f"x = torch.load({str(out / 'x.pt')!r}, weights_only=True)\n"
        "out = model(x)\n"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf') if m in sys.modules]\n"
        "print(type(model).__name__, heavy, out.prediction.tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    name, heavy, preds = result.stdout.strip().split(" ", 2)
    assert name == "FallbackModel"
    assert heavy == "[]", f"loading imported {heavy}"
    assert eval(preds) == expected.tolist()
