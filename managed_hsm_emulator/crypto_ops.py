"""Cryptographic operations on key material: sign/verify, encrypt/decrypt, wrapKey/unwrapKey.

Algorithms as Key Vault names them. Signing takes a digest (the SDK hashes locally); ECDSA
signatures are JWS ``r || s``. Any mismatch of algorithm, key and input is a
:class:`BadParameterError` with reason ``bad_algorithm`` or ``bad_input``; failed decryption is
``decryption_failed``. Messages never contain key material or plaintexts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from .errors import BadParameterError
from .material import KeyMaterial

RandBytes = Callable[[int], bytes]
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_ALGS: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "ES256": ("P-256", hashes.SHA256),
    "ES384": ("P-384", hashes.SHA384),
    "ES512": ("P-521", hashes.SHA512),
    "ES256K": ("P-256K", hashes.SHA256),
}
_AES_BLOCK = 16
_GCM_IV = 12


@dataclass(frozen=True)
class EncryptResult:
    """Ciphertext plus the IV/tag/AAD the caller needs to decrypt."""

    value: bytes
    iv: bytes | None = None
    tag: bytes | None = None
    aad: bytes | None = None


def _bad_alg(alg: str, material: KeyMaterial, what: str) -> BadParameterError:
    return BadParameterError(
        f"algorithm {alg!r} cannot be used to {what} with a {material.describe()} key",
        reason="bad_algorithm",
    )


def _rsa(material: KeyMaterial, alg: str, what: str) -> rsa.RSAPrivateKey:
    if material.rsa_key is None:
        raise _bad_alg(alg, material, what)
    return material.rsa_key


def _aes(material: KeyMaterial, alg: str, what: str, bits: int) -> bytes:
    if material.aes_key is None or material.key_size != bits:
        raise _bad_alg(alg, material, what)
    return material.aes_key.reveal()


def _rsa_sig_padding(alg: str, hash_alg: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    if alg.startswith("RS"):
        return padding.PKCS1v15()
    return padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)


def _sig_setup(material: KeyMaterial, alg: str, digest: bytes) -> hashes.HashAlgorithm:
    if alg in _EC_ALGS:
        crv, hash_cls = _EC_ALGS[alg]
        if material.ec_key is None or material.crv != crv:
            raise _bad_alg(alg, material, "sign or verify")
        hash_alg: hashes.HashAlgorithm = hash_cls()
    elif alg[:2] in ("RS", "PS") and alg[2:] in _HASHES:
        _rsa(material, alg, "sign or verify")
        hash_alg = _HASHES[alg[2:]]()
    else:
        raise _bad_alg(alg, material, "sign or verify")
    if len(digest) != hash_alg.digest_size:
        raise BadParameterError(
            f"{alg} needs a {hash_alg.digest_size}-byte digest, got {len(digest)} bytes",
            reason="bad_input",
        )
    return hash_alg


def sign(material: KeyMaterial, alg: str, digest: bytes) -> bytes:
    """Sign a digest (RS*/PS*/ES*; ECDSA as JWS ``r || s``).

    Raises:
        BadParameterError: reasons ``bad_algorithm``, ``bad_input``.
    """
    hash_alg = _sig_setup(material, alg, digest)
    prehashed = utils.Prehashed(hash_alg)
    if material.ec_key is not None:
        der = material.ec_key.sign(digest, ec.ECDSA(prehashed))
        r, s = utils.decode_dss_signature(der)
        size = (material.ec_key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return _rsa(material, alg, "sign").sign(digest, _rsa_sig_padding(alg, hash_alg), prehashed)


def verify(material: KeyMaterial, alg: str, digest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``digest`` is valid.

    Raises:
        BadParameterError: reasons ``bad_algorithm``, ``bad_input``.
    """
    hash_alg = _sig_setup(material, alg, digest)
    prehashed = utils.Prehashed(hash_alg)
    try:
        if material.ec_key is not None:
            size = (material.ec_key.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                return False
            der = utils.encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            material.ec_key.public_key().verify(der, digest, ec.ECDSA(prehashed))
        else:
            _rsa(material, alg, "verify").public_key().verify(
                signature, digest, _rsa_sig_padding(alg, hash_alg), prehashed
            )
    except InvalidSignature:
        return False
    return True


def _rsa_enc_padding(alg: str) -> padding.AsymmetricPadding | None:
    if alg == "RSA-OAEP":
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303  # RSA-OAEP is defined with SHA-1
    if alg == "RSA-OAEP-256":
        return padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
    if alg == "RSA1_5":
        return padding.PKCS1v15()
    return None


def _aes_bits(alg: str, suffix: str) -> int | None:
    if alg.startswith("A") and alg[1:4] in ("128", "192", "256") and alg[4:] == suffix:
        return int(alg[1:4])
    return None


def encrypt(
    material: KeyMaterial,
    alg: str,
    plaintext: bytes,
    *,
    iv: bytes | None = None,
    aad: bytes | None = None,
    randbytes: RandBytes = os.urandom,
) -> EncryptResult:
    """Encrypt with RSA-OAEP(-256)/RSA1_5, A*CBC (no padding), A*CBCPAD or A*GCM.

    Raises:
        BadParameterError: reasons ``bad_algorithm``, ``bad_input``.
    """
    rsa_pad = _rsa_enc_padding(alg)
    if rsa_pad is not None:
        key = _rsa(material, alg, "encrypt")
        try:
            return EncryptResult(key.public_key().encrypt(plaintext, rsa_pad))
        except ValueError:
            raise BadParameterError(
                f"the plaintext is too long for {alg}", reason="bad_input"
            ) from None
    if (bits := _aes_bits(alg, "GCM")) is not None:
        key_bytes = _aes(material, alg, "encrypt", bits)
        nonce = randbytes(_GCM_IV)
        sealed = AESGCM(key_bytes).encrypt(nonce, plaintext, aad)
        return EncryptResult(sealed[:-16], iv=nonce, tag=sealed[-16:], aad=aad)
    pad = alg.endswith("CBCPAD")
    bits = _aes_bits(alg, "CBCPAD" if pad else "CBC")
    if bits is None:
        raise _bad_alg(alg, material, "encrypt")
    key_bytes = _aes(material, alg, "encrypt", bits)
    if iv is None or len(iv) != _AES_BLOCK:
        raise BadParameterError(f"{alg} needs a 16-byte iv", reason="bad_input")
    if pad:
        padder = sym_padding.PKCS7(128).padder()
        plaintext = padder.update(plaintext) + padder.finalize()
    elif len(plaintext) % _AES_BLOCK:
        raise BadParameterError(
            f"{alg} (no padding) needs a plaintext that is a multiple of 16 bytes",
            reason="bad_input",
        )
    enc = Cipher(algorithms.AES(key_bytes), modes.CBC(iv)).encryptor()
    return EncryptResult(enc.update(plaintext) + enc.finalize(), iv=iv)


def _failed(alg: str) -> BadParameterError:
    return BadParameterError(f"{alg} decryption failed", reason="decryption_failed")


def decrypt(
    material: KeyMaterial,
    alg: str,
    ciphertext: bytes,
    *,
    iv: bytes | None = None,
    aad: bytes | None = None,
    tag: bytes | None = None,
) -> bytes:
    """Inverse of :func:`encrypt`.

    Raises:
        BadParameterError: reasons ``bad_algorithm``, ``bad_input``, ``decryption_failed``.
    """
    rsa_pad = _rsa_enc_padding(alg)
    if rsa_pad is not None:
        key = _rsa(material, alg, "decrypt")
        try:
            return key.decrypt(ciphertext, rsa_pad)
        except ValueError:
            raise _failed(alg) from None
    if (bits := _aes_bits(alg, "GCM")) is not None:
        key_bytes = _aes(material, alg, "decrypt", bits)
        if iv is None or tag is None or len(tag) != 16:  # GCM tag length
            raise BadParameterError(
                f"{alg} decryption needs iv and a 16-byte tag", reason="bad_input"
            )
        try:
            return AESGCM(key_bytes).decrypt(iv, ciphertext + tag, aad)
        except (InvalidTag, ValueError):
            raise _failed(alg) from None
    pad = alg.endswith("CBCPAD")
    bits = _aes_bits(alg, "CBCPAD" if pad else "CBC")
    if bits is None:
        raise _bad_alg(alg, material, "decrypt")
    key_bytes = _aes(material, alg, "decrypt", bits)
    if iv is None or len(iv) != _AES_BLOCK:
        raise BadParameterError(f"{alg} needs a 16-byte iv", reason="bad_input")
    if len(ciphertext) % _AES_BLOCK or not ciphertext:
        raise BadParameterError(
            f"{alg} ciphertext must be whole 16-byte blocks", reason="bad_input"
        )
    dec = Cipher(algorithms.AES(key_bytes), modes.CBC(iv)).decryptor()
    plain = dec.update(ciphertext) + dec.finalize()
    if not pad:
        return plain
    unpadder = sym_padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(plain) + unpadder.finalize()
    except ValueError:
        raise _failed(alg) from None


def wrap_key(material: KeyMaterial, alg: str, key: bytes) -> bytes:
    """Wrap ``key`` with RSA-OAEP(-256)/RSA1_5 or A128KW/A192KW/A256KW (RFC 3394).

    Raises:
        BadParameterError: reasons ``bad_algorithm``, ``bad_input``.
    """
    if _rsa_enc_padding(alg) is not None:
        return encrypt(material, alg, key).value
    bits = _aes_bits(alg, "KW")
    if bits is None:
        raise _bad_alg(alg, material, "wrap")
    kek = _aes(material, alg, "wrap", bits)
    try:
        return aes_key_wrap(kek, key)
    except ValueError:
        raise BadParameterError(
            f"{alg} wraps keys of at least 16 bytes in 8-byte steps", reason="bad_input"
        ) from None


def unwrap_key(material: KeyMaterial, alg: str, wrapped: bytes) -> bytes:
    """Inverse of :func:`wrap_key`.

    Raises:
        BadParameterError: reasons ``bad_algorithm``, ``decryption_failed``.
    """
    if _rsa_enc_padding(alg) is not None:
        return decrypt(material, alg, wrapped)
    bits = _aes_bits(alg, "KW")
    if bits is None:
        raise _bad_alg(alg, material, "unwrap")
    kek = _aes(material, alg, "unwrap", bits)
    try:
        return aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise _failed(alg) from None
