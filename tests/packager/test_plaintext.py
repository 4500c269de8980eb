"""Plaintext key material is recognised in every form a key file takes (and never quoted);
`byok-package inspect` refuses what is no package at all with one line instead of a report of
empty fields (issue 14)."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from offline_packager.cli import main
from offline_packager.plaintext import plaintext_key_kind

_NONE = serialization.NoEncryption()
_RSA = rsa.generate_private_key(65537, 2048)
_EC = ec.generate_private_key(ec.SECP256R1())


def _key(key: object, encoding: serialization.Encoding, fmt: serialization.PrivateFormat,
         encryption: serialization.KeySerializationEncryption = _NONE) -> bytes:  # fmt: skip
    return key.private_bytes(encoding, fmt, encryption)  # type: ignore[attr-defined, no-any-return]


_PEM, _DER = serialization.Encoding.PEM, serialization.Encoding.DER
_PKCS8, _TRAD = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL
_SECRET = secrets.token_bytes(32)

KEYS: dict[str, tuple[Callable[[], bytes], str]] = {
    "PEM PKCS#8": (lambda: _key(_RSA, _PEM, _PKCS8), "PEM private key (PRIVATE KEY)"),
    "PEM PKCS#1": (lambda: _key(_RSA, _PEM, _TRAD), "PEM private key (RSA PRIVATE KEY)"),
    "PEM SEC1": (lambda: _key(_EC, _PEM, _TRAD), "PEM private key (EC PRIVATE KEY)"),
    "PEM encrypted": (
        lambda: _key(_EC, _PEM, _PKCS8, serialization.BestAvailableEncryption(b"pw")),
        "PEM private key (ENCRYPTED PRIVATE KEY)",
    ),
    "PEM OpenSSH": (
        lambda: _key(ed25519.Ed25519PrivateKey.generate(), _PEM, serialization.PrivateFormat.OpenSSH),
        "PEM private key (OPENSSH PRIVATE KEY)",
    ),
    "PEM inside other text": (
        lambda: b"note: key below\n" + _key(_EC, _PEM, _PKCS8),
        "PEM private key (PRIVATE KEY)",
    ),
    "DER PKCS#8": (lambda: _key(_RSA, _DER, _PKCS8), "DER private key"),
    "DER PKCS#1": (lambda: _key(_RSA, _DER, _TRAD), "DER private key"),
    "DER SEC1": (lambda: _key(_EC, _DER, _TRAD), "DER private key"),
    "DER Ed25519": (lambda: _key(ed25519.Ed25519PrivateKey.generate(), _DER, _PKCS8), "DER private key"),
    "DER PKCS#8 encrypted": (
        lambda: _key(_EC, _DER, _PKCS8, serialization.BestAvailableEncryption(b"pw")),
        "encrypted private key (DER PKCS#8)",
    ),
    "PKCS#12": (
        lambda: pkcs12.serialize_key_and_certificates(
            b"x", _EC, None, None, serialization.BestAvailableEncryption(b"pw")
        ),
        "PKCS#12",
    ),
    "JWK EC": (
        lambda: json.dumps({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"}).encode(),
        "JWK with private key members",
    ),
    "JWK oct": (lambda: json.dumps({"kty": "oct", "k": "AAAA"}).encode(), "JWK"),
    "JWK set": (lambda: json.dumps({"keys": [{"kty": "RSA", "n": "AQ", "e": "AQ", "p": "AQ"}]}).encode(), "JWK"),
    "raw AES-128": (lambda: _SECRET[:16], "16 bytes, the size of a raw AES-128 key"),
    "raw AES-192": (lambda: _SECRET[:24], "raw AES-192 key"),
    "raw AES-256": (lambda: _SECRET, "raw AES-256 key"),
    "hex AES-256": (lambda: _SECRET.hex().encode() + b"\n", "hex text of 32 bytes"),
    "base64 AES-128": (lambda: base64.b64encode(_SECRET[:16]) + b"\n", "base64 text of 16 bytes"),
    "base64url AES-256": (lambda: base64.urlsafe_b64encode(_SECRET).rstrip(b"="), "base64 text of 32 bytes"),
    "PuTTY": (lambda: b"PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n", "PuTTY"),
}  # fmt: skip

NOT_KEYS: dict[str, bytes] = {
    "a package": json.dumps(
        {
            "schema_version": "1.0.0",
            "header": {"kid": "k", "alg": "dir", "enc": "x"},
            "ciphertext": "AA" * 300,
        }
    ).encode(),
    "a public key PEM": _RSA.public_key().public_bytes(
        _PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ),
    "a public JWK": json.dumps({"kty": "RSA", "n": "AQ", "e": "AQ"}).encode(),
    "JSON of 32 bytes": b'{"a": 1234567890123456789012345}',
    "text": b"hello, this is not a key at all, just a sentence.\n",
    "15 bytes": _SECRET[:15],
    "empty": b"",
}


@pytest.mark.parametrize("name", list(KEYS))
def test_every_form_of_a_key_is_recognised(name: str) -> None:
    build, expected = KEYS[name]
    kind = plaintext_key_kind(build())
    assert kind is not None
    assert expected in kind


@pytest.mark.parametrize("name", list(NOT_KEYS))
def test_what_is_no_key_is_not_taken_for_one(name: str) -> None:
    assert plaintext_key_kind(NOT_KEYS[name]) is None


def test_inspect_refuses_a_private_key_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "oops.byok"
    data = _key(_RSA, _PEM, _PKCS8)
    path.write_bytes(data)
    assert main(["inspect", str(path), "--json"]) == 2
    out = capsys.readouterr()
    assert len(out.err.splitlines()) == 1
    assert out.err.startswith("byok-package: refused [plaintext_key]: STOP: ")
    assert json.loads(out.out)["reason"] == "plaintext_key"
    body = data.splitlines()[1].decode()
    assert body not in out.err
    assert body not in out.out


def test_inspect_refuses_a_non_package_instead_of_printing_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.byok"
    path.write_text("these are my notes about the ceremony\n")
    assert main(["inspect", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # no report of empty fields: no "kid: None"
    assert out.err.startswith(
        f"byok-package: refused [malformed_package]: {path} is not a .byok package: "
    )
    assert len(out.err.splitlines()) == 1
    assert main(["inspect", str(tmp_path / "missing.byok")]) == 2
    assert "[unreadable_input]: cannot read package" in capsys.readouterr().err
