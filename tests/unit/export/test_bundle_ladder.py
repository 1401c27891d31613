"""A ladder in a bundle: rungs, veto, cache config and typed default stored as data, rebuilt by ff.load."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fallbackformer as ff
from fallbackformer.export.manifest import FORMAT_VERSION, BundleError, parse_manifest
from fallbackformer.rungs import CacheConfig, Coarse, ConstantClass, Prior
from fallbackformer.rungs.defaults import CallableDefault, register_default_action


def _runtime_tests():
    """The ladder of the runtime tests (one tiny ladder for both files)."""
    import importlib.util
    from pathlib import Path

    where = Path(__file__).parents[1] / "runtime" / "test_ladder_runtime.py"
    spec = importlib.util.spec_from_file_location("_ladder_runtime_tests", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_parts = _runtime_tests()
_inputs, _ladder = _parts._inputs, _parts._ladder


@register_default_action("bundle_test_stop")
def _stop(x, logits):
    return torch.zeros(logits.shape[0], dtype=torch.long)


@pytest.mark.parametrize("default", [Coarse({"loop": [0, 6, 8, 9], "rest": [1, 2, 3, 4, 5, 7]}),
                                     Prior(class_index=3, frequency=0.25), ConstantClass(2),
                                     CallableDefault("bundle_test_stop")])
def test_a_ladder_round_trips_through_a_bundle(tmp_path, default):
    model = _ladder(veto=("tree",), cache=CacheConfig(max_entries=8, ttl_ms=math.inf, min_confidence=0.5),
                    default=default)
    ff.save(model, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert [r["name"] for r in manifest["ladder"]["rungs"]] == ["tree", "linear"]
    assert manifest["ladder"]["default"] == default.to_dict() and manifest["ladder"]["veto"] == ["tree"]
    assert "rung_tree.safetensors" in manifest["files"]
    loaded = ff.load(tmp_path / "b", warm_up=False)
    loaded.policy = model.policy
    assert loaded.path_names == model.path_names and loaded.veto == ("tree",)
    assert loaded.cache.config == model.cache.config and loaded.default == default
    x = _inputs(300)
    a, b = model(x), loaded(x)
    assert a.served_by == b.served_by and a.reason == b.reason
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.prediction_set, b.prediction_set)


def test_the_vetos_level_round_trips_and_an_old_manifest_reads_as_every_answer(tmp_path):
    model = _ladder(veto=("tree",), veto_below=0.75)
    ff.save(model, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["ladder"]["veto_below"] == 0.75
    assert ff.load(tmp_path / "b", warm_up=False).veto_below == 0.75
    ff.save(_ladder(veto=("tree",)), tmp_path / "c")
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["ladder"]["veto_below"] == "inf"
    parsed = parse_manifest(_without_veto_below(manifest), "old bundle")  # a bundle saved before the level existed
    assert parsed.ladder["veto_below"] == math.inf
    with pytest.raises(BundleError, match="ladder.veto_below"):
        parse_manifest({**manifest, "ladder": {**manifest["ladder"], "veto_below": -1.0}}, "bad bundle")


def _without_veto_below(manifest: dict) -> dict:
    return {**manifest, "ladder": {k: v for k, v in manifest["ladder"].items() if k != "veto_below"}}


def test_the_cache_never_outlives_its_bundle(tmp_path):
    model = _ladder(cache=CacheConfig(max_entries=64, ttl_ms=math.inf, min_confidence=0.0))
    ff.save(model, tmp_path / "a")
    changed = model.rebuild(policy=ff.Policy(budget_ms=1e5, hedge="off"))
    ff.save(changed, tmp_path / "b")
    first = ff.load(tmp_path / "a", warm_up=False)
    first.policy = model.policy
    x = _inputs(40)
    first(x)
    assert len(first.cache) > 0 and first.cache.bundle_id == first.bundle_manifest["manifest_sha256"]
    other = ff.load(tmp_path / "b", warm_up=False)
    assert len(other.cache) == 0 and other.cache.bundle_id != first.cache.bundle_id
    first.cache.bind(other.cache.bundle_id)  # a cache moved to another bundle's answers starts empty
    assert len(first.cache) == 0


def test_a_single_student_bundle_has_no_ladder_field(tmp_path):
    model = _ladder().rebuild(fallbacks=[])
    ff.save(model, tmp_path / "s")
    assert "ladder" not in json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert ff.load(tmp_path / "s", warm_up=False).fallbacks == []
