"""At-rest encryption of key material: AES-256-GCM under ``DIR/master.key``.

Each sealed blob is ``nonce (12 bytes) || ciphertext+tag`` and is bound to the key name and
version through the associated data, so blobs cannot be swapped between keys. The rest of a key
record (key_ops, kty, public JWK, attributes, tags, deleted state) is covered by an HMAC-SHA256
over the whole record (:meth:`Sealer.record_mac`), under a key derived from the master key with
HKDF, so an edit of a key file made without the master key is detected at start.

The master key sits next to the data it protects: this keeps key material out of plain sight in
the files (and out of backups made without it) and makes accidental or naive edits visible; it
is not an HSM's protection against someone who can read the data directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from offline_packager.secret import SecretBytes

from .errors import EmulatorError

MASTER_KEY_BYTES = 32
_NONCE_BYTES = 12
_AAD_PREFIX = b"managed-hsm-emulator/v1/"
_RECORD_MAC_INFO = b"managed-hsm-emulator/v1/record-mac"


class SealError(EmulatorError):
    """Sealed key material cannot be opened (wrong master key, damaged or swapped file)."""

    reason = "sealed_material_damaged"


class Sealer:
    """Seals and opens key material under one master key."""

    def __init__(
        self, master_key: SecretBytes, *, randbytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError("the master key must be 32 bytes")
        self._aead = AESGCM(master_key.reveal())
        self._mac_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_RECORD_MAC_INFO
        ).derive(master_key.reveal())
        self._randbytes = randbytes

    def __repr__(self) -> str:
        return "<Sealer AES-256-GCM, key redacted>"

    @staticmethod
    def _aad(name: str, version: str) -> bytes:
        return _AAD_PREFIX + f"{name.lower()}/{version}".encode("ascii")

    def record_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of a key record's canonical bytes (see :mod:`.store`)."""
        return hmac.new(self._mac_key, data, hashlib.sha256).digest()

    def record_mac_ok(self, data: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is :meth:`record_mac` of ``data`` (constant time)."""
        return hmac.compare_digest(self.record_mac(data), mac)

    def seal(self, plaintext: SecretBytes, *, name: str, version: str) -> bytes:
        """Encrypt key material for storage under ``name``/``version``."""
        nonce = self._randbytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext.reveal(), self._aad(name, version))

    def open(self, blob: bytes, *, name: str, version: str) -> SecretBytes:
        """Decrypt key material stored under ``name``/``version``.

        Raises:
            SealError: the blob is damaged, swapped, or sealed under another master key.
        """
        if len(blob) < _NONCE_BYTES + 16:
            raise SealError(f"sealed material of key {name}/{version} is truncated")
        try:
            plain = self._aead.decrypt(
                blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._aad(name, version)
            )
        except InvalidTag:
            raise SealError(
                f"sealed material of key {name}/{version} fails its integrity check "
                "(damaged file or another master.key)"
            ) from None
        return SecretBytes(plain, label=f"key {name}/{version}")
