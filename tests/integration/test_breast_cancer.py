"""experiment=breast_cancer: the pipeline on a second modality (tabular), nothing digits-specific in it.

The default test composes the experiment and runs its datamodule, shift suite and a one-epoch primary
and student through the pipeline's own functions; the slow one runs ``scripts/run.py`` whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

pytestmark = pytest.mark.integration


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="run", overrides=["experiment=breast_cancer", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_experiment_composes_and_runs_one_epoch(tmp_path):
    from fallbackformer.data.protocol import check_data_source, check_shift_suite
    from fallbackformer.training.pipeline import assemble, calibrate_paths, distill_student, train_primary

    cfg = _compose([f"+output_dir={tmp_path}", "trainer.max_epochs=1", "student.max_epochs=1"])
    assert cfg.num_classes == 2 and cfg.data._target_.endswith("BreastCancerDataModule") and not cfg.router
    datamodule = check_data_source(instantiate(cfg.data))
    datamodule.setup()
    suite = check_shift_suite(instantiate(cfg.shift))
    x_test, y_test = datamodule.splits["test"]
    sets = suite.build(x_test, y_test)
    assert {k.split("/")[0] for k in sets} == {"feature_noise", "missing_features", "scale_drift", "subpopulation"}

    primary, _ = train_primary(cfg, datamodule, tmp_path / "checkpoints")
    student, _ = distill_student(cfg, datamodule, primary, tmp_path / "checkpoints")
    assert float(primary.input_transform.std.mean()) != 1.0  # standardisation fitted before training
    gates, _ = calibrate_paths(cfg, primary, student, datamodule.splits)
    model = assemble(cfg, primary, student, gates, datamodule=datamodule)
    assert model.input_spec.shape == (30,) and list(model.class_names) == ["malignant", "benign"]
    out = model(sets["missing_features/3"][0][:16])
    assert out.prediction.shape == (16,) and set(out.served_by) <= {"exit_1", "exit_2", "primary", "student", "default"}

    cfg.num_classes = 10
    with pytest.raises(ValueError, match="num_classes=2"):
        assemble(cfg, primary, student, gates, datamodule=datamodule)


@pytest.mark.slow
def test_run_py_breast_cancer_end_to_end(tmp_path):
    """``scripts/run.py experiment=breast_cancer``: clean accuracies >= 0.9 and a shift section (~1 min)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/run.py", "experiment=breast_cancer", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for path in ("primary", "student", "system"):
        assert summary["accuracy"][path] >= 0.9, (path, summary["accuracy"])
    assert 0.0 <= summary["fallback_rate"] <= 1.0
    assert summary["shift"] and any(k.startswith("subpopulation/") for k in summary["shift"])
    assert (tmp_path / "report.html").exists() and (tmp_path / "bundle" / "manifest.json").exists()
