"""Fingerprints of imported keys, computed from the public JWK the HSM returns."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from byok_pipeline.core.errors import Rejected
from offline_packager.keytypes import TARGET_TYPES
from offline_packager.target_keys import Fingerprint

_CURVES = {t.crv: t.curve() for t in TARGET_TYPES.values() if t.crv is not None}


def _int(b: bytes | None) -> int:
    if not b:
        raise Rejected("fingerprint_mismatch", "the imported key has no public component")
    return int.from_bytes(b, "big")


def spki_sha256_of_public_jwk(
    kty: str,
    *,
    n: bytes | None = None,
    e: bytes | None = None,
    crv: str | None = None,
    x: bytes | None = None,
    y: bytes | None = None,
) -> str:
    """SHA-256 hex of the SubjectPublicKeyInfo of an RSA or EC public JWK."""
    family = kty.removesuffix("-HSM")
    if family == "RSA":
        public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = rsa.RSAPublicNumbers(
            _int(e), _int(n)
        ).public_key()
    elif family == "EC" and crv in _CURVES:
        public = ec.EllipticCurvePublicNumbers(_int(x), _int(y), _CURVES[crv]).public_key()
    else:
        raise Rejected("fingerprint_mismatch", f"cannot fingerprint a {kty} key")
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def fingerprint_matches(expected: Fingerprint, actual_value: str) -> bool:
    """Constant-time comparison; KCVs compare on their 6 hex digits, case-insensitive."""
    a = expected.value.lower()
    b = actual_value.lower()[: len(a)]
    return hmac.compare_digest(a, b)
