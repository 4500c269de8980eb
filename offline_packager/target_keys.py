"""Target keys: reading them from files, generating them, and fingerprinting them.

The plaintext sent into the wrap is PKCS#8 DER for RSA and EC and the raw bytes for AES
(byok-facts.md section 2). It is held in :class:`SecretBytes` and never written anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import TargetKeyError
from .kek import spki_sha256
from .keytypes import CURVE_BY_OPENSSL_NAME, TargetType, get_type, type_for
from .package_format import b64url_decode
from .secret import SecretBytes

MAX_KEY_FILE_BYTES = 1024 * 1024
PassphraseProvider = Callable[[], bytes]
RandBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class Fingerprint:
    """Public check of a target: ``spki-sha256`` (RSA/EC, 64 hex) or ``kcv`` (AES, 6 hex)."""

    kind: str
    value: str


@dataclass(frozen=True)
class TargetPublic:
    """What may be known of a target without its secret: type, fingerprint, public key."""

    type: TargetType
    fingerprint: Fingerprint
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None

    def public_pem(self) -> str | None:
        if self.public_key is None:
            return None
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")


@dataclass(frozen=True, repr=False)
class TargetKey:
    """A target key ready to wrap. ``plaintext`` is secret; ``repr`` shows no key material."""

    public: TargetPublic
    plaintext: SecretBytes

    @property
    def type(self) -> TargetType:
        return self.public.type

    @property
    def fingerprint(self) -> Fingerprint:
        return self.public.fingerprint

    @property
    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None:
        return self.public.public_key

    def __repr__(self) -> str:
        return f"TargetKey(type={self.type.name}, fingerprint={self.fingerprint.value})"


def key_check_value(aes_key: SecretBytes) -> str:
    """AES key check value: first 3 bytes of AES-ECB(key, 16 zero bytes), 6 upper-case hex."""
    encryptor = Cipher(algorithms.AES(aes_key.reveal()), modes.ECB()).encryptor()  # noqa: S305  # KCV is defined over one ECB block
    block = encryptor.update(bytes(16)) + encryptor.finalize()
    return block[:3].hex().upper()


def _from_private_key(key: PrivateKeyTypes) -> TargetKey:
    if isinstance(key, rsa.RSAPrivateKey):
        target = type_for("RSA", key_size=key.key_size)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        crv = CURVE_BY_OPENSSL_NAME.get(key.curve.name)
        if crv is None:
            raise TargetKeyError(
                f"curve {key.curve.name} is not supported (P-256, P-384, P-521, P-256K)",
                reason="unsupported_curve",
            )
        target = type_for("EC", crv=crv)
    else:
        raise TargetKeyError(
            f"{type(key).__name__.lstrip('_')} keys are not supported: give an RSA, EC or AES key"
        )
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    fingerprint = Fingerprint("spki-sha256", spki_sha256(public))
    return TargetKey(
        TargetPublic(target, fingerprint, public), SecretBytes(der, label="target key")
    )


def from_oct(raw: bytes) -> TargetKey:
    """An AES target from its raw 16/24/32 bytes."""
    secret = SecretBytes(raw, label="target key")
    target = type_for("oct", key_size=len(raw) * 8)
    return TargetKey(
        TargetPublic(target, Fingerprint("kcv", key_check_value(secret)), None), secret
    )


def generate_target(type_name: str, *, randbytes: RandBytes = os.urandom) -> TargetKey:
    """Generate a target key in memory (tests and demos; production keys come from an HSM).

    Raises:
        TargetKeyError: unsupported type name.
    """
    target = get_type(type_name)
    if target.family == "oct":
        assert target.key_size is not None  # noqa: S101  # oct types always carry a size
        return from_oct(randbytes(target.key_size // 8))
    if target.family == "RSA":
        assert target.key_size is not None  # noqa: S101  # RSA types always carry a size
        return _from_private_key(rsa.generate_private_key(65537, target.key_size))
    return _from_private_key(ec.generate_private_key(target.curve()))


def _b64url_int(jwk: dict[str, Any], field: str) -> int:
    value = jwk.get(field)
    if not isinstance(value, str) or not value:
        raise TargetKeyError(f"JWK lacks field {field!r}", reason="bad_key_file")
    try:
        return int.from_bytes(b64url_decode(value), "big")
    except ValueError:
        raise TargetKeyError(
            f"JWK field {field!r} is not base64url", reason="bad_key_file"
        ) from None


def _from_jwk(jwk: dict[str, Any]) -> TargetKey:
    kty = jwk.get("kty")
    if kty in ("oct", "oct-HSM"):
        return from_oct(b64url_decode(str(jwk.get("k", ""))))
    if kty in ("RSA", "RSA-HSM"):
        if "d" not in jwk:
            raise TargetKeyError("the JWK holds only a public key", reason="bad_key_file")
        n, e = _b64url_int(jwk, "n"), _b64url_int(jwk, "e")
        numbers = rsa.RSAPrivateNumbers(
            p=_b64url_int(jwk, "p"),
            q=_b64url_int(jwk, "q"),
            d=_b64url_int(jwk, "d"),
            dmp1=_b64url_int(jwk, "dp"),
            dmq1=_b64url_int(jwk, "dq"),
            iqmp=_b64url_int(jwk, "qi"),
            public_numbers=rsa.RSAPublicNumbers(e, n),
        )
        try:
            return _from_private_key(numbers.private_key())
        except ValueError:
            raise TargetKeyError("the RSA JWK is inconsistent", reason="bad_key_file") from None
    if kty in ("EC", "EC-HSM"):
        crv = jwk.get("crv")
        if crv not in ("P-256", "P-384", "P-521", "P-256K"):
            raise TargetKeyError(
                f"curve {crv!r} is not supported (P-256, P-384, P-521, P-256K)",
                reason="unsupported_curve",
            )
        if "d" not in jwk:
            raise TargetKeyError("the JWK holds only a public key", reason="bad_key_file")
        curve = type_for("EC", crv=crv).curve()
        try:
            key = ec.derive_private_key(_b64url_int(jwk, "d"), curve)
        except ValueError:
            raise TargetKeyError("the EC JWK is inconsistent", reason="bad_key_file") from None
        pub = key.public_key().public_numbers()
        if (pub.x, pub.y) != (_b64url_int(jwk, "x"), _b64url_int(jwk, "y")):
            raise TargetKeyError("the EC JWK's x/y do not match d", reason="bad_key_file")
        return _from_private_key(key)
    raise TargetKeyError(f"JWK kty {kty!r} is not supported (RSA, EC, oct)")


def load_target(
    data: bytes,
    *,
    key_type: str | None = None,
    passphrase: PassphraseProvider | None = None,
) -> TargetKey:
    """Read a target key from PEM/DER (PKCS#8, PKCS#1, SEC1), JWK JSON, or raw AES bytes.

    ``key_type="oct"`` reads raw AES key bytes. ``passphrase`` is called only for encrypted PEM.

    Raises:
        TargetKeyError: reasons ``bad_key_file``, ``bad_passphrase``, ``unsupported_target``,
            ``unsupported_curve``.
    """
    if len(data) > MAX_KEY_FILE_BYTES:
        raise TargetKeyError("the key file is too large", reason="bad_key_file")
    if key_type is not None and key_type.lower() in ("oct", "aes", "raw"):
        return from_oct(data)
    if key_type is not None:
        raise TargetKeyError("--key-type takes only 'oct' (other types are detected)")
    stripped = data.strip()
    if stripped.startswith(b"{"):
        try:
            jwk = json.loads(stripped)
        except (ValueError, UnicodeDecodeError):
            raise TargetKeyError(
                "the key file is not valid JWK JSON", reason="bad_key_file"
            ) from None
        if not isinstance(jwk, dict):
            raise TargetKeyError("the JWK must be a JSON object", reason="bad_key_file")
        return _from_jwk(jwk)
    if b"-----BEGIN" in stripped:
        return _from_private_key(_load_pem(stripped, passphrase))
    try:
        key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise TargetKeyError(
            "the DER key is encrypted; convert it to encrypted PEM or decrypt it in the HSM",
            reason="bad_key_file",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TargetKeyError(
            "the key file is not a private key in PEM, DER (PKCS#8, PKCS#1, SEC1) or JWK form; "
            "for raw AES bytes add --key-type oct",
            reason="bad_key_file",
        ) from None
    return _from_private_key(key)


def _load_pem(data: bytes, passphrase: PassphraseProvider | None) -> PrivateKeyTypes:
    if b"PRIVATE KEY-----" not in data:
        raise TargetKeyError(
            "the PEM file does not hold a private key "
            "(a public key or certificate cannot be imported)",
            reason="bad_key_file",
        )
    encrypted = b"ENCRYPTED" in data
    password = None
    if encrypted:
        if passphrase is None:
            raise TargetKeyError(
                "the key is encrypted and no passphrase was given", reason="bad_passphrase"
            )
        password = passphrase()
    try:
        return serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise TargetKeyError(
            "the PEM key is encrypted and needs a passphrase", reason="bad_passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        if encrypted:
            raise TargetKeyError(
                "wrong passphrase, or a corrupt encrypted key", reason="bad_passphrase"
            ) from None
        raise TargetKeyError("the PEM private key is malformed", reason="bad_key_file") from None
