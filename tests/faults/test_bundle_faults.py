"""Issue 12, bundles: one read per file, sizes before hashes, a schema, no allocation before checks,
no special files, the manifest path as the bundle, deterministic bytes, a versioned format."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fallbackformer as ff
from fallbackformer.export import bundle as bundle_mod
from fallbackformer.export.bundle import DIGEST_FIELD, MANIFEST, BundleError, load, manifest_digest, save

DIGITS = Path(__file__).resolve().parents[2] / "checkpoints" / "digits"


def _rewrite(bundle: Path, edit) -> None:
    """Edit the manifest and recompute its digest (a careful forger)."""
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    m[DIGEST_FIELD] = manifest_digest(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def _same_weights(module: torch.nn.Module, ref: torch.nn.Module) -> bool:
    a, b = module.state_dict(), ref.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def bundle(model_a, tmp_path) -> Path:
    return save(model_a, tmp_path / "b")


# ---------------------------------------------------------------------- one read per file


class _SwapAfterHash:
    """A stand-in for ``hashlib`` that swaps a file on disk right after its good hash is computed."""

    def __init__(self, good_hash: str, target: Path, evil: bytes) -> None:
        self.good_hash, self.target, self.evil, self.swapped = good_hash, target, evil, False

    def sha256(self, *args):
        outer = self
        h = hashlib.sha256(*args)

        class _H:
            def update(self, data):
                h.update(data)

            def hexdigest(self):
                digest = h.hexdigest()
                if digest == outer.good_hash and not outer.swapped:
                    outer.target.write_bytes(outer.evil)  # in place: same inode folder, other weights
                    outer.swapped = True
                return digest

        return _H()

    def __getattr__(self, name):
        return getattr(hashlib, name)


def test_a_file_swapped_after_its_hash_is_never_served_under_that_hash(model_a, model_b, tmp_path, monkeypatch):
    good = save(model_a, tmp_path / "good")
    other = save(model_b, tmp_path / "other")
    good_hash = load(good).model_hashes["primary"]
    swap = _SwapAfterHash(good_hash, good / "primary.safetensors", (other / "primary.safetensors").read_bytes())
    for name in ("fallbackformer.export.bundle", "fallbackformer.export.bundle_io"):
        if name in sys.modules:
            monkeypatch.setattr(sys.modules[name], "hashlib", swap, raising=False)
    loaded = load(good)
    assert swap.swapped, "the test did not reach the swap point"
    assert loaded.model_hashes["primary"] == good_hash
    assert _same_weights(loaded.primary, model_a.primary), "weights from a second read were served under the first read's hash"


# ---------------------------------------------------------------------- sizes, schema, allocation


def test_a_huge_file_in_place_of_a_weight_file_is_refused_before_hashing(bundle, monkeypatch):
    target = bundle / "primary.safetensors"
    with open(target, "r+b") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB on paper, no disk
    hashed = []
    real = hashlib.sha256

    class _Count:
        def sha256(self, *args):
            h = real(*args)
            hashed.append(sum(len(a) for a in args))
            return h

        def __getattr__(self, name):
            return getattr(hashlib, name)

    for name in ("fallbackformer.export.bundle", "fallbackformer.export.bundle_io"):
        if name in sys.modules:
            monkeypatch.setattr(sys.modules[name], "hashlib", _Count(), raising=False)
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda *a, **k: pytest.fail("hashed a 3 GiB file"), raising=False)
    with pytest.raises(BundleError, match=r"primary\.safetensors .*3221225472 bytes.*records \d+"):
        load(bundle)


DEEP = 50_000


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: m.pop("models"), r"models"),
        (lambda m: m["models"].pop("student"), r"models\.student"),
        (lambda m: m["models"]["primary"].__setitem__("registry_kwargs", "width=4"), r"models\.primary\.registry_kwargs"),
        (lambda m: m["models"]["student"].__setitem__("file", 7), r"models\.student\.file"),
        (lambda m: m["models"]["student"]["registry_kwargs"].__setitem__("hidden", -5), r"models\.student"),
        (lambda m: m["gates"]["exit_2"].__setitem__("temperature", "hot"), r"gates\.exit_2"),
        (lambda m: m["gates"].pop("exit_2"), r"gates"),
        (lambda m: m["input_spec"].__setitem__("dtype", "int64"), r"input_spec\.dtype"),
        (lambda m: m["input_spec"].__setitem__("dtype", "no_such_dtype"), r"input_spec\.dtype"),
        (lambda m: m["input_spec"].__setitem__("shape", [1, -8, 8]), r"input_spec\.shape"),
        (lambda m: m["policy"].__setitem__("budget_ms", "fast"), r"policy"),
        (lambda m: m["policy"].__setitem__("no_such_field", 1), r"policy"),
        (lambda m: m["files"]["primary.safetensors"].__setitem__("bytes", -1), r"files\.primary\.safetensors\.bytes"),
        (lambda m: m.__setitem__("files", []), r"files"),
        (lambda m: m.__setitem__("paths", "exit_1"), r"paths"),
        (lambda m: m.__setitem__("latency_profile", {"stages": {"stage_0": {"3": {}}}}), r"latency_profile"),
        (lambda m: m.__setitem__("class_names", [1, 2]), r"class_names"),
        (lambda m: m.__setitem__("surprise", {}), r"surprise"),
    ],
)
def test_a_manifest_outside_the_schema_is_refused_naming_the_field(bundle, edit, pattern):
    _rewrite(bundle, edit)
    with pytest.raises(BundleError, match=pattern) as info:
        load(bundle)
    assert str(bundle) in str(info.value)


def test_a_deeply_nested_manifest_is_a_bundle_error(bundle):
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text.rstrip()[:-1] + ', "evaluation_x": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(BundleError, match=r"nest"):
        load(bundle)


@pytest.fixture
def spy_builds(monkeypatch):
    """Record the device every registry model is built on; refuse a huge build off the meta device."""
    from fallbackformer.models import registry

    real = registry.create_model
    devices = []

    def spy(name, **kwargs):
        device = torch.get_default_device()
        devices.append((name, device.type))
        if device.type != "meta" and any(isinstance(v, int) and v > 10**5 for v in kwargs.values()):
            pytest.fail(f"built {name}({kwargs}) on {device} before checking its size")
        return real(name, **kwargs)

    monkeypatch.setattr(registry, "create_model", spy)
    return devices


@pytest.mark.parametrize("hidden", [10**6, 10**9])
def test_a_huge_model_is_refused_on_the_meta_device(bundle, spy_builds, hidden):
    _rewrite(bundle, lambda m: m["models"]["student"]["registry_kwargs"].__setitem__("hidden", hidden))
    with pytest.raises(BundleError, match=r"student"):
        load(bundle)
    student_builds = {device for name, device in spy_builds if name == "digits_mlp_student"}
    assert student_builds == {"meta"}, "the student was allocated before its size was checked"


# ---------------------------------------------------------------------- special files


def test_a_symlink_leaving_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((bundle / "primary.safetensors").read_bytes())
    (bundle / "primary.safetensors").unlink()
    os.symlink(outside, bundle / "primary.safetensors")
    with pytest.raises(BundleError, match=r"primary\.safetensors is a symlink to .*outside\.safetensors.*outside the bundle"):
        load(bundle)


def test_a_symlinked_folder_leaving_the_bundle_is_refused(model_a, tmp_path):
    import shutil

    bundle = save(model_a, tmp_path / "b", onnx=False)
    real = bundle.resolve()
    (real / "sub").mkdir()
    (real / "sub" / "x.bin").write_bytes(b"x")
    _rewrite(bundle, lambda m: m["files"].__setitem__("sub/x.bin", {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}))
    assert load(bundle)  # a plain sub-folder is fine
    outside = tmp_path / "elsewhere"
    shutil.move(real / "sub", outside)
    os.symlink(outside, real / "sub")
    with pytest.raises(BundleError, match=r"a folder on the path of sub/x\.bin is a symlink to .*elsewhere/x\.bin"):
        load(bundle)


def test_dev_zero_is_refused_as_a_device(bundle):
    (bundle / "student.safetensors").unlink()
    os.symlink("/dev/zero", bundle / "student.safetensors")
    with pytest.raises(BundleError, match=r"student\.safetensors is a symlink to /dev/zero \(a character device\)"):
        load(bundle)


def test_a_fifo_is_refused_without_blocking(bundle):
    (bundle / "student.safetensors").unlink()
    os.mkfifo(bundle / "student.safetensors")
    with pytest.raises(BundleError, match=r"student\.safetensors is a FIFO"):
        load(bundle)


def test_a_folder_where_a_file_should_be_is_refused(bundle):
    (bundle / "student.safetensors").unlink()
    (bundle / "student.safetensors").mkdir()
    with pytest.raises(BundleError, match=r"student\.safetensors is a folder"):
        load(bundle)


def test_a_fifo_manifest_is_refused(tmp_path):
    (tmp_path / "b").mkdir()
    os.mkfifo(tmp_path / "b" / MANIFEST)
    with pytest.raises(BundleError, match=r"manifest\.json is a FIFO"):
        load(tmp_path / "b")


# ---------------------------------------------------------------------- paths, determinism, versions


def test_the_manifest_path_names_the_bundle(bundle, model_a):
    loaded = load(bundle / MANIFEST)
    assert _same_weights(loaded.primary, model_a.primary)


def test_the_same_model_saved_twice_has_the_same_hashes(model_a, tmp_path):
    hashes = {tuple(sorted(load(save(model_a, tmp_path / f"s{i}")).model_hashes.items())) for i in range(4)}
    assert len(hashes) == 1


def test_the_format_version_is_bumped_and_a_v1_bundle_still_loads(bundle):
    assert ff.export.FORMAT_VERSION == 2
    assert json.loads((DIGITS / MANIFEST).read_text())["format_version"] == 2  # the shipped demo bundle
    _rewrite(bundle, lambda m: m.__setitem__("format_version", 1))  # v1 with recorded sizes
    model = load(bundle)
    assert model.bundle_manifest["format_version"] == 1 and model.model_hashes["primary"]


def test_a_v1_manifest_without_sizes_is_refused_naming_the_migration(bundle):
    def v1_without_sizes(m):
        m["format_version"] = 1
        for info in m["files"].values():
            info.pop("bytes")

    _rewrite(bundle, v1_without_sizes)
    with pytest.raises(BundleError, match=r"python -m fallbackformer\.export\.migrate"):
        load(bundle)


def test_migrate_rewrites_a_v1_bundle_as_the_current_version(model_a, tmp_path):
    import shutil

    shutil.copytree(DIGITS, tmp_path / "digits", ignore=shutil.ignore_patterns("*.onnx", "onnx"))
    _rewrite(tmp_path / "digits", lambda m: (m.pop("onnx"), [m["files"].pop(k) for k in list(m["files"]) if k.endswith(".onnx")]))
    before = load(tmp_path / "digits")
    from fallbackformer.export.migrate import migrate

    migrate(tmp_path / "digits")
    after = load(tmp_path / "digits")
    assert after.bundle_manifest["format_version"] == 2
    assert after.model_hashes["primary"] == before.model_hashes["primary"]
    assert _same_weights(after.primary, before.primary)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name and ".tmp" in p.name or p.name.startswith(f".{name}."))


def test_a_killed_save_leaves_nothing_behind_after_the_next_save(model_a, tmp_path):
    save(model_a, tmp_path / "b")
    script = (
        "import os, sys, torch; sys.path.insert(0, os.getcwd()); import fallbackformer as ff\n"
        "sys.path.insert(0, 'tests/faults'); from conftest import tiny_model\n"
        "import safetensors.torch as st\n"
        "def dying(real):\n"
        "    def die(*a, **k):\n"
        "        out = real(*a, **k); os._exit(9)\n"
        "    return die\n"
        "st.save_file, st.save = dying(st.save_file), dying(st.save)\n"
        "import fallbackformer.export.bundle as b\n"
        "if hasattr(b, 'save_file'): b.save_file = st.save_file\n"
        f"ff.save(tiny_model(1), {str(tmp_path / 'b')!r})\n"
    )
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 9, run.stderr[-2000:]
    assert any(".tmp" in p.name or p.name.startswith(".b.") for p in tmp_path.iterdir()), "the killed save left no temp folder"
    save(model_a, tmp_path / "b")
    stale = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name or (p.name.startswith(".b.") and p.name != ".b.lock")]
    assert stale == []
    assert _same_weights(load(tmp_path / "b").primary, model_a.primary)
