"""Signed sign-off of bundles (a plain command line).

    python scripts/signoff.py keygen --out keys/alice              # keys/alice.pem + keys/alice.pub
    python scripts/signoff.py sign checkpoints/digits --key keys/alice.pem --signer alice
    python scripts/signoff.py verify checkpoints/digits --trusted keys/alice.pub

``sign`` verifies the bundle first (manifest digest, every file's sha256, its degradation bounds),
then appends an Ed25519 signature over ``manifest_sha256`` (who, which digest, when) to the
bundle's ``signature.json``. ``verify`` exits 0 when a trusted key signed this exact manifest, 1
with the reason otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _keygen(args: argparse.Namespace) -> int:
    from fallbackformer.export.signing import fingerprint, generate_keypair

    out = Path(args.out)
    priv, pub = out.with_suffix(".pem"), out.with_suffix(".pub")
    if priv.exists() and not args.force:
        print(f"signoff: {priv} exists; pass --force to replace it (old signatures stay valid for the old key)",
              file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    private_pem, public_pem = generate_keypair()
    priv.write_bytes(private_pem)
    os.chmod(priv, 0o600)
    pub.write_bytes(public_pem)
    print(f"wrote {priv} (private: keep it secret) and {pub} (public: share it); fingerprint {fingerprint(pub)}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from fallbackformer.export.bounds import enforce_bounds
    from fallbackformer.export.bundle import read_manifest, verify_files
    from fallbackformer.export.signing import sign_bundle

    manifest = read_manifest(args.bundle)
    verify_files(args.bundle, manifest)
    enforce_bounds(manifest, f"signing {args.bundle}")
    e = sign_bundle(args.bundle, args.key, args.signer, manifest=manifest)
    print(f"signed {args.bundle}: manifest_sha256 {e['manifest_sha256']} by {e['signer']} at {e['signed_at']} "
          f"(key {e['key_fingerprint'][:16]}...)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fallbackformer.export.bundle import read_manifest, verify_files
    from fallbackformer.export.signing import verify_bundle_signature

    manifest = read_manifest(args.bundle)
    verify_files(args.bundle, manifest)
    e = verify_bundle_signature(args.bundle, manifest, args.trusted)
    print(f"OK: {args.bundle} manifest_sha256 {e['manifest_sha256']} signed by {e['signer']} at {e['signed_at']} "
          f"(key {e['key_fingerprint'][:16]}...)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signoff.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="create an Ed25519 key pair OUT.pem (private) and OUT.pub")
    k.add_argument("--out", required=True, help="path prefix of the key files")
    k.add_argument("--force", action="store_true", help="replace existing key files")
    s = sub.add_parser("sign", help="sign a bundle's manifest_sha256 and append to its sign-off record")
    s.add_argument("bundle")
    s.add_argument("--key", required=True, help="the private key PEM (from keygen)")
    s.add_argument("--signer", required=True, help="who signs off (recorded and signed)")
    v = sub.add_parser("verify", help="check that a trusted key signed this exact bundle")
    v.add_argument("bundle")
    v.add_argument("--trusted", required=True, action="append", help="a trusted public key PEM (repeatable)")
    args = parser.parse_args(argv)
    from fallbackformer.export.bundle import BundleError

    try:
        return {"keygen": _keygen, "sign": _sign, "verify": _verify}[args.command](args)
    except BundleError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
