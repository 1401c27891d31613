"""Bundles: a :class:`FallbackModel` saved as a verified folder, loaded without unpickling.

Layout (``FORMAT_VERSION`` 1)::

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

>>> path = save(model, "checkpoints/digits")      # doctest: +SKIP
>>> model = load("checkpoints/digits")            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.clock import Clock
    from fallbackformer.runtime.events import EventSink
    from fallbackformer.runtime.fallback_model import FallbackModel

FORMAT = "fallbackformer-bundle"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
DIGEST_FIELD = "manifest_sha256"
MODEL_FILES = {"primary": "primary.safetensors", "student": "student.safetensors"}
ROUTER_FILE = "router.safetensors"
BACKENDS = ("torch", "onnxruntime")
COMBINED_ONNX = "model.onnx"


class BundleError(ValueError):
    """A bundle cannot be saved or loaded; the message names the file or tensor and the fix."""


# ---------------------------------------------------------------------- hashing and JSON


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII, no NaN/inf: the form the manifest digest is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


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


def _policy_from_json(data: Mapping[str, Any]):
    from fallbackformer.runtime.policy import Policy

    decoded = {
        k: (float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v) for k, v in data.items()
    }
    return Policy.from_dict(decoded)


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
    _compare_state(rebuilt.state_dict(), state, role, f"{role}.safetensors", entry, saving=True)


def _compare_state(
    expected: Mapping[str, torch.Tensor],
    got: Mapping[str, torch.Tensor],
    role: str,
    filename: str,
    entry: Mapping[str, Any],
    *,
    saving: bool = False,
) -> None:
    what = f"{entry['registry_name']}(**{entry['registry_kwargs']})"
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if saving:
        fix = (
            f"the {role} was changed after create_model built it; rebuild it with create_model "
            "and the arguments that give this architecture"
        )
    else:
        fix = (
            "the weights and the manifest's registry_kwargs disagree (or the builder changed): "
            "re-save the bundle with ff.save from the model that produced these weights"
        )
    if missing:
        raise BundleError(
            f"{filename} lacks tensor {missing[0]!r} ({len(missing)} missing) that the manifest's "
            f"{role} {what} has; {fix}"
        )
    if unexpected:
        raise BundleError(
            f"{filename} has tensor {unexpected[0]!r} ({len(unexpected)} unexpected) that the "
            f"manifest's {role} {what} does not have; {fix}"
        )
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            raise BundleError(
                f"tensor {key!r} in {filename} has shape {tuple(got[key].shape)} but the manifest's "
                f"{role} {what} expects {tuple(ref.shape)}; {fix}"
            )


def _state_for_file(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses shared storage; contiguous CPU tensors only.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _check_bundle_target(path: Path) -> None:
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
    """Save a model as a bundle folder (replacing an existing bundle there atomically).

    Args:
        model: the model; its primary and student must come from ``create_model``.
        path: the bundle folder.
        evaluation: the evaluation summary to record (JSON-able: numbers, strings, lists, dicts).
        degradation: the acceptable degradation and the sign-off (free, JSON-able).
        onnx: also write the combined graph ``model.onnx`` and one graph per stage, head, input
            transform and the student (``onnx/*.onnx``), so that
            ``load(path, backend="onnxruntime")`` works. Needs onnx and onnxscript; adds seconds.
        example_input: a raw batch for tracing when ``onnx`` is set (default: from the input spec).
        signing_key: an Ed25519 private key (object, PEM or PEM path): sign ``manifest_sha256`` into
            ``signature.json`` (:mod:`fallbackformer.export.signing`); needs ``signer``.
        signer: the name recorded with the signature.

    The ``degradation`` limits are checked against ``evaluation`` (:mod:`fallbackformer.export.bounds`):
    a model outside its own bounds is refused unless ``on_breach`` is ``"signal"``.

    The manifest records ``model.profile`` (per-stage p50/p99 by batch bucket; warm the model up
    first to have one): a prior for the loading machine, not a promise about it.

    Returns:
        The bundle folder.

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
    from fallbackformer.export.bounds import enforce_bounds  # bounds as code (issue 14)

    enforce_bounds(manifest, f"ff.save to {path}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        from safetensors.torch import save_file

        for role, filename in MODEL_FILES.items():
            save_file(states[role], str(tmp / filename), metadata={"role": role, "format": FORMAT})
        if router is not None:
            save_file({k: v.detach().contiguous() for k, v in router.state_dict().items()}, str(tmp / ROUTER_FILE),
                      metadata={"role": "router", "format": FORMAT})
        if onnx:
            manifest["onnx"] = _write_onnx(model, tmp, example_input)
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
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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


# ---------------------------------------------------------------------- load


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and verify a bundle's manifest (format version and digest); files are not checked.

    Raises:
        BundleError: naming the problem and the fix.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle folder {path} does not exist; save one with ff.save(model, '{path}')")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(
            f"{mpath} is missing: {path} is not a bundle (or it is incomplete); re-save it with ff.save"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); restore it from the original bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(
            f"{mpath} is not a fallbackformer bundle manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT!r})"
        )
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"{mpath}: unknown bundle format_version {version!r}; this fallbackformer reads "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}. Load it with the fallbackformer version that wrote it "
            f"({manifest.get('fallbackformer_version', 'unknown')}) or re-save it with this one"
        )
    recorded = manifest.get(DIGEST_FIELD)
    try:
        actual = manifest_digest(manifest)
    except ValueError:
        actual = None
    if recorded is None or recorded != actual:
        raise BundleError(
            f"{mpath} was edited after it was saved: its content digest {actual} does not match the "
            f"recorded {DIGEST_FIELD} {recorded}. A changed threshold, temperature, policy or file "
            "list is refused like a changed weight: restore the original manifest, or re-save the "
            "bundle with ff.save(model, path) after making the change in code"
        )
    return manifest


def _onnx_files(section: Any) -> list[str]:
    """Every file path named in the manifest's ``onnx`` section (strings at any depth, but the variant)."""
    if isinstance(section, str):
        return [section] if section.endswith(".onnx") else []
    if isinstance(section, Mapping):
        return [f for v in section.values() for f in _onnx_files(v)]
    if isinstance(section, (list, tuple)):
        return [f for v in section for f in _onnx_files(v)]
    return []


def verify_files(path: str | Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Check every file the manifest lists against its sha256; return ``{file: sha256}``.

    Raises:
        BundleError: naming the missing or changed file and the fix.
    """
    path = Path(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path / MANIFEST} lists no files; re-save the bundle with ff.save")
    # Every file the manifest makes load must be hashed: the weights and the ONNX graphs it names.
    needed = [m["file"] for m in manifest["models"].values()] + _onnx_files(manifest.get("onnx"))
    for name in needed:
        if name not in files:
            raise BundleError(f"{path / MANIFEST} has no sha256 for {name}; re-save the bundle with ff.save")
    hashes = {}
    for rel, info in files.items():
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            raise BundleError(f"{path / MANIFEST} lists {rel!r}, outside the bundle folder; refusing it")
        fpath = path / pure
        if not fpath.is_file():
            raise BundleError(
                f"missing file {rel} in bundle {path}: the manifest lists it with sha256 "
                f"{info['sha256'][:16]}...; copy the whole bundle folder again"
            )
        digest = sha256_file(fpath)
        if digest != info["sha256"]:
            raise BundleError(
                f"file {rel} in bundle {path} has sha256 {digest[:16]}... but the manifest records "
                f"{info['sha256'][:16]}...: it was changed or corrupted after saving. Restore it from "
                "the original bundle, or re-save the bundle with ff.save"
            )
        hashes[rel] = digest
    return hashes


def load_weights(path: str | Path, manifest: Mapping[str, Any], role: str) -> nn.Module:
    """Rebuild ``role`` ("primary" or "student") through the registry and load its safetensors."""
    from safetensors.torch import load_file

    from fallbackformer.models.registry import create_model

    entry = manifest["models"][role]
    try:
        model = create_model(entry["registry_name"], **entry["registry_kwargs"])
    except KeyError as exc:
        raise BundleError(
            f"the bundle's {role} is registry model {entry['registry_name']!r}, which is not registered "
            f"here ({exc.args[0] if exc.args else exc}); import the module that registers it with "
            "fallbackformer.register_model before ff.load"
        ) from None
    filename = entry["file"]
    state = load_file(str(Path(path) / filename))
    _compare_state(model.state_dict(), state, role, filename, entry)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_router(path: Path, manifest: Mapping[str, Any]) -> Any:
    """The manifest's router (``None`` when it has none), rebuilt from its config and weights file."""
    section = manifest.get("router")
    if section is None:
        return None
    from safetensors.torch import load_file

    from fallbackformer.gates.router import Router

    try:
        state = load_file(str(path / section["file"]))
        return Router.from_config(section, state).eval()
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{path / MANIFEST}: the router section cannot be rebuilt ({exc}); re-save the "
                          "bundle with ff.save") from None


def load(
    path: str | Path,
    backend: str = "torch",
    *,
    clock: "Clock | None" = None,
    sinks: Iterable["EventSink"] = (),
    ort_threads: int | None = None,
    trusted_keys: Iterable[Any] | None = None,
) -> "FallbackModel":
    """Load a bundle: verify the manifest digest and every file's sha256, rebuild, return the model.

    Nothing is unpickled: weights are safetensors, everything else is JSON.

    Args:
        path: the bundle folder.
        backend: ``"torch"``, or ``"onnxruntime"`` to run each stage, head and the student as an
            onnxruntime session under the same runtime (the bundle must have been saved with
            ``onnx=True``).
        clock: the runtime's clock (default: monotonic).
        sinks: event sinks for the runtime.
        ort_threads: intra-op threads of each onnxruntime session (``backend="onnxruntime"``;
            default: onnxruntime's choice).
        trusted_keys: Ed25519 public keys (objects, PEM or PEM paths): refuse the bundle unless one
            of them signed this manifest (``signature.json``). ``None``: no signature check.

    A bundle outside its own ``degradation`` bounds is refused (or, with ``on_breach: signal``, loaded
    with a :class:`~fallbackformer.export.bounds.BoundsWarning`; ``model.bounds_breaches`` lists them).

    Returns:
        A :class:`FallbackModel` in eval mode; ``model.model_hashes`` holds the files' sha256 and
        ``model.profile`` the saved latency profile as priors (call ``model.warm_up(x)`` on this
        machine before serving: its live timings replace them).

    Raises:
        BundleError: for a missing file, a changed file, an edited manifest, an unknown format
            version or weights that do not fit the manifest's models; the message names the
            culprit and the fix.
    """
    from fallbackformer.gates.gate import ConfidenceGate
    from fallbackformer.runtime.fallback_model import FallbackModel
    from fallbackformer.runtime.latency import LatencyProfile
    from fallbackformer.runtime.validation import InputSpec

    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    path = Path(path)
    manifest = read_manifest(path)
    if trusted_keys is not None:  # signed sign-off (issue 14)
        from fallbackformer.export.signing import verify_bundle_signature

        verify_bundle_signature(path, manifest, trusted_keys)
    from fallbackformer.export.bounds import enforce_bounds

    breaches = enforce_bounds(manifest, f"ff.load of {path}")
    hashes = verify_files(path, manifest)
    if backend == "onnxruntime":
        from fallbackformer.export.ort_backend import load_ort_modules

        primary, student = load_ort_modules(path, manifest, threads=ort_threads)
    else:
        primary = load_weights(path, manifest, "primary")
        student = load_weights(path, manifest, "student")
    gates = {name: ConfidenceGate.from_config(cfg) for name, cfg in manifest["gates"].items()}
    router = _load_router(path, manifest)
    spec = manifest.get("input_spec")
    saved_profile = manifest.get("latency_profile")
    try:  # the saving machine's timings, as priors (see the module docstring); absent: a fresh profile
        profile = LatencyProfile.from_dict(saved_profile) if saved_profile is not None else None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BundleError(
            f"{path / MANIFEST} has a latency_profile this fallbackformer cannot read ({exc}); load the "
            "bundle with the fallbackformer version that wrote it, or re-save it with this one"
        ) from None
    model = FallbackModel(
        primary,
        student,
        gates,
        policy=_policy_from_json(manifest["policy"]),
        input_spec=InputSpec.from_dict(spec) if spec is not None else None,
        clock=clock,
        sinks=sinks,
        class_names=manifest.get("class_names"),
        profile=profile,
        router=router,
    )
    if list(model.path_names) != list(manifest["paths"]):
        raise BundleError(
            f"the rebuilt model's paths {model.path_names} differ from the manifest's {manifest['paths']}; "
            "re-save the bundle with ff.save"
        )
    model.model_hashes = {
        role: hashes[entry["file"]] for role, entry in manifest["models"].items()
    } | {"manifest": manifest[DIGEST_FIELD]}
    model.bundle_manifest = manifest
    model.bounds_breaches = breaches
    return model.eval()
