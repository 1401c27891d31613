"""The bundle manifest's schema: parse ``manifest.json`` into dataclasses, refuse anything else.

Every field is checked for its type and range, and every refusal is a :class:`BundleError` that
names the bundle and the field (``models.student.registry_kwargs``, ``gates.exit_2``...), never a raw
``KeyError``/``TypeError``. Parsing builds nothing big: models are rebuilt later, on the meta device
first (see :mod:`fallbackformer.export.bundle`).

Optional sections. The top level is closed: a field this module does not know is refused, unless
an optional section of that name is registered. A section owns its content: it is stored by
``to_config(model)`` at save (when that returns something other than ``None``) and validated by
``from_config(content)`` at load, whose result lands in ``Manifest.sections[name]``::

    register_section(ManifestSection("router", from_config=Router.from_config,
                                     to_config=lambda model: model.router.to_config() if model.router else None))

An error raised by ``from_config`` (``ValueError``, ``TypeError``, ``KeyError``...) is re-raised as a
:class:`BundleError` naming the section.

Format versions: 1 (sizes in ``files`` optional), 2 (this module: ``files.*.bytes`` required, the
top level closed but for registered sections, ``input_spec.dtype`` a floating dtype). A version-1
manifest that records every file's size loads; one that does not is refused, naming
``python -m fallbackformer.export.migrate <bundle>``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fallbackformer.common.jsonsafe import parse_json_float

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.gates.gate import ConfidenceGate
    from fallbackformer.runtime.fallback_model import FallbackModel
    from fallbackformer.runtime.latency import LatencyProfile
    from fallbackformer.runtime.policy import Policy
    from fallbackformer.runtime.validation import InputSpec

FORMAT = "fallbackformer-bundle"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DIGEST_FIELD = "manifest_sha256"
MIGRATE_COMMAND = "python -m fallbackformer.export.migrate"
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
ROLES = ("primary", "student")
PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


class BundleError(ValueError):
    """A bundle cannot be saved or loaded; the message names the file or tensor and the fix."""


# ---------------------------------------------------------------------- optional sections


@dataclass(frozen=True)
class ManifestSection:
    """An optional top-level manifest section that owns its content.

    Attributes:
        name: the top-level key.
        from_config: validates the stored content and returns the parsed object (raises
            ``ValueError``/``TypeError``/``KeyError`` naming what is wrong).
        to_config: the content to store for a model at save, or ``None`` to store nothing.
    """

    name: str
    from_config: Callable[[Any], Any]
    to_config: Callable[["FallbackModel"], Any] | None = None


_SECTIONS: dict[str, ManifestSection] = {}


def register_section(section: ManifestSection) -> ManifestSection:
    """Register an optional manifest section (idempotent for the same name; see the module doc)."""
    if section.name in _CORE_FIELDS:
        raise ValueError(f"{section.name!r} is a core manifest field; choose another section name")
    _SECTIONS[section.name] = section
    return section


def unregister_section(name: str) -> ManifestSection | None:
    """Remove the optional section ``name`` (a plug-in unloaded, a test's stand-in); ``None`` if absent.

    Bundles that carry the section are refused at load from then on, as any unknown field is.
    """
    return _SECTIONS.pop(name, None)


def registered_sections() -> dict[str, ManifestSection]:
    """The registered optional sections by name."""
    return dict(_SECTIONS)


# ---------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle: its sha256 and its size (``None`` only in version-1 manifests)."""

    sha256: str
    bytes: int | None


@dataclass(frozen=True)
class ModelEntry:
    """How to rebuild one model: the registry name, its JSON kwargs, and its weight file."""

    registry_name: str
    registry_kwargs: dict[str, Any]
    file: str


@dataclass
class Manifest:
    """A parsed, schema-checked manifest (``raw`` keeps the JSON as read, for ``bundle_manifest``)."""

    format_version: int
    fallbackformer_version: str
    models: dict[str, ModelEntry]
    files: dict[str, FileEntry]
    paths: list[str]
    gates: dict[str, "ConfidenceGate"]
    policy: "Policy"
    input_spec: "InputSpec | None"
    class_names: list[str] | None
    latency_profile: "LatencyProfile | None"
    onnx: dict[str, Any] | None
    onnx_files: list[str]
    raw: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    router: dict[str, Any] | None = None
    #: the fallback ladder beyond the student (``None``: the single-student form), see :func:`_parse_ladder`
    ladder: dict[str, Any] | None = None


class _Ctx:
    """Where we are: the bundle's manifest path, for messages."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, fld: str, problem: str, fix: str = "") -> BundleError:
        fix = fix or "restore the original manifest, or re-save the bundle with ff.save"
        return BundleError(f"{self.where}: manifest field {fld} {problem}; {fix}")

    def get(self, obj: Mapping[str, Any], key: str, fld: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in obj:
            if optional:
                return None
            raise self.fail(fld, "is missing")
        value = obj[key]
        if value is None and optional:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            names = "/".join(t.__name__ for t in _as_tuple(types))
            raise self.fail(fld, f"is {_show(value)}, expected a {names}")
        return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


_CORE_FIELDS = (
    "format", "format_version", "fallbackformer_version", "torch_version", "models", "input_spec",
    "class_names", "policy", "paths", "gates", "served_by_codes", "latency_profile", "evaluation",
    "degradation", "onnx", "files", "router", "ladder", DIGEST_FIELD,
)


def parse_manifest(raw: Any, where: str) -> Manifest:
    """Check ``raw`` (the JSON of a digest-verified manifest) against the schema.

    Args:
        raw: the decoded JSON.
        where: the manifest's path, named in every message.

    Returns:
        The parsed :class:`Manifest`.

    Raises:
        BundleError: naming the bundle, the field and the fix.
    """
    ctx = _Ctx(where)
    if not isinstance(raw, dict):
        raise ctx.fail("(top level)", f"is {_show(raw)}, expected an object")
    version = raw.get("format_version")
    unknown = sorted(k for k in raw if k not in _CORE_FIELDS and k not in _SECTIONS)
    if unknown:
        raise ctx.fail(
            unknown[0], "is not a field this fallbackformer knows",
            f"known fields are {sorted(_CORE_FIELDS)} and the registered sections {sorted(_SECTIONS)}; "
            "register the section (fallbackformer.export.manifest.register_section) before ff.load",
        )
    ctx.get(raw, "fallbackformer_version", "fallbackformer_version", str)
    ctx.get(raw, "torch_version", "torch_version", str, optional=True)
    files = _parse_files(ctx, raw, version)
    models = _parse_models(ctx, raw, files)
    paths = ctx.get(raw, "paths", "paths", list)
    if not paths or not all(isinstance(p, str) and p for p in paths) or len(set(paths)) != len(paths):
        raise ctx.fail("paths", f"is {_show(paths)}, expected distinct non-empty path names")
    gates = _parse_gates(ctx, raw, paths)
    codes = ctx.get(raw, "served_by_codes", "served_by_codes", list, optional=True)
    if codes is not None and not all(isinstance(c, str) for c in codes):
        raise ctx.fail("served_by_codes", f"is {_show(codes)}, expected a list of path names")
    class_names = ctx.get(raw, "class_names", "class_names", list, optional=True)
    if class_names is not None and not all(isinstance(c, str) for c in class_names):
        raise ctx.fail("class_names", f"is {_show(class_names)}, expected a list of strings")
    for free in ("evaluation", "degradation"):
        ctx.get(raw, free, free, dict, optional=True)
    onnx = ctx.get(raw, "onnx", "onnx", dict, optional=True)
    graphs = onnx_files(onnx)
    for rel in graphs:
        if rel not in files:
            raise ctx.fail("onnx", f"names {rel}, but the files list has no sha256 for {rel}")
    router = ctx.get(raw, "router", "router", dict, optional=True)
    if router is not None and router.get("file") not in files:
        raise ctx.fail("router.file", f"is {_show(router.get('file'))}, which the files list does not hold",
                       "re-save the bundle with ff.save")
    ladder = _parse_ladder(ctx, raw, files, paths)
    sections = {}
    for name, section in _SECTIONS.items():
        if raw.get(name) is not None:
            sections[name] = _call(ctx, name, section.from_config, raw[name])
    return Manifest(
        format_version=version,
        fallbackformer_version=raw["fallbackformer_version"],
        models=models,
        files=files,
        paths=list(paths),
        gates=gates,
        policy=_parse_policy(ctx, raw),
        input_spec=_parse_input_spec(ctx, raw),
        class_names=class_names,
        latency_profile=_parse_profile(ctx, raw),
        onnx=onnx,
        onnx_files=graphs,
        raw=raw,
        sections=sections,
        router=router,
        ladder=ladder,
    )


def _parse_ladder(ctx: _Ctx, raw: Mapping[str, Any], files: Mapping[str, FileEntry],
                  paths: list[str]) -> dict[str, Any] | None:
    """The optional ``ladder`` field: rungs after the student (a registry entry and a weights file each;
    their gates sit in ``gates`` under their names), the veto and the confidence below which it reviews
    answers, the cache's config, the typed default.

    ``{"rungs": [{"name", "registry_name", "registry_kwargs", "file"}], "veto": [names], "veto_below":
    number | "inf" (absent: "inf"), "cache": CacheConfig.to_dict() | null, "default": SafeDefault.to_dict()
    | null}``; all data, no code.
    """
    section = ctx.get(raw, "ladder", "ladder", dict, optional=True)
    if section is None:
        return None
    from fallbackformer.rungs.cache import CacheConfig
    from fallbackformer.rungs.defaults import default_from_dict

    unknown = sorted(set(section) - {"rungs", "veto", "veto_below", "cache", "default"})
    if unknown:
        raise ctx.fail(f"ladder.{unknown[0]}", "is not a ladder field",
                       "the ladder holds rungs, veto, veto_below, cache, default")
    rungs = []
    for i, rung in enumerate(ctx.get(section, "rungs", "ladder.rungs", list)):
        fld = f"ladder.rungs[{i}]"
        if not isinstance(rung, dict):
            raise ctx.fail(fld, f"is {_show(rung)}, expected an object")
        name = ctx.get(rung, "name", f"{fld}.name", str)
        filename = ctx.get(rung, "file", f"{fld}.file", str)
        if filename not in files:
            raise ctx.fail(f"{fld}.file", f"names {filename!r}, but the files list has no sha256 for {filename}")
        if name not in paths:
            raise ctx.fail(f"{fld}.name", f"is {name!r}, which paths {paths} does not hold")
        rungs.append((name, ModelEntry(ctx.get(rung, "registry_name", f"{fld}.registry_name", str),
                                       ctx.get(rung, "registry_kwargs", f"{fld}.registry_kwargs", dict), filename)))
    veto = ctx.get(section, "veto", "ladder.veto", list)
    if not all(isinstance(v, str) for v in veto):
        raise ctx.fail("ladder.veto", f"is {_show(veto)}, expected a list of rung names")
    below = ctx.get(section, "veto_below", "ladder.veto_below", (int, float, str), optional=True)
    below = math.inf if below is None else _call(ctx, "ladder.veto_below", parse_json_float, below)
    if not below > 0:
        raise ctx.fail("ladder.veto_below", f"is {_show(below)}, expected a confidence level > 0 or \"inf\"")
    cache = ctx.get(section, "cache", "ladder.cache", dict, optional=True)
    default = ctx.get(section, "default", "ladder.default", dict, optional=True)
    return {"rungs": rungs, "veto": list(veto), "veto_below": below,
            "cache": None if cache is None else _call(ctx, "ladder.cache", CacheConfig.from_dict, cache),
            "default": None if default is None else _call(ctx, "ladder.default", default_from_dict, default)}


def _call(ctx: _Ctx, fld: str, fn: Callable[[Any], Any], content: Any) -> Any:
    try:
        return fn(content)
    except BundleError:
        raise
    except PARSE_ERRORS as exc:
        raise ctx.fail(fld, f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def _parse_files(ctx: _Ctx, raw: Mapping[str, Any], version: int) -> dict[str, FileEntry]:
    files = ctx.get(raw, "files", "files", dict)
    if not files:
        raise ctx.fail("files", "lists no files")
    out = {}
    for rel, info in files.items():
        fld = f"files.{rel}"
        pure = PurePosixPath(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or rel == MANIFEST:
            raise ctx.fail("files", f"names {rel!r}, outside the bundle folder (or the manifest itself)", "refusing it")
        if not isinstance(info, dict):
            raise ctx.fail(fld, f"is {_show(info)}, expected {{'sha256': ..., 'bytes': ...}}")
        digest = ctx.get(info, "sha256", f"{fld}.sha256", str)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ctx.fail(f"{fld}.sha256", f"is {digest[:70]!r}, expected 64 lowercase hex digits")
        size = ctx.get(info, "bytes", f"{fld}.bytes", int, optional=version == 1)
        if size is not None and size < 0:
            raise ctx.fail(f"{fld}.bytes", f"is {size}, expected a size >= 0")
        if size is None:
            raise ctx.fail(
                f"{fld}.bytes", "is missing (a version-1 bundle without sizes)",
                f"migrate the bundle: {MIGRATE_COMMAND} <bundle>",
            )
        out[rel] = FileEntry(digest, size)
    return out


def _parse_models(ctx: _Ctx, raw: Mapping[str, Any], files: Mapping[str, FileEntry]) -> dict[str, ModelEntry]:
    models = ctx.get(raw, "models", "models", dict)
    out = {}
    for role in ROLES:
        entry = ctx.get(models, role, f"models.{role}", dict)
        name = ctx.get(entry, "registry_name", f"models.{role}.registry_name", str)
        kwargs = ctx.get(entry, "registry_kwargs", f"models.{role}.registry_kwargs", dict)
        filename = ctx.get(entry, "file", f"models.{role}.file", str)
        if filename not in files:
            raise ctx.fail(f"models.{role}.file", f"names {filename!r}, but the files list has no sha256 for {filename}")
        out[role] = ModelEntry(name, kwargs, filename)
    extra = sorted(set(models) - set(ROLES))
    if extra:
        raise ctx.fail(f"models.{extra[0]}", f"is not a role; a bundle holds {list(ROLES)}")
    return out


def _parse_gates(ctx: _Ctx, raw: Mapping[str, Any], paths: list[str]) -> dict[str, "ConfidenceGate"]:
    from fallbackformer.gates.gate import ConfidenceGate

    gates = ctx.get(raw, "gates", "gates", dict)
    if list(gates) != list(paths) and sorted(gates) != sorted(paths):
        raise ctx.fail("gates", f"has gates {sorted(gates)} but paths lists {paths}; each path needs one gate")
    out = {}
    for name in paths:
        cfg = ctx.get(gates, name, f"gates.{name}", dict)
        gate = _call(ctx, f"gates.{name}", ConfidenceGate.from_config, cfg)
        t = float(gate.temperature) if hasattr(gate, "temperature") else 1.0
        if not (math.isfinite(t) and t > 0):
            raise ctx.fail(f"gates.{name}.temperature", f"is {t}, expected a finite temperature > 0")
        out[name] = gate
    return out


def _parse_policy(ctx: _Ctx, raw: Mapping[str, Any]) -> "Policy":
    from fallbackformer.runtime.policy import Policy

    data = ctx.get(raw, "policy", "policy", dict)
    decoded = {k: (parse_json_float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v) for k, v in data.items()}
    return _call(ctx, "policy", Policy.from_dict, decoded)


def _parse_input_spec(ctx: _Ctx, raw: Mapping[str, Any]) -> "InputSpec | None":
    from fallbackformer.runtime.validation import InputSpec

    spec = ctx.get(raw, "input_spec", "input_spec", dict, optional=True)
    if spec is None:
        return None
    shape = ctx.get(spec, "shape", "input_spec.shape", list)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 1 << 20 for s in shape):
        raise ctx.fail("input_spec.shape", f"is {_show(shape)}, expected a list of positive sizes")
    dtype = ctx.get(spec, "dtype", "input_spec.dtype", str, optional=True)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ctx.fail("input_spec.dtype", f"is {dtype!r}, expected one of {list(FLOAT_DTYPES)}")
    vr = ctx.get(spec, "value_range", "input_spec.value_range", list, optional=True)
    if vr is not None and (
        len(vr) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vr) or not vr[0] <= vr[1]
    ):
        raise ctx.fail("input_spec.value_range", f"is {_show(vr)}, expected [low, high] numbers with low <= high")
    ctx.get(spec, "description", "input_spec.description", str, optional=True)
    extra = sorted(set(spec) - {"shape", "dtype", "value_range", "description"})
    if extra:
        raise ctx.fail(f"input_spec.{extra[0]}", "is not an InputSpec field")
    return _call(ctx, "input_spec", InputSpec.from_dict, spec)


def _parse_profile(ctx: _Ctx, raw: Mapping[str, Any]) -> "LatencyProfile | None":
    from fallbackformer.runtime.latency import LatencyProfile

    data = ctx.get(raw, "latency_profile", "latency_profile", dict, optional=True)
    if data is None:
        return None
    return _call(ctx, "latency_profile", LatencyProfile.from_dict, data)


def onnx_files(section: Any) -> list[str]:
    """Every file path named in the manifest's ``onnx`` section (strings ending in ``.onnx``)."""
    if isinstance(section, str):
        return [section] if section.endswith(".onnx") else []
    if isinstance(section, Mapping):
        return [f for v in section.values() for f in onnx_files(v)]
    if isinstance(section, (list, tuple)):
        return [f for v in section for f in onnx_files(v)]
    return []




# ---------------------------------------------------------------------- decoding and the digest


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII, no NaN/inf: the form the manifest digest is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def decode_manifest(data: bytes, mpath: Path) -> dict[str, Any]:
    """Decode, check the format, version and digest of a manifest's bytes; the schema comes next."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise BundleError(f"{mpath} nests too deeply to be a manifest; restore it from the original bundle") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({str(exc)[:200]}); restore it from the original bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{mpath} is not a fallbackformer bundle manifest (format {found!r:.80}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"{mpath}: unknown bundle format_version {version!r:.80}; this fallbackformer reads "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}. Load it with the fallbackformer version that wrote it "
            f"({str(manifest.get('fallbackformer_version', 'unknown'))[:40]}) or re-save it with this one"
        )
    recorded = manifest.get(DIGEST_FIELD)
    try:
        actual = manifest_digest(manifest)
    except (ValueError, TypeError, RecursionError):
        actual = None
    if recorded is None or recorded != actual:
        raise BundleError(
            f"{mpath} was edited after it was saved: its content digest {actual} does not match the "
            f"recorded {DIGEST_FIELD} {str(recorded)[:80]}. A changed threshold, temperature, policy or file "
            "list is refused like a changed weight: restore the original manifest, or re-save the "
            "bundle with ff.save(model, path) after making the change in code"
        )
    return manifest


