"""Who signs trail batches: the pipeline with an EC P-256 key inside the Managed HSM (the
Function identity may only ``sign`` with it; nobody can export it), a person with a key of their
own (a key in their HSM, or locally an EC P-256 key file). And the check of such a signature.

Key ids: an HSM key is named by its versioned kid; a key file by ``file:<SPKI SHA-256>``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from byok_pipeline.core.errors import ConfigError, TransientError


def spki_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def p256_public_key(jwk: Any) -> ec.EllipticCurvePublicKey:
    """The EC P-256 public key of a Key Vault JWK (its ``x`` and ``y``).

    Raises:
        ValueError: the coordinates are missing or not a point of P-256.
    """
    if not jwk.x or not jwk.y:
        raise ValueError("the key has no EC coordinates")
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(jwk.x, "big"), int.from_bytes(jwk.y, "big"), ec.SECP256R1()
    ).public_key()


def verify_digest(public_key: Any, digest: bytes, value: bytes) -> bool:
    """Whether ``value`` (``r || s``, 64 bytes) is an ES256 signature of the SHA-256 ``digest``
    by ``public_key`` (an EC P-256 public key; any other key verifies nothing)."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return False
    if len(value) != 64 or len(digest) != 32:
        return False
    der = utils.encode_dss_signature(
        int.from_bytes(value[:32], "big"), int.from_bytes(value[32:], "big")
    )
    try:
        public_key.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class FileSigner:
    """A local EC P-256 key (a person's key file; the local stack's pipeline key). The private
    key never leaves this object: ``repr`` shows the key id only."""

    _key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def from_pem(cls, path: str | Path) -> FileSigner:
        """Raises: ConfigError: unreadable, encrypted, or not an EC P-256 private key."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM key"
            raise ConfigError(f"audit signing key {path}: {why}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError(f"audit signing key {path} is not an EC P-256 key")
        return cls(key)

    @property
    def kid(self) -> str:
        return f"file:{self.spki_sha256}"

    @property
    def spki_sha256(self) -> str:
        return spki_sha256(self._key.public_key())

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        der = self._key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        r, s = utils.decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class HsmSigner:
    """An EC P-256 key inside Managed HSM, used through the SDK's ``CryptographyClient``.
    Needs ``keys/sign/action`` on that key only (the Function identity's role on it).

    ``client`` is a ``CryptographyClient`` for the versioned kid; ``public_key`` the key's
    public half (read once when the signer is built)."""

    def __init__(self, client: Any, kid: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self._client = client
        self._kid = kid
        self._public = public_key
        self._spki = spki_sha256(public_key)

    def __repr__(self) -> str:
        return f"HsmSigner({self._kid})"

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def spki_sha256(self) -> str:
        return self._spki

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_digest(self, digest: bytes) -> bytes:
        """Raises: TransientError: the HSM did not sign (the append is not made)."""
        from azure.core.exceptions import AzureError
        from azure.keyvault.keys.crypto import SignatureAlgorithm

        try:
            result = self._client.sign(SignatureAlgorithm.es256, digest)
        except AzureError as exc:
            from azure.core.exceptions import HttpResponseError

            from byok_pipeline.adapters.transient import is_throttling, retry_after_seconds

            throttled = isinstance(exc, HttpResponseError) and is_throttling(exc)
            raise TransientError(
                f"the HSM did not sign the audit batch: {type(exc).__name__}"
                + (" (throttled)" if throttled else ""),
                reason="audit_failed",
                throttled=throttled,
                retry_after=retry_after_seconds(exc)
                if isinstance(exc, HttpResponseError) and throttled
                else None,
            ) from None
        value = bytes(result.signature)
        if not verify_digest(self._public, digest, value):
            raise TransientError(
                "the HSM's audit signature does not verify with the signing key",
                reason="audit_failed",
            )
        return value
