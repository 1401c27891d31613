"""Issue 12: random edits of a manifest, re-digested so the digest check passes: ``ff.load`` either
loads or raises BundleError, nothing else (no KeyError, TypeError, RecursionError, MemoryError...)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fallbackformer.export.bundle import DIGEST_FIELD, MANIFEST, BundleError, load, manifest_digest, save

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 10**9, 2**63, 16, 64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["inf", "nan", "float64", "int64", "../x", "primary.safetensors", "/dev/zero"])
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every path to a value in ``obj`` (the root excluded)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out.append(path + (key,))
        out.extend(_nodes(value, path + (key,)))
    return out


def _apply(manifest: dict, path: tuple, op: str, value: Any, new_key: str) -> None:
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif isinstance(parent[key], dict):
        parent[key][new_key] = value
    elif isinstance(parent[key], list):
        parent[key].append(value)
    else:
        parent[key] = [parent[key], value]


@pytest.fixture(scope="module")
def base(model_a, tmp_path_factory) -> Path:
    return save(model_a, tmp_path_factory.mktemp("fuzz") / "b").resolve()


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_manifest_edit_escapes_as_anything_but_bundle_error(base, data):
    manifest = json.loads((base / MANIFEST).read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        nodes = [p for p in _nodes(manifest) if p != (DIGEST_FIELD,)]
        path = data.draw(st.sampled_from(nodes), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="op")
        _apply(manifest, path, op, data.draw(VALUES, label="value"), data.draw(st.text(max_size=6), label="key"))
    try:
        manifest[DIGEST_FIELD] = manifest_digest(manifest)
    except (ValueError, TypeError):
        pass  # NaN in the manifest: it cannot be digested, the loader must refuse it all the same
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "b"
        shutil.copytree(base, folder)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        try:
            load(folder)
        except BundleError:
            pass
