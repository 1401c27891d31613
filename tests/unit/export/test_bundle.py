"""Bundles: exact round trip, a manifest that records everything, and each refusal naming its culprit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fallbackformer as ff
from fallbackformer.export.bundle import (
    DIGEST_FIELD,
    MANIFEST,
    BundleError,
    load,
    manifest_digest,
    save,
    sha256_file,
)


def _same(a: ff.FallbackOutput, b: ff.FallbackOutput) -> None:
    assert torch.equal(a.prediction, b.prediction)
    assert a.served_by == b.served_by and a.reason == b.reason
    assert torch.equal(a.logits.nan_to_num(7.0), b.logits.nan_to_num(7.0))
    assert torch.equal(a.confidence.nan_to_num(7.0), b.confidence.nan_to_num(7.0))


def _rewrite_manifest(bundle: Path, edit) -> None:
    """Edit the manifest and, like a careful forger, recompute its digest."""
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    m[DIGEST_FIELD] = manifest_digest(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def test_round_trip_is_exact_and_manifest_is_complete(model, raw, tmp_path):
    x = raw(200)
    expected = model(x)
    assert len(set(expected.served_by)) == 6  # every path and the default serve some sample
    evaluation = {"accuracy": 0.93, "ece": float("nan")}
    degradation = {"max_accuracy_drop": 0.02, "signed_off_by": "qa@example.com"}
    path = save(model, tmp_path / "b", evaluation=evaluation, degradation=degradation)
    loaded = load(path)
    _same(loaded(x), expected)

    m = json.loads((path / MANIFEST).read_text())
    assert m["format_version"] == 2 and m["fallbackformer_version"] == ff.__version__
    assert m["models"]["primary"] == {
        "registry_name": "digits_cnn_exits", "registry_kwargs": {"width": 4}, "file": "primary.safetensors"
    }
    assert m["models"]["student"]["registry_kwargs"] == {"hidden": 16}
    assert m["served_by_codes"] == ["exit_1", "exit_2", "exit_3", "primary", "student", "default"]
    assert m["input_spec"]["shape"] == [1, 8, 8] and m["input_spec"]["value_range"] == [0.0, 16.0]
    assert m["class_names"] == [str(i) for i in range(10)]
    assert m["policy"]["budget_ms"] == 1e6
    for name in model.path_names:
        assert m["gates"][name]["temperature"] == float(model.gates[name].temperature)
        assert m["gates"][name]["threshold"] == float(model.gates[name].threshold)
    assert m["evaluation"] == {"accuracy": 0.93, "ece": "nan"}
    assert m["degradation"] == degradation
    assert set(m["files"]) == {"primary.safetensors", "student.safetensors"}
    for rel, info in m["files"].items():
        assert info["sha256"] == sha256_file(path / rel)
    assert m[DIGEST_FIELD] == manifest_digest(m)
    assert loaded.model_hashes["primary"] == m["files"]["primary.safetensors"]["sha256"]
    assert loaded.policy == model.policy and loaded.input_spec == model.input_spec


def test_save_overwrites_a_bundle_but_not_another_folder(model, tmp_path):
    path = save(model, tmp_path / "b")
    save(model, path)  # a bundle may be replaced
    load(path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(BundleError, match="non-empty folder without manifest.json"):
        save(model, other)
    assert (other / "todo.txt").read_text() == "keep me"


def test_infinite_threshold_and_default_class_round_trip(make_model, raw, tmp_path):
    model = make_model(policy=ff.Policy(budget_ms=1e6, default_class=3))
    model.gates["student"].threshold.fill_(math.inf)  # the student never serves
    x = raw(64)
    loaded = load(save(model, tmp_path / "b"))
    assert math.isinf(float(loaded.gates["student"].threshold))
    out = loaded(x)
    _same(out, model(x))
    assert "student" not in out.served_by and (out.prediction[[s == "default" for s in out.served_by]] == 3).all()


# ---------------------------------------------------------------------- refusals


@pytest.fixture
def bundle(model, tmp_path) -> Path:
    return save(model, tmp_path / "b")


def test_refuses_a_changed_weight_file(bundle):
    p = bundle / "student.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"file student\.safetensors .* has sha256 .* changed or corrupted"):
        load(bundle)


@pytest.mark.parametrize(
    "field, edit",
    [
        ("threshold", lambda m: m["gates"]["exit_1"].__setitem__("threshold", 0.0)),
        ("temperature", lambda m: m["gates"]["primary"].__setitem__("temperature", 2.0)),
        ("policy", lambda m: m["policy"].__setitem__("budget_ms", 5.0)),
        ("file hash", lambda m: m["files"]["primary.safetensors"].__setitem__("sha256", "0" * 64)),
    ],
)
def test_refuses_an_edited_manifest(bundle, field, edit):
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    (bundle / MANIFEST).write_text(json.dumps(m, indent=2))
    with pytest.raises(BundleError, match=r"manifest\.json was edited after it was saved"):
        load(bundle)


def test_refuses_a_missing_file(bundle):
    (bundle / "primary.safetensors").unlink()
    with pytest.raises(BundleError, match=r"missing file primary\.safetensors"):
        load(bundle)


def test_refuses_a_missing_manifest(bundle):
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load(bundle)


def test_refuses_a_missing_folder(tmp_path):
    with pytest.raises(BundleError, match=r"bundle folder .*nowhere does not exist"):
        load(tmp_path / "nowhere")


def test_refuses_an_unknown_format_version(bundle):
    _rewrite_manifest(bundle, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match=r"unknown bundle format_version 99; this fallbackformer reads \[1, 2\]"):
        load(bundle)


def test_refuses_weights_whose_shapes_do_not_match_the_manifest_model(bundle):
    # The manifest says hidden=16, but the file holds a hidden=32 student (hashes made consistent).
    wide = ff.create_model("digits_mlp_student", hidden=32)
    p = bundle / "student.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(p))
    _rewrite_manifest(bundle, lambda m: m["files"]["student.safetensors"].update(sha256=sha256_file(p), bytes=p.stat().st_size))
    with pytest.raises(BundleError) as err:
        load(bundle)
    msg = str(err.value)
    assert "tensor 'net.0.weight' in student.safetensors has shape (32, 64)" in msg
    assert "expects (16, 64)" in msg and "digits_mlp_student" in msg and "re-save" in msg


def test_refuses_weights_with_a_missing_tensor(bundle):
    p = bundle / "primary.safetensors"
    state = load_file(str(p))
    del state["heads.0.2.weight"]
    save_file(state, str(p))
    _rewrite_manifest(bundle, lambda m: m["files"]["primary.safetensors"].update(sha256=sha256_file(p), bytes=p.stat().st_size))
    with pytest.raises(BundleError, match=r"primary\.safetensors lacks tensor 'heads\.0\.2\.weight'"):
        load(bundle)


def test_refuses_an_unregistered_model_name_at_load(bundle):
    _rewrite_manifest(bundle, lambda m: m["models"]["student"].__setitem__("registry_name", "my_student"))
    with pytest.raises(BundleError, match=r"registry model 'my_student'.*register_model"):
        load(bundle)


def test_refuses_paths_outside_the_bundle(bundle):
    _rewrite_manifest(bundle, lambda m: m["files"].__setitem__("../escape.txt", {"sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(BundleError, match=r"'\.\./escape\.txt', outside the bundle"):
        load(bundle)


def test_refuses_a_model_the_registry_did_not_build(model, tmp_path):
    user_primary = ff.MultiExitNet([torch.nn.Flatten(), torch.nn.Linear(64, 10)], {1: torch.nn.Identity()})
    bad = ff.FallbackModel(user_primary, model.student, [ff.ConfidenceGate(), ff.ConfidenceGate()])
    with pytest.raises(BundleError, match=r"the primary \(MultiExitNet\) was not built by fallbackformer\.create_model.*register_model"):
        save(bad, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_refuses_a_model_changed_after_create_model(make_model, tmp_path):
    model = make_model()
    model.student.net[0] = torch.nn.Linear(64, 16, bias=False)
    with pytest.raises(BundleError, match=r"student\.safetensors lacks tensor 'net\.0\.bias'.*changed after create_model"):
        save(model, tmp_path / "b")


def test_onnxruntime_backend_refuses_a_bundle_without_graphs(bundle):
    with pytest.raises(BundleError, match=r"no per-stage ONNX graphs.*onnx=True"):
        load(bundle, backend="onnxruntime")


def test_refuses_an_unknown_backend(bundle):
    with pytest.raises(BundleError, match=r"unknown backend 'tensorrt'"):
        load(bundle, backend="tensorrt")
