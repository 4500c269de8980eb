"""HSM mode takes the target's public part (manifest fingerprint and PEM) from the key that is
wrapped: a public key object that only shares the key's label belongs to no one and is never
used. (Refusals, when the public part cannot be established, are in test_hsm_refusals.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from softhsm_helpers import KekFiles, SoftHsm, import_ec, import_public, import_rsa, wrap_args

from offline_packager.cli import main
from offline_packager.kek import spki_sha256
from offline_packager.package_format import b64url_decode
from offline_packager.pkcs11_quirks import strip_zero_padding
from offline_packager.pkcs11_source import EC_PARAMS_BY_CRV
from offline_packager.wrap import unwrap_target

pytestmark = pytest.mark.softhsm


def _wrap_by_label(
    softhsm: SoftHsm, kek: KekFiles, label: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], Any]:
    """Wrap the key labelled ``label``; return the manifest and the unwrapped private key."""
    out = tmp_path / "k.byok"
    rc = main(wrap_args(softhsm, kek, out, "--key-label", label))
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads(out.with_name("k.manifest.json").read_text())
    ciphertext = b64url_decode(json.loads(out.read_text())["ciphertext"])
    der = strip_zero_padding(unwrap_target(kek.private_key, ciphertext)).reveal()
    return manifest, serialization.load_der_private_key(der, password=None)


def _pem(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _assert_describes(
    manifest: dict[str, Any], key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> None:
    public = key.public_key()
    assert manifest["target"]["fingerprint"] == {
        "kind": "spki-sha256",
        "value": spki_sha256(public),
    }
    assert manifest["target"]["public_key_pem"] == _pem(public)


def test_rsa_orphan_public_key_with_the_label_is_ignored(
    softhsm: SoftHsm,
    kek: KekFiles,
    pin_env: str,
    label: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The RSA private object reveals its modulus: the manifest describes it, not another key's
    public object that shares the label under another CKA_ID."""
    key = rsa.generate_private_key(65537, 2048)
    orphan = rsa.generate_private_key(65537, 2048).public_key()
    with softhsm.session() as session:
        import_rsa(session, key, label)
        import_public(session, orphan, label, b"another key")
    manifest, unwrapped = _wrap_by_label(softhsm, kek, label, tmp_path, capsys)
    assert unwrapped.private_numbers() == key.private_numbers()
    _assert_describes(manifest, key)
    assert manifest["target"]["fingerprint"]["value"] != spki_sha256(orphan)


def test_ec_public_key_is_the_one_with_the_keys_id(
    softhsm: SoftHsm,
    kek: KekFiles,
    pin_env: str,
    label: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The EC point comes from the public object with the key's label *and* ID; another key's
    public object with the same label (created first, so found first) is passed over."""
    key = ec.generate_private_key(ec.SECP384R1())
    orphan = ec.generate_private_key(ec.SECP384R1()).public_key()
    params = EC_PARAMS_BY_CRV["P-384"]
    with softhsm.session() as session:
        import_public(session, orphan, label, b"another key", params)
        import_ec(session, key, params, label)
    manifest, unwrapped = _wrap_by_label(softhsm, kek, label, tmp_path, capsys)
    assert unwrapped.private_numbers() == key.private_numbers()
    _assert_describes(manifest, key)
