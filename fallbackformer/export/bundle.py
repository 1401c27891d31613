"""Bundles: a :class:`FallbackModel` saved as a verified folder, loaded without unpickling.

Layout (``FORMAT_VERSION`` 2; the manifest schema, its versions and optional sections are in
:mod:`fallbackformer.export.manifest`, atomic publishing and checked reads in
:mod:`fallbackformer.export.bundle_io`, loading in :mod:`fallbackformer.export.bundle_load`)::

    <bundle>/manifest.json          everything but the weights (see below), with a digest over itself
    <bundle>/primary.safetensors    the primary's state dict (weights and buffers only)
    <bundle>/student.safetensors    the student's state dict
    <bundle>/model.onnx             optional: the combined graph (export_onnx, "where" variant)
    <bundle>/onnx/*.onnx            optional: one graph per stage, head, input transform and the
                                    student, for ``load(path, backend="onnxruntime")``

``manifest.json`` holds the format version, the fallbackformer and torch versions, the registry
name and kwargs of the primary and the student, the input spec, the class names, the policy, the
gates (``ConfidenceGate.to_config()``: temperature, threshold, score, guarantee with alpha, delta,
method and calibration size), the served_by code table, the latency profile, the evaluation
summary, the acceptable degradation and sign-off, the sha256 of every file, and ``manifest_sha256``:
the sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without that field. A changed
threshold, temperature, policy or latency profile is caught like a changed weight. The digest catches
edits and corruption; it is not a signature: to authenticate a bundle, sign ``manifest_sha256`` with
your own key.

The latency profile (``latency_profile``: :meth:`LatencyProfile.to_dict` of ``model.profile``, the
p50/p99 per stage and batch-size bucket) is a *prior from the machine that saved the bundle*: the
loaded model's admission check reads it until live samples arrive, so the first calls are not
admitted blind. Timings from another machine (another CPU, another load, another backend) can be
far off: call ``model.warm_up(x)`` on the serving machine before serving; its live samples replace
the prior in every stage and bucket it measures (once a bucket holds ``min_samples`` of them), and
every served call keeps updating them. A manifest without the field (older bundles) loads with a
fresh, empty profile.

Loading reads each file once: its type (a regular file inside the folder; no FIFO, device or
outside symlink) and recorded size are checked before it is read, the sha256 is taken over the
bytes read, and those same bytes are deserialized. Models are first built on the meta device and
every tensor shape is checked against the safetensors header (and the total against the file's
size) before anything is allocated.

>>> path = save(model, "checkpoints/digits")      # doctest: +SKIP
>>> model = load("checkpoints/digits")            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from fallbackformer.common.jsonsafe import json_float
from fallbackformer.export import bundle_io
from fallbackformer.export.bundle_load import BACKENDS, compare_state, load, read_manifest, verify_files
from fallbackformer.export.manifest import (
    DIGEST_FIELD,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MIGRATE_COMMAND,
    SUPPORTED_FORMAT_VERSIONS,
    BundleError,
    canonical_json,
    manifest_digest,
    registered_sections,
)

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = [
    "BACKENDS", "DIGEST_FIELD", "MIGRATE_COMMAND", "FORMAT", "FORMAT_VERSION", "MANIFEST", "SUPPORTED_FORMAT_VERSIONS",
    "BundleError", "canonical_json", "load", "manifest_digest", "read_manifest", "save", "sha256_file",
    "verify_files",
]

MODEL_FILES = {"primary": "primary.safetensors", "student": "student.safetensors"}
ROUTER_FILE = "router.safetensors"
COMBINED_ONNX = "model.onnx"


# ---------------------------------------------------------------------- hashing and JSON


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _json_safe(obj: Any, where: str) -> Any:
    """A JSON-able copy: non-finite floats as strings, tuples as lists, tensors as lists."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist(), where)
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars
        return _json_safe(obj.item(), where)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise BundleError(
        f"{where} holds a {type(obj).__name__} ({obj!r:.80}), which a JSON manifest cannot store; "
        "pass numbers, strings, lists and dicts only"
    )


# ---------------------------------------------------------------------- save


def _registry_entry(module: nn.Module, role: str) -> dict[str, Any]:
    name = getattr(module, "registry_name", None)
    kwargs = getattr(module, "registry_kwargs", None)
    if name is None or kwargs is None:
        raise BundleError(
            f"the {role} ({type(module).__name__}) was not built by fallbackformer.create_model, so a "
            "bundle cannot rebuild it without pickling. Register a builder with "
            "@fallbackformer.register_model('<name>') that returns this model from JSON-able "
            "arguments, and build it with fallbackformer.create_model('<name>', **kwargs)"
        )
    safe_kwargs = _json_safe(dict(kwargs), f"{role} registry_kwargs")
    if json.loads(json.dumps(safe_kwargs)) != dict(kwargs):
        raise BundleError(
            f"the {role}'s registry_kwargs {dict(kwargs)!r} do not survive JSON unchanged; build "
            f"{name!r} with numbers, strings, lists and dicts as arguments"
        )
    return {"registry_name": name, "registry_kwargs": safe_kwargs}


def _check_rebuild(entry: Mapping[str, Any], state: Mapping[str, torch.Tensor], role: str) -> None:
    """The registry rebuilds a model with the same tensors (built on the meta device: no memory)."""
    from fallbackformer.models.registry import create_model

    with torch.device("meta"):
        rebuilt = create_model(entry["registry_name"], **entry["registry_kwargs"])
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    compare_state(rebuilt.state_dict(), shapes, role, f"{role}.safetensors", entry, saving=True)


def _state_for_file(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses shared storage; contiguous CPU tensors only.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _check_bundle_target(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        return  # a dangling link: replaced whole
    if path.exists() and not path.is_dir():
        raise BundleError(f"{path} exists and is not a folder; choose a folder path for the bundle")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise BundleError(
            f"{path} is a non-empty folder without {MANIFEST}; refusing to overwrite it. Choose a new "
            "folder or an existing bundle"
        )


def save(
    model: "FallbackModel",
    path: str | Path,
    *,
    evaluation: Mapping[str, Any] | None = None,
    degradation: Mapping[str, Any] | None = None,
    onnx: bool = False,
    example_input: torch.Tensor | None = None,
    signing_key: Any = None,
    signer: str | None = None,
) -> Path:
    """Save a model as a bundle (replacing an existing bundle there atomically).

    ``path`` becomes a symlink to a complete version folder ``<path>.v-<digest16>`` beside it,
    switched in one atomic rename (see :mod:`fallbackformer.export.bundle_io`): a concurrent
    ``load`` sees the old bundle or the new one, whole. The same model saved twice gives the same
    bytes and hashes.

    Args:
        model: the model; its primary and student must come from ``create_model``.
        path: the bundle folder.
        evaluation: the evaluation summary to record (JSON-able: numbers, strings, lists, dicts).
        degradation: the acceptable degradation and the sign-off (free, JSON-able).
        onnx: also write the combined graph ``model.onnx`` and one graph per stage, head, input
            transform and the student (``onnx/*.onnx``), so that
            ``load(path, backend="onnxruntime")`` works. Needs onnx and onnxscript; adds seconds.
        example_input: a raw batch for tracing when ``onnx`` is set (default: from the input spec).

    The manifest records ``model.profile`` (per-stage p50/p99 by batch bucket; warm the model up
    first to have one): a prior for the loading machine, not a promise about it.

    Returns:
        The bundle path (the symlink).

    Raises:
        BundleError: for a model the registry cannot rebuild or metadata JSON cannot hold.
    """
    import fallbackformer
    from fallbackformer.export.graph import served_by_codes

    path = Path(path)
    _check_bundle_target(path)
    entries = {
        "primary": _registry_entry(model.primary, "primary"),
        "student": _registry_entry(model.student, "student"),
    }
    states = {"primary": _state_for_file(model.primary), "student": _state_for_file(model.student)}
    for role in ("primary", "student"):
        _check_rebuild(entries[role], states[role], role)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fallbackformer_version": fallbackformer.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "models": {role: {**entries[role], "file": MODEL_FILES[role]} for role in ("primary", "student")},
        "input_spec": model.input_spec.to_dict() if model.input_spec is not None else None,
        "class_names": list(model.class_names) if model.class_names is not None else None,
        "policy": _json_safe(model.policy.to_dict(), "policy"),
        "paths": list(model.path_names),
        "gates": {name: _json_safe(model.gates[name].to_config(), f"gate {name}") for name in model.path_names},
        "served_by_codes": served_by_codes(model.path_names),
        "latency_profile": _json_safe(model.profile.to_dict(), "latency_profile"),
        "evaluation": _json_safe(dict(evaluation), "evaluation") if evaluation is not None else None,
        "degradation": _json_safe(dict(degradation), "degradation") if degradation is not None else None,
    }
    router = getattr(model, "router", None)
    if router is not None:  # its tensors in a weights file, its construction and guarantee in the manifest
        manifest["router"] = {**_json_safe(router.to_config(), "router"), "file": ROUTER_FILE}
    ladder = _ladder_entry(model)
    if ladder is not None:
        manifest["ladder"] = ladder
        for rung in model.fallbacks:
            states[rung.name] = _state_for_file(rung.module)
    from fallbackformer.export.bounds import enforce_bounds  # bounds as code (issue 14)

    enforce_bounds(manifest, f"ff.save to {path}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = bundle_io.temp_folder(path.parent, path.name)
    try:
        for role, filename in MODEL_FILES.items():
            # One metadata key: safetensors writes metadata in hash-map order, so two keys would make
            # the same model's bytes (and hashes) differ from save to save.
            (tmp / filename).write_bytes(_safetensors_bytes(states[role], {"fallbackformer": f"{FORMAT}/{role}"}))
        for rung in model.fallbacks:
            (tmp / rung_file(rung.name)).write_bytes(
                _safetensors_bytes(states[rung.name], {"fallbackformer": f"{FORMAT}/rung/{rung.name}"}))
        if router is not None:
            (tmp / ROUTER_FILE).write_bytes(_safetensors_bytes(_state_for_file(router), {"fallbackformer": f"{FORMAT}/router"}))
        if onnx:
            manifest["onnx"] = _write_onnx(model, tmp, example_input)
        for name, section in registered_sections().items():
            content = section.to_config(model) if section.to_config is not None else None
            if content is not None:
                manifest[name] = _json_safe(content, name)
        manifest["files"] = {
            rel: {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
            for rel in sorted(_relative_files(tmp))
        }
        manifest[DIGEST_FIELD] = manifest_digest(manifest)
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        if signing_key is not None:  # signed sign-off, in its own file (issue 14)
            from fallbackformer.export.signing import sign_bundle

            sign_bundle(tmp, signing_key, signer, manifest=manifest)  # type: ignore[arg-type]
        bundle_io.publish(tmp, path, manifest[DIGEST_FIELD])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def rung_file(name: str) -> str:
    """The weights file of fallback rung ``name``."""
    return f"rung_{name}.safetensors"


def _ladder_entry(model: "FallbackModel") -> dict[str, Any] | None:
    """The manifest's ``ladder`` field (``None`` for the single-student form): all data, no code."""
    rungs, cache = model.fallbacks, model.cache
    default = model.runtime.default
    if not rungs and not model.veto and cache is None and default is None:
        return None
    entries = []
    for rung in rungs:
        entry = _registry_entry(rung.module, f"rung {rung.name}")
        _check_rebuild(entry, _state_for_file(rung.module), f"rung {rung.name}")
        entries.append({"name": rung.name, **entry, "file": rung_file(rung.name)})
    return {"rungs": entries, "veto": list(model.veto), "veto_below": json_float(model.veto_below),
            "cache": None if cache is None else _json_safe(cache.config.to_dict(), "ladder.cache"),
            "default": None if default is None else _json_safe(default.to_dict(), "ladder.default")}


def _safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(dict(state), metadata=metadata)


def _relative_files(root: Path) -> Iterable[str]:
    for p in root.rglob("*"):
        if p.is_file() and p.name != MANIFEST:
            yield p.relative_to(root).as_posix()


def _write_onnx(model: "FallbackModel", folder: Path, example_input: torch.Tensor | None) -> dict[str, Any]:
    from fallbackformer.export.ort_backend import export_stage_graphs
    from fallbackformer.export.onnx_export import export_onnx

    model.eval()
    export_onnx(model, folder / COMBINED_ONNX, variant="where", example_input=example_input)
    stages = export_stage_graphs(model, folder, example_input=example_input)
    return {"combined": COMBINED_ONNX, "combined_variant": "where", **stages}
