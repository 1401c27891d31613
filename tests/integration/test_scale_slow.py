"""Issue 13 (4, 5) end to end, through scripts/run.py in subprocesses: DDP on 2 CPU ranks against one
process, and a 2-trial Optuna sweep. Both slow (minutes on 2 cores): ``pytest -m slow tests/integration/test_scale_slow.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Clean test accuracy (points) that DDP on 2 ranks may differ from one process, same global batch
# (2 x 32 against 1 x 64), experiment=fast. Measured: primary 0.936 (1 process) / 0.911 (2 ranks),
# student 0.799 / 0.819. DDP deals the samples out differently (DistributedSampler), so 3-epoch runs
# are not bit-equal; they land within a few points. (With 64 per rank, half the optimizer steps:
# primary 0.733, so the global batch has to be kept.)
TOLERANCE_PT = 5.0
# The smallest job that still trains, distills, calibrates and evaluates.
SMALL = ["experiment=fast", "onnx.export=false", "evaluation.drift=null", "+degradation.on_breach=signal"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ddp_sim_matches_one_process(tmp_path):
    cache = f"shift.cache_dir={tmp_path / 'shift_cache'}"
    _run([*SMALL, cache, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    ddp = _run([*SMALL, cache, "trainer=ddp_sim", "data.batch_size=32", f"hydra.run.dir={tmp_path / 'ddp'}"],
               tmp_path)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    for path in ("primary", "student"):
        gap = 100 * abs(one["accuracy"][path] - two["accuracy"][path])
        assert gap <= TOLERANCE_PT, (path, one["accuracy"][path], two["accuracy"][path])
    # Rank 1 ran (Lightning's Hydra re-launch logs it as its own job) but only trained.
    rank1 = (tmp_path / "ddp" / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1" in rank1 and "summary written" not in rank1
    # The console: Lightning's own handler ("INFO: ...") is gone, no record twice in a row, no tips.
    out = ddp.stdout + ddp.stderr
    assert not [line for line in out.splitlines() if line.startswith("INFO: ")]
    records = [line.split(" - ", 1)[-1] for line in out.splitlines() if line.startswith("[")]
    assert records and all(a != b for a, b in zip(records, records[1:])), records
    assert "Tip" not in out


def test_two_trial_optuna_sweep_reports_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    _run(["-m", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
          f"shift.cache_dir={tmp_path / 'shift_cache'}"], tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"router.alpha", "policy.budget_ms", "student.model.hidden"}
    assert 0.0 <= float(results["best_value"]) <= 1.0
    values = [json.loads((sweep / str(i) / "summary.json").read_text())["accuracy"]["system"] for i in (0, 1)]
    assert float(results["best_value"]) == pytest.approx(max(values))
