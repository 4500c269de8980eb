"""All ten target types, from --key and from --generate, unwrap to the exact plaintext with
`cryptography` and with the OpenSSL CLI (an independent implementation of the wrap)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from packager_support import openssl_unwrap, pkcs8, write_key_file
from testsupport import make_kid, write_kek

from offline_packager.cli import main
from offline_packager.kek import spki_sha256
from offline_packager.keytypes import TARGET_TYPES, TYPE_NAMES
from offline_packager.package_format import parse_package
from offline_packager.secret import SecretBytes
from offline_packager.target_keys import key_check_value
from offline_packager.wrap import unwrap_target

pytestmark = pytest.mark.openssl

# Which input format each type's --key test uses: every format appears at least once.
KEY_FORMATS = {
    "rsa-2048": "traditional-pem",  # PKCS#1 PEM
    "rsa-3072": "pkcs8-der",
    "rsa-4096": "jwk",
    "ec-p256": "traditional-pem",  # SEC1 PEM
    "ec-p384": "pkcs8-pem",
    "ec-p521": "encrypted-pem",
    "ec-p256k": "traditional-der",  # SEC1 DER
    "oct-128": "raw",
    "oct-192": "jwk",
    "oct-256": "raw",
}
# Spread the three KEK sizes over the types.
KEK_FOR = {name: (2048, 3072, 4096)[i % 3] for i, name in enumerate(TYPE_NAMES)}


def _make_target(type_name: str) -> PrivateKeyTypes | bytes:
    t = TARGET_TYPES[type_name]
    if t.family == "RSA":
        assert t.key_size is not None
        return rsa.generate_private_key(65537, t.key_size)
    if t.family == "EC":
        return ec.generate_private_key(t.curve())
    assert t.key_size is not None
    return bytes(range(t.key_size // 8))[::-1]


def _wrap(tmp: Path, kek_pem: Path, kid: str, out: str, *extra: str) -> dict[str, Any]:
    return _run_json(
        ["wrap", "--kek", str(kek_pem), "--kek-kid", kid, "--out", str(tmp / out), "--json", *extra]
    )


def _run_json(argv: list[str]) -> dict[str, Any]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    assert rc == 0, buf.getvalue()
    result: dict[str, Any] = json.loads(buf.getvalue())
    return result


@pytest.mark.skipif(shutil.which("openssl") is None, reason="make test installs openssl")
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_key_file_packages_unwrap_exactly(
    type_name: str,
    keks: dict[int, rsa.RSAPrivateKey],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kek = keks[KEK_FOR[type_name]]
    kek_pem, kek_priv = write_kek(tmp_path, kek)
    target = _make_target(type_name)
    fmt = KEY_FORMATS[type_name]
    key_file = tmp_path / "target.key"
    extra: list[str] = []
    if isinstance(target, bytes):
        expected = target
        if fmt == "raw":
            key_file.write_bytes(target)
            extra = ["--key-type", "oct"]
        else:
            from offline_packager.package_format import b64url_encode

            key_file.write_text(json.dumps({"kty": "oct", "k": b64url_encode(target)}))
    else:
        expected = pkcs8(target)
        write_key_file(key_file, target, fmt, passphrase=b"correct horse")
        if fmt == "encrypted-pem":
            monkeypatch.setenv("TEST_PASSPHRASE", "correct horse")
            extra = ["--passphrase-env", "TEST_PASSPHRASE"]
    kid = make_kid()
    result = _wrap(tmp_path, kek_pem, kid, f"{type_name}.byok", "--key", str(key_file), *extra)
    assert result["target_type"] == type_name
    package = tmp_path / f"{type_name}.byok"
    ciphertext = parse_package(package.read_bytes()).ciphertext
    assert len(ciphertext) - kek.key_size // 8 in TARGET_TYPES[type_name].typical_kwp

    assert unwrap_target(kek, ciphertext).reveal() == expected
    assert openssl_unwrap(package, kek_priv, kek.key_size // 8, tmp_path) == expected

    manifest = json.loads((tmp_path / f"{type_name}.manifest.json").read_text())
    assert manifest["kek"]["kid"] == kid
    if isinstance(target, bytes):
        assert manifest["target"]["fingerprint"]["value"] == key_check_value(SecretBytes(target))
    else:
        assert manifest["target"]["fingerprint"]["value"] == spki_sha256(target.public_key())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="make test installs openssl")
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_generated_packages_unwrap_to_the_manifest_key(
    type_name: str, keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    kek = keks[KEK_FOR[type_name]]
    kek_pem, kek_priv = write_kek(tmp_path, kek)
    _wrap(tmp_path, kek_pem, make_kid(), "gen.byok", "--generate", type_name)
    package = tmp_path / "gen.byok"
    plain = unwrap_target(kek, parse_package(package.read_bytes()).ciphertext).reveal()
    assert openssl_unwrap(package, kek_priv, kek.key_size // 8, tmp_path) == plain
    manifest = json.loads((tmp_path / "gen.manifest.json").read_text())
    t = TARGET_TYPES[type_name]
    if t.family == "oct":
        assert t.key_size is not None
        assert len(plain) == t.key_size // 8
        assert manifest["target"]["fingerprint"] == {
            "kind": "kcv",
            "value": key_check_value(SecretBytes(plain)),
        }
    else:
        key = serialization.load_der_private_key(plain, None)
        assert pkcs8(key) == plain  # the plaintext is canonical PKCS#8 DER
        assert manifest["target"]["fingerprint"]["value"] == spki_sha256(key.public_key())
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert manifest["target"]["public_key_pem"] == pem.decode()


def test_each_package_uses_a_fresh_aes_key(
    keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    kek = keks[2048]
    kek_pem, _ = write_kek(tmp_path, kek)
    key_file = tmp_path / "aes.bin"
    key_file.write_bytes(bytes(32))
    kid = make_kid()
    _wrap(tmp_path, kek_pem, kid, "a.byok", "--key", str(key_file), "--key-type", "oct")
    _wrap(tmp_path, kek_pem, kid, "b.byok", "--key", str(key_file), "--key-type", "oct")
    a = parse_package((tmp_path / "a.byok").read_bytes()).ciphertext
    b = parse_package((tmp_path / "b.byok").read_bytes()).ciphertext
    assert a[256:] != b[256:]  # the KWP blocks differ: different AES keys
