"""Every ONNX graph a bundle's manifest names must be hashed in it and lie inside the bundle."""

from __future__ import annotations

import pytest

from fallbackformer.export.bundle import BundleError, verify_files


def _manifest(onnx_section):
    return {
        "models": {"primary": {"file": "primary.safetensors"}, "student": {"file": "student.safetensors"}},
        "files": {"primary.safetensors": {"sha256": "0" * 64}, "student.safetensors": {"sha256": "0" * 64}},
        "onnx": onnx_section,
    }


@pytest.mark.parametrize(
    "onnx_section,culprit",
    [
        ({"stages": ["onnx/stage_0.onnx"]}, "onnx/stage_0.onnx"),
        ({"student": "../outside.onnx"}, "../outside.onnx"),
        ({"heads": {"0": "onnx/head_0.onnx"}}, "onnx/head_0.onnx"),
    ],
)
def test_an_onnx_graph_missing_from_the_hashes_is_refused(tmp_path, onnx_section, culprit):
    with pytest.raises(BundleError, match=f"no sha256 for {culprit}"):
        verify_files(tmp_path, _manifest(onnx_section))


def test_the_shipped_layout_names_every_graph(tmp_path):
    from fallbackformer.export.manifest import onnx_files

    section = {"combined": "model.onnx", "combined_variant": "where", "heads": {"0": "onnx/h.onnx"},
               "input_transform": "onnx/t.onnx", "stages": ["onnx/s0.onnx"], "student": "onnx/st.onnx"}
    assert sorted(onnx_files(section)) == ["model.onnx", "onnx/h.onnx", "onnx/s0.onnx", "onnx/st.onnx", "onnx/t.onnx"]
