"""Reassess: approves the same bundle copied, refuses one whose threshold was lowered (re-saved)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.data.shift import corrupt
from fallbackformer.governance.reassess import ReassessSettings, reassess

ROOT = Path(__file__).resolve().parents[3]
BUNDLE = ROOT / "checkpoints" / "digits"


@pytest.fixture(scope="module")
def sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits_splits(seed=0)["test"]
    return {"clean": (x, y), "fog/5": (corrupt(x, "fog", 5), y), "rotate/3": (corrupt(x, "rotate", 3), y)}


@pytest.fixture(scope="module")
def degraded_dir(tmp_path_factory) -> Path:
    """The shipped bundle opened up (its router's threshold, or exit_1's gate, at 0: it answers everything), re-saved."""
    model = ff.load(BUNDLE)
    if model.router is not None:
        model.router.threshold.fill_(0.0)
        model.router.exit_floor = 0.0
    else:
        model.gates["exit_1"].threshold.fill_(0.0)
    man = model.bundle_manifest
    return ff.save(model, tmp_path_factory.mktemp("cand") / "bad", evaluation=man["evaluation"],
                   degradation=man["degradation"])


def test_approves_the_same_bundle_copied(tmp_path, sets) -> None:
    copy = shutil.copytree(BUNDLE, tmp_path / "same")
    current = ff.load(BUNDLE)
    result = reassess(current, ff.load(copy), sets, current.bundle_manifest["degradation"],
                      settings=ReassessSettings(latency_samples=8))
    assert result.verdict == "approve", result.line
    assert result.line.startswith("approve:")
    assert result.candidate["silent_error"] == result.current["silent_error"]


def test_refuses_a_lowered_threshold(sets, degraded_dir) -> None:
    current = ff.load(BUNDLE)
    result = reassess(current, ff.load(degraded_dir), sets, current.bundle_manifest["degradation"],
                      settings=ReassessSettings(latency_samples=8))
    assert result.verdict == "refuse"
    assert not result.checks["bounds"] and not result.checks["silent_error_clean"]
    assert result.line.startswith("refuse:") and "silent errors (clean)" in result.line


def test_script_says_one_line_and_exits_0_on_refuse(tmp_path, degraded_dir) -> None:
    cmd = [sys.executable, "scripts/reassess.py", f"current={BUNDLE}", f"candidate={degraded_dir}",
           "shift=smoke", "shift.names=[rotate]", "shift.severities=[5]", "reassess.latency_samples=4",
           f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith(("approve", "refuse"))]
    assert len(lines) == 1 and lines[0].startswith("refuse:")
    assert (tmp_path / "reassess.json").exists()
