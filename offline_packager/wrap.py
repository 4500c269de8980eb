"""CKM_RSA_AES_KEY_WRAP: RSA-OAEP(SHA-1) of a fresh AES-256 key, then AES-KWP (RFC 5649).

ciphertext = RSA-OAEP(KEK, aes_key) || AES-KWP(aes_key, target_plaintext)
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from .errors import PackageFormatError, WrapError
from .secret import SecretBytes

AES_KEY_BYTES = 32
RandBytes = Callable[[int], bytes]


def oaep_sha1() -> padding.OAEP:
    """RSA-OAEP with SHA-1 and MGF1-SHA-1, empty label, as CKM_RSA_AES_KEY_WRAP specifies."""
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303  # mandated by the BYOK format


def kwp_wrap(aes_key: SecretBytes, plaintext: SecretBytes) -> bytes:
    """AES Key Wrap with Padding (RFC 5649)."""
    return aes_key_wrap_with_padding(aes_key.reveal(), plaintext.reveal())


def kwp_unwrap(aes_key: SecretBytes, wrapped: bytes) -> SecretBytes:
    """Inverse of :func:`kwp_wrap`.

    Raises:
        WrapError: the integrity check failed (reason ``kwp_integrity``).
    """
    try:
        return SecretBytes(aes_key_unwrap_with_padding(aes_key.reveal(), wrapped), label="target")
    except (InvalidUnwrap, ValueError):
        raise WrapError(
            "AES key unwrap failed its integrity check (tampered ciphertext or wrong KEK)",
            reason="kwp_integrity",
        ) from None


def wrap_target(
    kek: rsa.RSAPublicKey, plaintext: SecretBytes, *, randbytes: RandBytes = os.urandom
) -> bytes:
    """Wrap ``plaintext`` under ``kek``; a fresh AES-256 key is drawn from ``randbytes``."""
    with SecretBytes(randbytes(AES_KEY_BYTES), label="ephemeral AES key") as aes_key:
        if len(aes_key) != AES_KEY_BYTES:
            raise WrapError("randomness source returned the wrong length", reason="internal")
        rsa_block = kek.encrypt(aes_key.reveal(), oaep_sha1())
        return rsa_block + kwp_wrap(aes_key, plaintext)


def split_ciphertext(ciphertext: bytes, modulus_bytes: int) -> tuple[bytes, bytes]:
    """Split into the RSA block and the KWP block.

    Raises:
        PackageFormatError: too short, or KWP part not a positive multiple of 8
            (reason ``ciphertext_length_mismatch``).
    """
    kwp = ciphertext[modulus_bytes:]
    if len(ciphertext) <= modulus_bytes or len(kwp) < 16 or len(kwp) % 8:
        raise PackageFormatError(
            f"ciphertext of {len(ciphertext)} bytes cannot be a {modulus_bytes}-byte RSA block "
            "followed by an AES-KWP block (a multiple of 8 bytes, at least 16)",
            reason="ciphertext_length_mismatch",
        )
    return ciphertext[:modulus_bytes], kwp


def unwrap_target(kek_private: rsa.RSAPrivateKey, ciphertext: bytes) -> SecretBytes:
    """Recover the target plaintext (emulator, tests). Never logs or echoes key material.

    Raises:
        PackageFormatError: lengths inconsistent with the KEK.
        WrapError: RSA-OAEP decryption or the KWP integrity check failed.
    """
    k = (kek_private.key_size + 7) // 8
    rsa_block, kwp = split_ciphertext(ciphertext, k)
    try:
        aes_raw = kek_private.decrypt(rsa_block, oaep_sha1())
    except ValueError:
        raise WrapError(
            "RSA-OAEP decryption of the wrapped AES key failed (wrong KEK or tampered block)",
            reason="rsa_unwrap_failed",
        ) from None
    with SecretBytes(aes_raw, label="ephemeral AES key") as aes_key:
        if len(aes_key) not in (16, 24, 32):
            raise WrapError(
                "the unwrapped AES key has an invalid length", reason="rsa_unwrap_failed"
            )
        return kwp_unwrap(aes_key, kwp)
