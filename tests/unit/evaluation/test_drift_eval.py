"""The calibration-drift study: its figures against a replay through the public API, and its manners."""

from __future__ import annotations

import json

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.shift import corrupt
from fallbackformer.evaluation.drift_eval import stream_indices, drift_study
from fallbackformer.runtime.events import ListSink


@pytest.fixture(scope="module")
def study_inputs(digits_system):
    x, y = digits_system.splits["test"]
    sets = {
        "clean": (x, y),
        "pixelate/5": (corrupt(x, "pixelate", 5, seed=0), y),
        "shot_noise/5": (corrupt(x, "shot_noise", 5, seed=0), y),
        "pixelate/2": (corrupt(x, "pixelate", 2, seed=0), y),  # another severity: not streamed
    }
    return sets


def test_the_study_matches_a_replay_and_restores_the_model(digits_system, study_inputs) -> None:
    sink = ListSink()
    policy = ff.Policy(budget_ms=40.0, hedge="off")
    model = digits_system.fresh_model(policy=policy, sinks=[sink])
    study = drift_study(model, study_inputs, requests=240, batch_size=8, clean_requests=400, held_out=["shot_noise"])
    assert model.policy is policy and model.sinks == [sink] and sink.events == []  # restored; no audit noise
    assert set(study["sets"]) == {"pixelate/5", "shot_noise/5"}
    assert study["clean"] == {"requests": 400, "false_alarm": False, "detected_after": None}
    e = study["sets"]["pixelate/5"]
    assert e["detected_after"] is not None and e["detected_after"] <= 200 and not e["held_out"]
    assert study["sets"]["shot_noise/5"]["held_out"]
    json.dumps(study)  # JSON-able

    # replay the alert stream through the public API
    x, y = study_inputs["pixelate/5"]
    idx = stream_indices(len(y), 240, 0, "pixelate/5")
    replay = digits_system.fresh_model(policy=ff.Policy(budget_ms=1e9, hedge="off", drift_check=True))
    detected, correct, covered, total = None, 0, 0, 0
    for start in range(0, 240, 8):
        out = replay(x[idx[start : start + 8]])
        if detected is not None:
            yb = y[idx[start : start + 8]]
            answered = torch.tensor([s != "default" for s in out.served_by])
            correct += int(((out.prediction == yb) & answered).sum())
            covered += int(answered.sum())
            total += 8
        elif "calibration_drift" in out.signals:
            detected = start + 8
    assert e["detected_after"] == detected
    alert = e["after"]["alert"]
    assert alert["n_after"] == total and alert["accuracy"] == pytest.approx(correct / total)
    assert alert["coverage"] == pytest.approx(covered / total)
    student = e["after"]["student"]
    assert student["n_after"] == total and 0.0 <= student["accuracy"] <= student["coverage"] <= 1.0
    s = study["summary"]
    assert s["n_sets"] == 2 and s["detected"] == sum(v["detected_after"] is not None for v in study["sets"].values())


def test_the_study_refuses_bad_settings(digits_system, study_inputs) -> None:
    with pytest.raises(ValueError, match="requests >= 1"):
        drift_study(digits_system.model, study_inputs, requests=0)
