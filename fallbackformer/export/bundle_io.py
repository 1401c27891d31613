"""Bundle files on disk: read each file once (checked, sized, hashed), publish a save atomically.

Atomic save (the layout)::

    <parent>/<name>                 a symlink to the current version, e.g. ``<name>.v-1a2b3c4d5e6f7a8b``
    <parent>/<name>.v-<digest16>    a complete bundle folder, never written after it is published
    <parent>/.<name>.lock           serialises savers (``flock``; loaders never take it)

A save writes a complete new version in ``.<name>.tmp-<pid>-<random>``, renames it to
``<name>.v-<digest16>`` (the manifest digest's first 16 hex digits) and switches ``<name>`` with one
``os.replace`` of a fresh symlink: a loader resolves ``<name>`` once and reads the old version or
the new one, whole. Old versions are removed after the switch; a loader that was still reading
one sees it vanish and starts again on the version ``<name>`` now names (:func:`read_bundle` does,
a bounded number of times). A plain bundle folder (saved before this layout, or copied) is
replaced the same way, by exchanging it with the symlink in one ``renameat2(RENAME_EXCHANGE)``
(Linux; elsewhere it is moved aside first, a brief window in which ``<name>`` is absent). Temp
folders of saves that were killed (their process is gone) are removed by the next save.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
from pathlib import Path
from typing import Iterator

from fallbackformer.export.manifest import MANIFEST, BundleError, Manifest, decode_manifest, parse_manifest

MAX_MANIFEST_BYTES = 64 << 20
READ_ATTEMPTS = 8  # re-resolutions when a concurrent save removes the version being read
VERSION_INFIX = ".v-"


class Vanished(Exception):
    """A file disappeared while it was being read (a concurrent save removed its version)."""


# ---------------------------------------------------------------------- reading


def bundle_folder(path: str | os.PathLike[str]) -> Path:
    """The bundle path a user means: ``<bundle>/manifest.json`` names ``<bundle>``."""
    path = Path(path)
    if path.name == MANIFEST and not path.is_dir():
        return path.parent
    return path


def resolve(path: Path) -> Path:
    """The version folder ``path`` names now (``path`` itself when it is a plain folder).

    A symlink whose target vanishes while it is followed (a concurrent save switched it) is
    followed again.
    """
    for _ in range(READ_ATTEMPTS):
        try:
            return Path(os.path.realpath(path, strict=True))
        except OSError:
            if not os.path.islink(path):
                break
    raise BundleError(f"bundle folder {path} does not exist; save one with ff.save(model, '{path}')")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def read_checked(root: Path, rel: str, size: int | None, bundle: Path, limit: int | None = None) -> bytes:
    """Read ``root/rel`` once: a regular file inside ``root``, of the recorded size, never blocking.

    Args:
        root: the resolved version folder.
        rel: the file's path inside it (already checked to stay inside by the schema).
        size: the recorded size (refused at once if the file's differs), or ``None``.
        bundle: the bundle path the user gave, for messages.
        limit: the most bytes to read when ``size`` is ``None``.

    Raises:
        BundleError: a symlink leaving the folder, a special file, a wrong size.
        Vanished: the file is gone (the caller decides: a concurrent save, or a missing file).
    """
    fpath = root / rel
    try:
        st = os.lstat(fpath)
    except FileNotFoundError:
        raise Vanished(rel) from None
    except NotADirectoryError:
        raise BundleError(f"{rel} in bundle {bundle}: a folder on its path is a file; copy the whole bundle again") from None
    target = fpath
    real = Path(os.path.realpath(fpath))
    if stat.S_ISLNK(st.st_mode) or real != fpath:
        try:
            kind = _kind(os.stat(real).st_mode)
        except OSError:
            kind = "nothing"
        if not real.is_relative_to(root):
            link = rel if stat.S_ISLNK(st.st_mode) else f"a folder on the path of {rel}"
            raise BundleError(
                f"{link} is a symlink to {real} ({kind}), outside the bundle folder {bundle}; "
                "refusing it. Replace the link with the file itself (cp --dereference) or re-save the bundle"
            )
        target, st = real, os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        what = "is a folder" if stat.S_ISDIR(st.st_mode) else f"is {_kind(st.st_mode)}"
        raise BundleError(
            f"{rel} {what} (in bundle {bundle}), where the manifest expects a regular file; refusing it. "
            "Copy the original file there, or re-save the bundle with ff.save"
        )
    _check_size(rel, st.st_size, size, bundle, limit)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Vanished(rel) from None
    except OSError as exc:
        raise BundleError(f"cannot open {rel} in bundle {bundle} ({exc.strerror}); check its permissions") from None
    try:
        st = os.fstat(fd)  # what was opened, not what was looked at
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{rel} in bundle {bundle} became {_kind(st.st_mode)} while it was opened; refusing it")
        _check_size(rel, st.st_size, size, bundle, limit)
        want = st.st_size
        chunks, got = [], 0
        while got <= want:  # one byte more than expected: a file that grows is caught
            block = os.read(fd, min(1 << 24, want + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    _check_size(rel, len(data), size if size is not None else want, bundle, limit)
    return data


def _check_size(rel: str, actual: int, recorded: int | None, bundle: Path, limit: int | None) -> None:
    if recorded is not None and actual != recorded:
        raise BundleError(
            f"{rel} in bundle {bundle} is {actual} bytes but the manifest records {recorded}: it was "
            "replaced, truncated or corrupted after saving (refused before hashing). Restore it from the "
            "original bundle, or re-save the bundle with ff.save"
        )
    if limit is not None and actual > limit:
        raise BundleError(f"{rel} in bundle {bundle} is {actual} bytes, more than the {limit} allowed; refusing it")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def safetensors_shapes(blob: bytes, filename: str, path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (8-byte length, then JSON), without reading tensors."""
    bad = f"{filename} in bundle {path} is not a valid safetensors file"
    if len(blob) < 8:
        raise BundleError(f"{bad} (too short); re-save the bundle with ff.save")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise BundleError(f"{bad} (header of {n} bytes in a {len(blob)}-byte file); re-save the bundle with ff.save")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
        shapes = {
            k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, RecursionError):
        raise BundleError(f"{bad} (unreadable header); re-save the bundle with ff.save") from None
    return shapes



def read_verified(root: Path, rel: str, sha256: str, size: int | None, bundle: Path) -> tuple[bytes, str]:
    """:func:`read_checked`, then the sha256 of the bytes read against the recorded one."""
    blob = read_checked(root, rel, size, bundle)
    digest = sha256_bytes(blob)
    if digest != sha256:
        raise BundleError(
            f"file {rel} in bundle {bundle} has sha256 {digest[:16]}... but the manifest records "
            f"{str(sha256)[:16]}...: it was changed or corrupted after saving. Restore it from "
            "the original bundle, or re-save the bundle with ff.save"
        )
    return blob, digest


def read_version(path: Path) -> tuple[Path, Manifest, dict[str, bytes], dict[str, str]]:
    """Resolve ``path`` once and read that version whole: manifest, then every file it lists.

    A version removed under us by a concurrent save is read again from the version ``path`` names
    now (at most ``READ_ATTEMPTS`` times); a file missing from a version nobody replaced is an error.
    """
    for _ in range(READ_ATTEMPTS):
        root = resolve(path)
        if not root.is_dir():
            raise BundleError(f"bundle {path} is not a folder; save one with ff.save(model, '{path}')")
        try:
            data = read_checked(root, MANIFEST, None, path, limit=MAX_MANIFEST_BYTES)
            raw = decode_manifest(data, path / MANIFEST)
            manifest = parse_manifest(raw, str(path / MANIFEST))
            blobs, hashes = {}, {}
            for rel, entry in manifest.files.items():
                blob, hashes[rel] = read_verified(root, rel, entry.sha256, entry.bytes, path)
                if rel in (m.file for m in manifest.models.values()) or (
                        manifest.router is not None and rel == manifest.router.get("file")) or (
                        manifest.ladder is not None and rel in (e.file for _, e in manifest.ladder["rungs"])):
                    blobs[rel] = blob  # deserialized from these very bytes; others are only verified
            return root, manifest, blobs, hashes
        except Vanished as gone:
            if resolve(path) != root:
                continue  # a concurrent save switched versions: read the new one whole
            if gone.args[0] == MANIFEST:
                raise BundleError(
                    f"{path / MANIFEST} is missing: {path} is not a bundle (or it is incomplete); re-save it with ff.save"
                ) from None
            raise BundleError(
                f"missing file {gone.args[0]} in bundle {path}: the bundle is incomplete; copy the whole bundle "
                "folder again, or re-save it with ff.save"
            ) from None
    raise BundleError(f"bundle {path} was replaced {READ_ATTEMPTS} times while it was read; load it again")



# ---------------------------------------------------------------------- publishing


@contextlib.contextmanager
def save_lock(parent: Path, name: str) -> Iterator[None]:
    """Serialise savers of one bundle (an ``flock`` on ``.<name>.lock``; released if the saver dies)."""
    fd = os.open(parent / f".{name}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def temp_folder(parent: Path, name: str) -> Path:
    """A fresh folder for a save in progress, named so that a later save can tell whose it is."""
    tmp = parent / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, name: str) -> list[str]:
    """Remove temp folders and links of ``name``'s saves whose process is gone. Call under the lock."""
    removed = []
    for prefix in (f".{name}.tmp-", f".{name}.link-", f".{name}.old-"):
        for p in parent.glob(f"{glob.escape(prefix)}*"):
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue  # a save in progress (in this process, a failed save removes its own)
            _remove(p)
            removed.append(p.name)
    return removed


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); ``False`` where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            return False
        raise OSError(err, os.strerror(err), str(a))
    return True


def publish(tmp: Path, path: Path, digest: str) -> Path:
    """Make the complete bundle in ``tmp`` the one ``path`` names, in one atomic switch.

    Args:
        tmp: a complete bundle folder from :func:`temp_folder`.
        path: the bundle path.
        digest: the manifest digest (names the version folder).

    Returns:
        The version folder ``path`` now points to.
    """
    parent, name = path.parent, path.name
    version = parent / f"{name}{VERSION_INFIX}{digest[:16]}"
    with save_lock(parent, name):
        remove_stale(parent, name)
        if version.is_dir():  # the same content was saved before: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, version)
        link = parent / f".{name}.link-{os.getpid()}-{secrets.token_hex(4)}"
        os.symlink(version.name, link)
        if path.is_dir() and not path.is_symlink():  # a plain bundle folder: swap it out whole
            if _exchange(link, path):
                _remove(link)  # (now the old folder)
            else:
                aside = parent / f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(path, aside)
                os.replace(link, path)
                _remove(aside)
        else:
            os.replace(link, path)
        _fsync_dir(parent)
        for old in parent.glob(f"{glob.escape(name + VERSION_INFIX)}*"):
            if old != version and old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
    return version


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
