"""Signed sign-off: ff.save(signing_key=...), ff.load(trusted_keys=...) and scripts/signoff.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import fallbackformer as ff
from fallbackformer.export.bundle import MANIFEST, BundleError
from fallbackformer.export.signing import SIGNATURE_FILE, fingerprint, read_signoff, sign_bundle

ROOT = Path(__file__).resolve().parents[3]


def _cli():
    spec = importlib.util.spec_from_file_location("signoff_cli", ROOT / "scripts" / "signoff.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.main


def test_signed_bundle_loads_with_trusted_key_and_keeps_manifest_digest(tiny, keys, tmp_path) -> None:
    priv, pub = keys["alice"]
    path = ff.save(tiny, tmp_path / "b", signing_key=priv, signer="alice")
    m = json.loads((path / MANIFEST).read_text())
    (entry,) = read_signoff(path)
    assert entry["manifest_sha256"] == m["manifest_sha256"] and entry["signer"] == "alice"
    assert entry["key_fingerprint"] == fingerprint(pub) and SIGNATURE_FILE not in m["files"]
    assert ff.load(path, trusted_keys=[pub]) is not None
    assert ff.load(path) is not None  # no keys given: no signature check


def test_unsigned_or_untrusted_or_forged_bundle_is_refused(tiny, keys, tmp_path) -> None:
    _, alice_pub = keys["alice"]
    mallory_priv, _ = keys["mallory"]
    unsigned = ff.save(tiny, tmp_path / "u")
    with pytest.raises(BundleError, match="unsigned"):
        ff.load(unsigned, trusted_keys=[alice_pub])
    by_mallory = ff.save(tiny, tmp_path / "m", signing_key=mallory_priv, signer="alice")
    with pytest.raises(BundleError, match="untrusted key"):
        ff.load(by_mallory, trusted_keys=[alice_pub])
    # a forged entry: alice's fingerprint and name, mallory's signature
    sig = json.loads((by_mallory / SIGNATURE_FILE).read_text())
    sig["signatures"][0]["key_fingerprint"] = fingerprint(alice_pub)
    (by_mallory / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="does not verify"):
        ff.load(by_mallory, trusted_keys=[alice_pub])


def test_a_signature_for_another_manifest_does_not_carry_over(tiny, keys, tmp_path) -> None:
    priv, pub = keys["alice"]
    path = ff.save(tiny, tmp_path / "b", signing_key=priv, signer="alice")
    old = (path / SIGNATURE_FILE).read_text()
    ff.save(tiny, path, evaluation={"fallback_rate": 0.0})  # a new manifest, unsigned
    (path / SIGNATURE_FILE).write_text(old)  # someone copies the old sign-off over
    with pytest.raises(BundleError, match="signed another manifest"):
        ff.load(path, trusted_keys=[pub])


def test_signoff_cli_keygen_sign_verify(tiny, tmp_path, capsys) -> None:
    main = _cli()
    path = ff.save(tiny, tmp_path / "b")
    assert main(["keygen", "--out", str(tmp_path / "k" / "bob")]) == 0
    key, pub = tmp_path / "k" / "bob.pem", tmp_path / "k" / "bob.pub"
    assert main(["verify", str(path), "--trusted", str(pub)]) == 1
    assert "unsigned" in capsys.readouterr().err
    assert main(["sign", str(path), "--key", str(key), "--signer", "bob"]) == 0
    assert main(["sign", str(path), "--key", str(key), "--signer", "carol"]) == 0  # appended, not replaced
    assert [e["signer"] for e in read_signoff(path)] == ["bob", "carol"]
    assert main(["verify", str(path), "--trusted", str(pub)]) == 0
    assert "signed by bob" in capsys.readouterr().out


def test_signer_is_required(tiny, keys, tmp_path) -> None:
    path = ff.save(tiny, tmp_path / "b")
    with pytest.raises(BundleError, match="signer"):
        sign_bundle(path, keys["alice"][0], "")
