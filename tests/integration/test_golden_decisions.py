"""The demo bundle's decisions, pinned: per sample, who served, why, what and how sure.

The golden file was written by the runtime as it stood before the decisions were split from the
runtime (issue 11): a refactor of the runtime must not change one decision. The deadline is lifted
(a budget of 10^9 ms) so that the decisions depend on the models, the gates and the router only,
never on this machine's load. Two decision paths are pinned: the bundle as shipped (its router
decides) and the same bundle with the per-exit gates deciding (``rebuild(router=None)``), on the
clean test split, a handful of shift sets and a batch with invalid samples.

A change that alters decisions on purpose regenerates the file, and says so in its commit::

    PYTHONPATH=. python tests/integration/test_golden_decisions.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.data.shift import ShiftSuite

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "checkpoints" / "digits"
GOLDEN = Path(__file__).resolve().parent / "golden" / "digits_decisions.npz"
CORRUPTIONS = ("gaussian_noise", "rotate", "occlusion", "fog")  # fog is held out: never tuned on
SEVERITIES = (3, 5)
SEED = 7
BATCH = 100  # an uneven last batch (60): compaction and a batch size other than a power of two
HUGE_BUDGET_MS = 1e9

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (DEMO / "manifest.json").exists(), reason="no demo bundle in checkpoints/digits"),
]


def shift_sets() -> dict[str, torch.Tensor]:
    """The inputs, by set name: the clean test split, the shift sets and a batch with invalid samples."""
    x, _ = load_digits_splits(seed=0)["test"]
    suite = ShiftSuite(names=[c for c in CORRUPTIONS if c != "fog"], held_out=["fog"])
    sets = {"clean": x}
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            sets[f"{name}/{severity}"] = suite.corrupt(x, name, severity, seed=SEED)
    bad = x[:24].clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[5, 0, 3, 3] = float("inf")
    bad[9, 0, 7, 7] = 17.5  # outside 0..16
    bad[14, 0, 2, 2] = -2.0
    sets["invalid"] = bad
    return sets


def lifted(model: ff.FallbackModel) -> ff.FallbackModel:
    """The model with its deadline lifted (and bad samples served by the default, not raised)."""
    model.policy = dataclasses.replace(model.policy, budget_ms=HUGE_BUDGET_MS, on_invalid_input="default")
    return model


def decisions(model: ff.FallbackModel, sets: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per set, the concatenated answers: served_by, reason (names), prediction, confidence."""
    out: dict[str, list] = {}
    for key, x in sets.items():
        served, reason, pred, conf = [], [], [], []
        for xb in x.split(BATCH):
            answer = model(xb)
            served += answer.served_by
            reason += answer.reason
            pred.append(answer.prediction.cpu())
            conf.append(answer.confidence.float().cpu())
        out[key] = [served, reason, torch.cat(pred).numpy(), torch.cat(conf).numpy()]
    return out


def variants() -> dict[str, ff.FallbackModel]:
    routed = lifted(ff.load(DEMO))
    gated = lifted(routed.rebuild(router=None))
    return {"router": routed, "gates": gated}


def encode(all_decisions: dict[str, dict[str, list]]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for variant, per_set in all_decisions.items():
        for key, (served, reason, pred, conf) in per_set.items():
            stem = f"{variant}|{key}"
            arrays[f"{stem}|served_by"] = np.array(served, dtype="U16")
            arrays[f"{stem}|reason"] = np.array(reason, dtype="U24")
            arrays[f"{stem}|prediction"] = pred.astype(np.int16)
            arrays[f"{stem}|confidence"] = conf.astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def current() -> dict[str, np.ndarray]:
    models = variants()
    try:
        sets = shift_sets()
        return encode({name: decisions(model, sets) for name, model in models.items()})
    finally:
        for model in models.values():
            model.close()


def test_golden_file_covers_every_set_and_path(golden):
    sets = {k.split("|")[1] for k in golden}
    assert sets == {"clean", "invalid", *(f"{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES)}
    served = set(np.concatenate([v for k, v in golden.items() if k.endswith("served_by")]))
    assert {"exit_1", "primary", "student", "default"} <= served  # every kind of path is pinned
    reasons = set(np.concatenate([v for k, v in golden.items() if k.endswith("|reason")]))
    assert {"", "low_confidence", "invalid_input"} <= reasons


def test_decisions_equal_the_golden_file(golden, current):
    assert sorted(current) == sorted(golden)
    for key, want in golden.items():
        got = current[key]
        if key.endswith("confidence"):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, equal_nan=True, err_msg=key)
        else:
            mismatch = np.flatnonzero(got != want)
            assert mismatch.size == 0, f"{key}: samples {mismatch[:10].tolist()} differ: {got[mismatch[:10]]} != {want[mismatch[:10]]}"


def test_decisions_do_not_depend_on_hedging(golden):
    """The same decisions when everything runs on the calling thread (no workers)."""
    model = ff.load(DEMO, warm_up=False)
    lifted(model)
    model.policy = dataclasses.replace(model.policy, hedge="off")
    x = shift_sets()["clean"]
    served, reason, pred, conf = decisions(model, {"clean": x})["clean"]
    model.close()
    assert served == golden["router|clean|served_by"].tolist()
    assert reason == golden["router|clean|reason"].tolist()
    np.testing.assert_array_equal(pred, golden["router|clean|prediction"])
    np.testing.assert_allclose(conf, golden["router|clean|confidence"], rtol=0, atol=1e-6, equal_nan=True)


if __name__ == "__main__":  # regenerate (see the module docstring)
    torch.set_num_threads(1)  # as the test session (tests/conftest.py): confidences are pinned to 1e-6
    models = variants()
    arrays = encode({name: decisions(model, shift_sets()) for name, model in models.items()})
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN, **arrays)
    for model in models.values():
        model.close()
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes, {len(arrays)} arrays)")
