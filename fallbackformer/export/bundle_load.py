"""Loading a bundle: the manifest and every file verified, the models rebuilt, the runtime made.

:func:`load` is ``ff.load``; :func:`read_manifest` and :func:`verify_files` check a bundle without
building anything (``scripts/signoff.py``, Triton). The layout and what is verified are described in
:mod:`fallbackformer.export.bundle`, which re-exports these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from fallbackformer.export import bundle_io
from fallbackformer.export.manifest import (
    DIGEST_FIELD,
    MANIFEST,
    PARSE_ERRORS,
    BundleError,
    Manifest,
    ModelEntry,
    decode_manifest,
    onnx_files,
    parse_manifest,
)

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.clock import Clock
    from fallbackformer.runtime.events import EventSink
    from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = ["BACKENDS", "compare_state", "load", "load_weights", "read_manifest", "verify_files"]

BACKENDS = ("torch", "onnxruntime")


def compare_state(
    expected: Mapping[str, torch.Tensor],
    got: Mapping[str, tuple[int, ...]],
    role: str,
    filename: str,
    entry: Mapping[str, Any],
    *,
    saving: bool = False,
) -> None:
    """Every tensor of ``expected`` (the rebuilt model) in ``got`` (shapes from a file) with its shape.

    Raises:
        BundleError: naming the first missing, unexpected or misshapen tensor and the fix (``saving``:
            the fix of a model changed after it was built; else that of weights and manifest that disagree).
    """
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
        if tuple(got[key]) != tuple(ref.shape):
            raise BundleError(
                f"tensor {key!r} in {filename} has shape {tuple(got[key])} but the manifest's "
                f"{role} {what} expects {tuple(ref.shape)}; {fix}"
            )


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and verify a bundle's manifest (format version, digest, schema); files are not read.

    Raises:
        BundleError: naming the problem and the fix.
    """
    path = bundle_io.bundle_folder(path)
    root = bundle_io.resolve(path)
    try:
        data = bundle_io.read_checked(root, MANIFEST, None, path, limit=bundle_io.MAX_MANIFEST_BYTES)
    except bundle_io.Vanished:
        raise BundleError(
            f"{path / MANIFEST} is missing: {path} is not a bundle (or it is incomplete); re-save it with ff.save"
        ) from None
    raw = decode_manifest(data, path / MANIFEST)
    parse_manifest(raw, str(path / MANIFEST))
    return raw


def verify_files(path: str | Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Check every file a (raw) manifest lists against its size and sha256; return ``{file: sha256}``.

    Raises:
        BundleError: naming the missing or changed file and the fix.
    """
    path = bundle_io.bundle_folder(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path / MANIFEST} lists no files; re-save the bundle with ff.save")
    needed = [m["file"] for m in manifest["models"].values()] + onnx_files(manifest.get("onnx"))
    for name in needed:
        if name not in files:
            raise BundleError(f"{path / MANIFEST} has no sha256 for {name}; re-save the bundle with ff.save")
    root = bundle_io.resolve(path)
    hashes = {}
    for rel, info in files.items():
        try:
            _, hashes[rel] = bundle_io.read_verified(root, rel, info["sha256"], info.get("bytes"), path)
        except bundle_io.Vanished:
            raise BundleError(f"missing file {rel} in bundle {path}; copy the whole bundle folder again") from None
    return hashes


def _build_model(entry: ModelEntry, role: str, path: Path) -> nn.Module:
    from fallbackformer.models.registry import create_model

    fld = f"{path / MANIFEST}: manifest field models.{role}"
    try:
        return create_model(entry.registry_name, **entry.registry_kwargs)
    except KeyError as exc:
        raise BundleError(
            f"the bundle's {role} is registry model {entry.registry_name!r:.80}, which is not registered "
            f"here ({str(exc.args[0] if exc.args else exc)[:200]}); import the module that registers it with "
            "fallbackformer.register_model before ff.load"
        ) from None
    except (*PARSE_ERRORS, RuntimeError, NotImplementedError) as exc:
        raise BundleError(
            f"{fld}.registry_kwargs {entry.registry_kwargs!r:.120} cannot build {entry.registry_name!r:.80} "
            f"({type(exc).__name__}: {str(exc)[:200]}); restore the original manifest, or re-save the bundle"
        ) from None


def load_weights(path: Path, manifest: Manifest, role: str, blob: bytes) -> nn.Module:
    """Rebuild ``role`` from the bytes already read and hashed: shapes checked on meta, then built."""
    return load_entry(path, manifest.models[role], role, blob)


def load_entry(path: Path, entry: ModelEntry, role: str, blob: bytes) -> nn.Module:
    """Rebuild the model of a manifest ``entry`` from its weights' bytes (already read and hashed)."""
    from safetensors.torch import load as load_bytes

    entry_dict = {"registry_name": entry.registry_name, "registry_kwargs": entry.registry_kwargs}
    shapes = bundle_io.safetensors_shapes(blob, entry.file, path)
    with torch.device("meta"):
        meta = _build_model(entry, role, path)
    expected = meta.state_dict()
    need = sum(t.numel() * t.element_size() for t in expected.values())
    if need > len(blob):
        raise BundleError(
            f"{path / MANIFEST}: manifest field models.{role}.registry_kwargs {entry.registry_kwargs!r:.120} "
            f"asks for {need} bytes of tensors but {entry.file} holds {len(blob)} bytes; refused before "
            "allocating. Restore the original manifest, or re-save the bundle with ff.save"
        )
    compare_state(expected, shapes, role, entry.file, entry_dict)
    try:
        state = load_bytes(blob)
    except Exception as exc:  # safetensors' own error type; the bytes are hashed, so this is a bad save
        raise BundleError(f"{entry.file} in bundle {path} cannot be read as safetensors ({exc}); re-save the bundle") from None
    model = _build_model(entry, role, path)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise BundleError(f"{entry.file} in bundle {path} does not fit the {role} ({str(exc)[:200]}); re-save the bundle") from None
    return model.eval()


def load(
    path: str | Path,
    backend: str = "torch",
    *,
    clock: "Clock | None" = None,
    sinks: Iterable["EventSink"] = (),
    ort_threads: int | None = None,
    trusted_keys: Iterable[Any] | None = None,
    warm_up: bool = True,
) -> "FallbackModel":
    """Load a bundle: verify the manifest digest and every file's size and sha256, rebuild, return the model.

    Nothing is unpickled: weights are safetensors, everything else is JSON. Each file is read once
    and the bytes hashed are the bytes deserialized.

    Args:
        path: the bundle (a folder or the symlink ``ff.save`` made), or its ``manifest.json``.
        backend: ``"torch"``, or ``"onnxruntime"`` to run each stage, head and the student as an
            onnxruntime session under the same runtime (the bundle must have been saved with
            ``onnx=True``).
        clock: the runtime's clock (default: monotonic).
        sinks: event sinks for the runtime.
        ort_threads: intra-op threads of each onnxruntime session (``backend="onnxruntime"``;
            default: onnxruntime's choice).
        trusted_keys: Ed25519 public keys (objects, PEM or PEM paths): refuse the bundle unless one
            of them signed this manifest (``signature.json``). ``None``: no signature check.
        warm_up: warm the runtime from the input spec (``FallbackModel.warm_start``: workers started,
            a fraction of a second of timing, no compilation) so that the first call keeps the budget.

    A bundle outside its own ``degradation`` bounds is refused (or, with ``on_breach: signal``, loaded
    with a :class:`~fallbackformer.export.bounds.BoundsWarning`; ``model.bounds_breaches`` lists them).

    Returns:
        A :class:`FallbackModel` in eval mode; ``model.model_hashes`` holds the files' sha256 and
        ``model.profile`` the saved latency profile as priors (call ``model.warm_up(x)`` on this
        machine before serving: its live timings replace them). ``model.bundle_manifest`` is the
        manifest as read; ``model.bundle_sections`` the parsed optional sections.

    Raises:
        BundleError: for anything but a bundle that loads (a missing, changed, oversized or special
            file, an edited manifest or one outside the schema, an unknown format version, weights
            that do not fit the manifest's models); the message names the culprit and the fix.
    """
    from fallbackformer.runtime.fallback_model import FallbackModel

    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    path = bundle_io.bundle_folder(path)
    root, manifest, blobs, hashes = bundle_io.read_version(path)
    if trusted_keys is not None:  # signed sign-off (issue 14)
        from fallbackformer.export.signing import verify_bundle_signature

        verify_bundle_signature(root, manifest.raw, trusted_keys)
    from fallbackformer.export.bounds import enforce_bounds

    breaches = enforce_bounds(manifest.raw, f"ff.load of {path}")
    router = _load_router(path, manifest, blobs)
    if backend == "onnxruntime":
        from fallbackformer.export.ort_backend import load_ort_modules

        # (onnxruntime opens the graphs by path: from the immutable version folder just verified)
        primary, student = load_ort_modules(root, manifest.raw, threads=ort_threads)
    else:
        primary = load_weights(path, manifest, "primary", blobs[manifest.models["primary"].file])
        student = load_weights(path, manifest, "student", blobs[manifest.models["student"].file])
    ladder = _load_ladder(path, manifest, blobs)  # (takes the rungs' gates out of manifest.gates)
    try:
        model = FallbackModel(
            primary,
            student,
            manifest.gates,
            policy=manifest.policy,
            input_spec=manifest.input_spec,
            clock=clock,
            sinks=sinks,
            class_names=manifest.class_names,
            profile=manifest.latency_profile,
            router=router,
            **ladder,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(
            f"{path / MANIFEST}: the manifest's gates, policy and class names do not make a model "
            f"({type(exc).__name__}: {str(exc)[:300]}); restore the original manifest, or re-save the bundle"
        ) from None
    if list(model.path_names) != manifest.paths:
        raise BundleError(
            f"{path / MANIFEST}: manifest field paths {manifest.paths} differ from the rebuilt model's "
            f"{model.path_names}; re-save the bundle with ff.save"
        )
    rung_entries = manifest.ladder["rungs"] if manifest.ladder is not None else []
    model.model_hashes = {role: hashes[entry.file] for role, entry in manifest.models.items()} | {
        name: hashes[entry.file] for name, entry in rung_entries} | {"manifest": manifest.raw[DIGEST_FIELD]}
    if model.cache is not None:  # its answers belong to this bundle: another bundle's never serve here
        model.cache.bind(manifest.raw[DIGEST_FIELD])
    model.bundle_manifest = manifest.raw
    model.bundle_sections = manifest.sections
    model.bounds_breaches = breaches
    model.warm_report = model.eval().warm_start() if warm_up else None
    return model


def _load_ladder(path: Path, manifest: Manifest, blobs: Mapping[str, bytes]) -> dict[str, Any]:
    """The ``FallbackModel`` arguments of the manifest's ladder: rungs (weights from their files, gates from
    ``gates``), veto and its level, cache config, typed default; nothing for the single-student form."""
    ladder = manifest.ladder
    if ladder is None:
        return {}
    from fallbackformer.rungs.ladder import Rung

    rungs = [Rung(name, load_entry(path, entry, f"rung {name}", blobs[entry.file]), manifest.gates.pop(name, None))
             for name, entry in ladder["rungs"]]
    return {"fallbacks": rungs, "veto": ladder["veto"], "veto_below": ladder["veto_below"], "cache": ladder["cache"],
            "default": ladder["default"]}


def _load_router(path: Path, manifest: Manifest, blobs: Mapping[str, bytes]) -> Any:
    """The manifest's router (``None`` when it has none), from its config and the bytes already verified."""
    section = manifest.router
    if section is None:
        return None
    from safetensors.torch import load as load_bytes

    from fallbackformer.gates.router import Router

    try:
        return Router.from_config(section, load_bytes(blobs[section["file"]])).eval()
    except Exception as exc:  # a config the router refuses, or weights that do not fit it
        raise BundleError(f"{path / MANIFEST}: manifest field router cannot be rebuilt ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); restore the original manifest, or re-save the bundle with ff.save") from None
