"""Recognise plaintext key material where a ``.byok`` package (or its manifest) is expected.

A private key or a raw AES key must never reach a connected machine unwrapped. ``byok upload``
and ``byok import`` refuse such a file before anything is sent, and ``byok-package inspect``
says what it is; both with the reason ``plaintext_key``, and neither ever prints a byte of it.

What counts: PEM of any private key (PKCS#8, PKCS#1, SEC1, encrypted, OpenSSH, PGP), PuTTY
key files, DER private keys (PKCS#8 plain or encrypted, PKCS#1, SEC1), PKCS#12 files, JSON
holding a JWK with private members (``d``, ``p``, ``q``, ``dp``, ``dq``, ``qi``, ``k``), and
short non-JSON files the size of a raw AES key (16, 24 or 32 bytes, or that many bytes in hex
or base64 text). The last are ambiguous (they may be any 16 bytes), but they are never a
valid package either, so refusing them loses nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from .errors import ByokError

PLAINTEXT_KEY = "plaintext_key"
_PEM_PRIVATE = re.compile(rb"-----BEGIN ([A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?)-----")
_JWK_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")
_RAW_KEY_BYTES = (16, 24, 32)
_HEX = re.compile(rb"[0-9a-fA-F]+")
_B64 = re.compile(rb"[A-Za-z0-9+/_-]+={0,2}")
# the ContentInfo OID of PKCS#7 data/encryptedData (1.2.840.113549.1.7.x) a PFX starts with
_PKCS7_OID = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07"
_MAX_JSON_DEPTH = 8


def plaintext_key_kind(data: bytes) -> str | None:
    """What kind of plaintext key ``data`` is, in words that quote none of it; None when it
    is none of the forms in the module docstring. Needs only the bytes; never raises."""
    found = _PEM_PRIVATE.search(data)
    if found:
        return f"a PEM private key ({found.group(1).decode('ascii')})"
    if data.lstrip().startswith(b"PuTTY-User-Key-File-"):
        return "a PuTTY private key file"
    doc = _json(data)
    if doc is not _NOT_JSON:
        return "a JWK with private key members" if _has_private_jwk(doc, 0) else None
    return _der_kind(data) or _raw_kind(data)


def refuse_plaintext_key(data: bytes, path: str, *, advice: str) -> None:
    """Refuse ``data`` read from ``path`` if it holds plaintext key material.

    Raises:
        ByokError: ``plaintext_key``; the message names the file and the kind of key, says
            ``advice`` (what happened to it), and never quotes the content.
    """
    kind = plaintext_key_kind(data)
    if kind is not None:
        raise ByokError(
            f"STOP: {path} holds {kind}, not a wrapped .byok package: {advice}. Wrap keys on "
            "the offline machine (`byok-package wrap --key FILE ...`) and carry only the .byok "
            "and its manifest; if this key was ever on a connected machine, treat it as exposed",
            reason=PLAINTEXT_KEY,
        )


_NOT_JSON: Any = object()


def _json(data: bytes) -> Any:
    stripped = data.strip()
    if not stripped.startswith((b"{", b"[")):
        return _NOT_JSON
    try:
        return json.loads(stripped)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _NOT_JSON


def _has_private_jwk(node: Any, depth: int) -> bool:
    if depth > _MAX_JSON_DEPTH:
        return False
    if isinstance(node, dict):
        if "kty" in node and any(m in node for m in _JWK_PRIVATE_MEMBERS):
            return True
        return any(_has_private_jwk(v, depth + 1) for v in list(node.values())[:1000])
    if isinstance(node, list):
        return any(_has_private_jwk(v, depth + 1) for v in node[:1000])
    return False


def _der_kind(data: bytes) -> str | None:
    if not data.startswith(b"\x30"):
        return None
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:  # a password is needed: encrypted PKCS#8
        return "an encrypted private key (DER PKCS#8)"
    except (ValueError, UnsupportedAlgorithm):
        pass
    else:
        return "a DER private key (PKCS#8, PKCS#1 or SEC1)"
    body = _after_sequence_header(data)
    if (
        body is not None
        and data[body : body + 4] == b"\x02\x01\x03\x30"
        and _PKCS7_OID in data[body : body + 32]
    ):
        return "a PKCS#12 file (it holds private keys)"
    return None


def _after_sequence_header(data: bytes) -> int | None:
    """The offset of a DER SEQUENCE's content (definite lengths only)."""
    if len(data) < 2:
        return None
    first = data[1]
    if first < 0x80:
        return 2
    count = first & 0x7F
    return 2 + count if 0 < count <= 4 and len(data) > 2 + count else None


def _raw_kind(data: bytes) -> str | None:
    if len(data) in _RAW_KEY_BYTES:
        return f"{len(data)} bytes, the size of a raw AES-{len(data) * 8} key"
    text = data.strip()
    if len(text) > 64:
        return None
    if _HEX.fullmatch(text) and len(text) // 2 in _RAW_KEY_BYTES and len(text) % 2 == 0:
        return f"hex text of {len(text) // 2} bytes, the size of a raw AES key"
    if _B64.fullmatch(text):
        try:
            decoded = base64.b64decode(
                text.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(text) % 4)
            )
        except (binascii.Error, ValueError):
            return None
        if len(decoded) in _RAW_KEY_BYTES:
            return f"base64 text of {len(decoded)} bytes, the size of a raw AES key"
    return None
