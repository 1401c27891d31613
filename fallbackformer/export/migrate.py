"""Migrate a bundle to the current format version: ``python -m fallbackformer.export.migrate <bundle>``.

Version 1 -> 2: every file's size is recorded in ``files`` (version 2 refuses a file whose size
differs before hashing it). Every file is verified against its version-1 sha256 first; the weights
are not touched, so the file hashes stay the same and only the manifest digest changes. The new
version is published atomically like a save (:func:`fallbackformer.export.bundle_io.publish`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fallbackformer.export import bundle_io
from fallbackformer.export.manifest import (
    DIGEST_FIELD,
    FORMAT_VERSION,
    MANIFEST,
    BundleError,
    decode_manifest,
    manifest_digest,
    parse_manifest,
)


def migrate(path: str | Path) -> Path:
    """Rewrite the bundle at ``path`` in the current format version (a no-op if it already is).

    Args:
        path: the bundle (folder, symlink or its ``manifest.json``).

    Returns:
        The bundle path.

    Raises:
        BundleError: the bundle does not verify as it is (a changed file, an edited manifest).
    """
    path = bundle_io.bundle_folder(path)
    root = bundle_io.resolve(path)
    data = bundle_io.read_checked(root, MANIFEST, None, path, limit=bundle_io.MAX_MANIFEST_BYTES)
    raw = decode_manifest(data, path / MANIFEST)
    if raw["format_version"] == FORMAT_VERSION:
        return path
    files = raw.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
        raise BundleError(f"{path / MANIFEST}: manifest field files is not a list of hashed files; re-save the bundle")
    tmp = bundle_io.temp_folder(path.parent, path.name)
    try:
        for rel, info in files.items():
            blob, _ = bundle_io.read_verified(root, rel, info["sha256"], info.get("bytes"), path)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(blob)
            info["bytes"] = len(blob)
        raw["format_version"] = FORMAT_VERSION
        raw[DIGEST_FIELD] = manifest_digest(raw)
        parse_manifest(raw, str(path / MANIFEST))  # the result must load
        (tmp / MANIFEST).write_text(json.dumps(raw, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
        bundle_io.publish(tmp, path, raw[DIGEST_FIELD])
    except bundle_io.Vanished as gone:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"missing file {gone.args[0]} in bundle {path}; copy the whole bundle folder again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: migrate each bundle named; exit status 1 if any could not be."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m fallbackformer.export.migrate <bundle> [<bundle> ...]", file=sys.stderr)
        return 2
    status = 0
    for arg in args:
        try:
            print(f"migrated {migrate(arg)} to bundle format_version {FORMAT_VERSION}")
        except BundleError as exc:
            print(f"cannot migrate {arg}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
