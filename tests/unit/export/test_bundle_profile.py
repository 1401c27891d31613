"""The latency profile travels in the bundle: saved as priors, covered by the digest, replaced by warm-up."""

from __future__ import annotations

import json

import pytest

from fallbackformer.export.bundle import DIGEST_FIELD, MANIFEST, BundleError, load, manifest_digest, save
from fallbackformer.runtime.latency import LatencyProfile


def _profiled(make_model, raw):
    model = make_model()
    for bs, ms in ((1, 0.5), (4, 2.0)):  # scripted timings, so the figures are exact
        for k in range(10):
            for stage in ("stage_0", "stage_1", "student"):
                model.profile.record(stage, bs, ms + 0.01 * k)
    return model


def test_the_profile_round_trips_as_priors(make_model, raw, tmp_path) -> None:
    model = _profiled(make_model, raw)
    path = save(model, tmp_path / "b")
    m = json.loads((path / MANIFEST).read_text())
    assert m["latency_profile"] == model.profile.to_dict()
    loaded = load(path)
    assert loaded.profile.summary() == model.profile.summary()
    for stage in ("stage_0", "stage_1", "student"):
        for bs in (1, 4, 3, 64):  # own buckets, and the neighbours a prediction borrows from
            assert loaded.profile.predict_p99(stage, bs) == model.profile.predict_p99(stage, bs)
    assert loaded.profile.count("stage_0", 1) == 0  # priors, not live samples
    # warm-up on the serving machine: live samples take over from the prior in the buckets it measures
    loaded.warm_up(raw(4), repeats=loaded.profile.min_samples, discard=0, batch_sizes=[1])
    assert loaded.profile.count("stage_0", 1) == loaded.profile.min_samples
    assert loaded.profile.p99("stage_0", 1) != model.profile.p99("stage_0", 1)
    assert loaded.profile.p99("stage_0", 4) == model.profile.p99("stage_0", 4)  # not measured: the prior


def test_a_bundle_without_a_profile_loads_with_a_fresh_one(make_model, tmp_path) -> None:
    path = save(make_model(), tmp_path / "b")

    def drop(m):
        del m["latency_profile"]

    m = json.loads((path / MANIFEST).read_text())
    drop(m)
    m[DIGEST_FIELD] = manifest_digest(m)  # an older bundle: the field never existed
    (path / MANIFEST).write_text(json.dumps(m))
    loaded = load(path)
    assert isinstance(loaded.profile, LatencyProfile) and loaded.profile.stages() == []
    assert loaded.profile.window == loaded.policy.latency_window


def test_an_edited_profile_is_refused(make_model, raw, tmp_path) -> None:
    path = save(_profiled(make_model, raw), tmp_path / "b")
    m = json.loads((path / MANIFEST).read_text())
    m["latency_profile"]["stages"]["stage_0"]["1"]["p99"] = 0.001  # a rosier stage: admits more work
    (path / MANIFEST).write_text(json.dumps(m, indent=2))
    with pytest.raises(BundleError, match=r"manifest\.json was edited after it was saved"):
        load(path)


def test_an_unreadable_profile_names_the_field(make_model, raw, tmp_path) -> None:
    path = save(_profiled(make_model, raw), tmp_path / "b")
    m = json.loads((path / MANIFEST).read_text())
    m["latency_profile"]["format_version"] = 99
    m[DIGEST_FIELD] = manifest_digest(m)
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="latency_profile"):
        load(path)
