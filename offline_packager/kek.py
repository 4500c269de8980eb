"""The Key Exchange Key's public half: loading, checking, fingerprinting."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .errors import KekError
from .keytypes import KEK_SIZES

_MAX_PEM = 64 * 1024


def spki_sha256(public_key: PublicKeyTypes) -> str:
    """Lower-case hex SHA-256 of a public key's SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Kek:
    """An RSA KEK public key with its size and SPKI fingerprint."""

    public_key: rsa.RSAPublicKey
    fingerprint: str

    @property
    def key_size(self) -> int:
        return self.public_key.key_size

    @property
    def modulus_bytes(self) -> int:
        return (self.public_key.key_size + 7) // 8

    def pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def check_kek(public_key: object) -> Kek:
    """Accept only RSA 2048/3072/4096 public keys.

    Raises:
        KekError: reason ``kek_not_rsa`` or ``kek_wrong_size``.
    """
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise KekError("the KEK must be an RSA public key", reason="kek_not_rsa")
    if public_key.key_size not in KEK_SIZES:
        raise KekError(
            f"the KEK is RSA-{public_key.key_size}; Managed HSM KEKs are RSA 2048, 3072 or 4096",
            reason="kek_wrong_size",
        )
    return Kek(public_key, spki_sha256(public_key))


def load_kek_pem(data: bytes) -> Kek:
    """Load a KEK from SubjectPublicKeyInfo PEM (as ``az keyvault key download`` writes it).

    Raises:
        KekError: reason ``malformed_pem``, ``kek_not_rsa`` or ``kek_wrong_size``.
    """
    if len(data) > _MAX_PEM:
        raise KekError("the KEK file is too large to be a PEM public key", reason="malformed_pem")
    if b"PRIVATE KEY" in data:
        raise KekError(
            "the KEK file holds a private key; give the KEK's public key (PEM)",
            reason="malformed_pem",
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise KekError(
            "the KEK file is not a PEM public key (expected -----BEGIN PUBLIC KEY-----)",
            reason="malformed_pem",
        ) from None
    return check_kek(key)


def verify_fingerprint(kek: Kek, expected_hex: str) -> None:
    """Refuse a KEK whose SPKI SHA-256 differs from ``expected_hex`` (colons/case ignored).

    Raises:
        KekError: reason ``kek_fingerprint_mismatch``, or ``bad_fingerprint`` if malformed.
    """
    normalized = expected_hex.replace(":", "").replace(" ", "").lower()
    if len(normalized) != 64 or any(c not in "0123456789abcdef" for c in normalized):
        raise KekError("--kek-sha256 must be 64 hex digits", reason="bad_fingerprint")
    if not hmac.compare_digest(normalized, kek.fingerprint):
        raise KekError(
            f"KEK fingerprint mismatch: file has SPKI SHA-256 {kek.fingerprint}, "
            f"expected {normalized}; the KEK file may have been swapped",
            reason="kek_fingerprint_mismatch",
        )
