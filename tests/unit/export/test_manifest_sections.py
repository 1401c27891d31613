"""Optional manifest sections: a registered section is saved by its to_config, validated by its
from_config at load (errors named), and an unregistered top-level field is refused."""

from __future__ import annotations

import json

import pytest

from fallbackformer.export.bundle import DIGEST_FIELD, MANIFEST, BundleError, load, manifest_digest, save
from fallbackformer.export.manifest import ManifestSection, register_section, registered_sections, unregister_section


@pytest.fixture
def annotation_section():
    """A stand-in optional section, removed after the test."""

    def from_config(cfg):
        if not isinstance(cfg, dict) or not isinstance(cfg.get("threshold"), float):
            raise ValueError(f"annotation threshold must be a float; got {cfg!r}")
        return ("annotation", cfg["threshold"])

    yield register_section(ManifestSection("annotation", from_config, to_config=lambda model: {"threshold": 0.25}))
    unregister_section("annotation")
    assert "annotation" not in registered_sections()


def test_a_registered_section_round_trips(model, tmp_path, annotation_section):
    path = save(model, tmp_path / "b")
    assert json.loads((path / MANIFEST).read_text())["annotation"] == {"threshold": 0.25}
    assert load(path).bundle_sections == {"annotation": ("annotation", 0.25)}


def test_a_bad_section_is_refused_naming_it(model, tmp_path, annotation_section):
    path = save(model, tmp_path / "b")
    m = json.loads((path / MANIFEST).read_text())
    m["annotation"] = {"threshold": "high"}
    m[DIGEST_FIELD] = manifest_digest(m)
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest field annotation cannot be read .*annotation threshold must be a float"):
        load(path)


def test_an_unregistered_section_is_refused(model, tmp_path, annotation_section):
    path = save(model, tmp_path / "b")
    unregister_section("annotation")
    with pytest.raises(BundleError, match=r"manifest field annotation is not a field this fallbackformer knows.*register_section"):
        load(path)


def test_a_core_field_cannot_be_a_section():
    with pytest.raises(ValueError, match="core manifest field"):
        register_section(ManifestSection("gates", dict))
