"""Signed sign-off of a bundle: Ed25519 signatures over ``manifest_sha256``, in ``signature.json``.

The manifest's digest catches edits; a signature says *who* approved that exact manifest (and so,
through its file hashes, those exact weights, gates and policy). Signatures live in their own file,
``<bundle>/signature.json``, so ``manifest_sha256`` keeps its meaning and signing never rewrites the
manifest. The file is the bundle's sign-off record, a list of entries::

    {"format": "fallbackformer-signoff", "signatures": [
        {"algorithm": "ed25519", "signer": "alice", "signed_at": "2026-01-01T00:00:00Z",
         "manifest_sha256": "<hex>", "key_fingerprint": "<hex sha256 of the raw public key>",
         "public_key": "<base64 raw>", "signature": "<base64>"}]}

Each signature is over the canonical JSON of ``{"manifest_sha256", "signer", "signed_at"}``, so the
signer's name and the time are authenticated with the digest. ``cryptography`` is imported only
inside these functions: loading an unsigned bundle without ``trusted_keys`` never needs it.

>>> private_pem, public_pem = generate_keypair()   # doctest: +SKIP
>>> ff.save(model, "b", signing_key=private_pem, signer="alice")   # doctest: +SKIP
>>> ff.load("b", trusted_keys=[public_pem])   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fallbackformer.export.bundle import BundleError

__all__ = [
    "SIGNATURE_FILE",
    "SignatureError",
    "fingerprint",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "read_signoff",
    "sign_bundle",
    "verify_bundle_signature",
]

SIGNATURE_FILE = "signature.json"
SIGNOFF_FORMAT = "fallbackformer-signoff"
_DIGEST_FIELD = "manifest_sha256"

KeyLike = Any  # an Ed25519 key object, PEM bytes/str, or a path to a PEM file


class SignatureError(BundleError):
    """A signature or key is missing, malformed or untrusted; the message names which and the fix."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - depends on the environment
        raise SignatureError(
            "signing and verifying bundles needs the 'cryptography' package; "
            "pip install 'fallbackformer[governance]'"
        ) from None
    return ed25519


def _pem_bytes(key: KeyLike) -> bytes | None:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
        return key.encode("ascii")
    if isinstance(key, (str, os.PathLike)):
        p = Path(key)
        if not p.is_file():
            raise SignatureError(f"key file {p} does not exist; create one with scripts/signoff.py keygen")
        return p.read_bytes()
    return None


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as ``(private PEM (PKCS8, unencrypted), public PEM)``."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization as s

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_private_key(key: KeyLike) -> Any:
    """An ``Ed25519PrivateKey`` from a key object, PEM bytes/text or a PEM file path."""
    ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    pem = _pem_bytes(key)
    if pem is None:
        raise SignatureError(f"signing_key must be an Ed25519 private key, PEM bytes or a PEM path; got {type(key).__name__}")
    from cryptography.hazmat.primitives import serialization as s

    try:
        loaded = s.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read the private key ({exc}); pass an unencrypted Ed25519 PEM from keygen") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"the private key is {type(loaded).__name__}, not Ed25519; create one with keygen")
    return loaded


def load_public_key(key: KeyLike) -> Any:
    """An ``Ed25519PublicKey`` from a key object, PEM bytes/text or a PEM file path."""
    ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key()
    pem = _pem_bytes(key)
    if pem is None:
        raise SignatureError(f"a trusted key must be an Ed25519 public key, PEM bytes or a PEM path; got {type(key).__name__}")
    from cryptography.hazmat.primitives import serialization as s

    try:
        loaded = s.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read the public key ({exc}); pass the .pub PEM that keygen wrote") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise SignatureError(f"the public key is {type(loaded).__name__}, not Ed25519")
    return loaded


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def fingerprint(key: KeyLike) -> str:
    """Hex sha256 of the raw 32-byte public key (of a public or private key)."""
    return hashlib.sha256(_raw_public(load_public_key(key))).hexdigest()


def _message(digest: str, signer: str, signed_at: str) -> bytes:
    body = {_DIGEST_FIELD: digest, "signer": signer, "signed_at": signed_at}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def read_signoff(bundle: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The sign-off entries of a bundle (``[]`` when it has no ``signature.json``)."""
    p = Path(bundle) / SIGNATURE_FILE
    if not p.is_file():
        return []
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        entries = data["signatures"]
        assert data.get("format") == SIGNOFF_FORMAT and isinstance(entries, list)
    except Exception:
        raise SignatureError(f"{p} is not a sign-off record; delete it and sign the bundle again") from None
    return entries


def sign_bundle(
    bundle: str | os.PathLike[str],
    signing_key: KeyLike,
    signer: str,
    *,
    manifest: Mapping[str, Any] | None = None,
    signed_at: str | None = None,
) -> dict[str, Any]:
    """Sign the bundle's ``manifest_sha256`` and append the entry to ``signature.json``.

    Args:
        bundle: the bundle folder.
        signing_key: the Ed25519 private key (object, PEM, or PEM path).
        signer: who signs off (a name a person can check).
        manifest: the manifest (default: read ``manifest.json``; the caller verifies it first).
        signed_at: ISO-8601 UTC time (default: now).

    Returns:
        The new sign-off entry.
    """
    if not signer or not isinstance(signer, str):
        raise SignatureError(f"signer must be a non-empty name; got {signer!r}")
    bundle = Path(bundle)
    if manifest is None:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    digest = manifest.get(_DIGEST_FIELD)
    if not isinstance(digest, str):
        raise SignatureError(f"{bundle}/manifest.json has no {_DIGEST_FIELD}; re-save it with ff.save")
    key = load_private_key(signing_key)
    signed_at = signed_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = {
        "algorithm": "ed25519",
        "signer": signer,
        "signed_at": signed_at,
        _DIGEST_FIELD: digest,
        "key_fingerprint": hashlib.sha256(_raw_public(key.public_key())).hexdigest(),
        "public_key": base64.b64encode(_raw_public(key.public_key())).decode("ascii"),
        "signature": base64.b64encode(key.sign(_message(digest, signer, signed_at))).decode("ascii"),
    }
    entries = read_signoff(bundle) + [entry]
    text = json.dumps({"format": SIGNOFF_FORMAT, "signatures": entries}, indent=2, sort_keys=True) + "\n"
    tmp = bundle / f".{SIGNATURE_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, bundle / SIGNATURE_FILE)  # a reader sees the old record or the new one
    return entry


def verify_bundle_signature(
    bundle: str | os.PathLike[str], manifest: Mapping[str, Any], trusted_keys: Iterable[KeyLike]
) -> dict[str, Any]:
    """The first sign-off entry by a trusted key with a valid signature over this manifest's digest.

    Args:
        bundle: the bundle folder.
        manifest: its verified manifest (``read_manifest``).
        trusted_keys: public keys (objects, PEM, or PEM paths) whose signature is accepted.

    Raises:
        SignatureError: unsigned, signed by no trusted key, signed for another manifest, or a
            signature that does not verify; the message says which.
    """
    _crypto()  # a clear error when cryptography is missing
    from cryptography.exceptions import InvalidSignature

    trusted = {fingerprint(k): load_public_key(k) for k in trusted_keys}
    if not trusted:
        raise SignatureError("trusted_keys is empty; pass at least one public key (or None to skip verification)")
    digest = manifest.get(_DIGEST_FIELD)
    entries = read_signoff(bundle)
    if not entries:
        raise SignatureError(
            f"bundle {bundle} is unsigned (no {SIGNATURE_FILE}); sign it with "
            f"scripts/signoff.py sign {bundle} --key KEY --signer NAME, or load it without trusted_keys"
        )
    problems = []
    for e in entries:
        fp = e.get("key_fingerprint")
        if fp not in trusted:
            problems.append(f"{e.get('signer')!r} signed with untrusted key {str(fp)[:16]}...")
            continue
        if e.get(_DIGEST_FIELD) != digest:
            problems.append(f"{e.get('signer')!r} signed another manifest ({str(e.get(_DIGEST_FIELD))[:16]}...)")
            continue
        try:
            trusted[fp].verify(base64.b64decode(e["signature"]), _message(digest, e["signer"], e["signed_at"]))
        except (InvalidSignature, KeyError, ValueError, TypeError):
            problems.append(f"{e.get('signer')!r}'s signature does not verify (forged or edited entry)")
            continue
        return dict(e)
    raise SignatureError(
        f"bundle {bundle} has no valid signature by a trusted key over manifest_sha256 {str(digest)[:16]}...: "
        + "; ".join(problems)
        + ". Have a trusted signer sign this exact bundle, or pass their public key in trusted_keys"
    )
