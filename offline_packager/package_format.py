"""The .byok key transfer package: strict reading and exact writing.

Format (byok-facts.md section 1)::

    {"schema_version": "1.0.0",
     "header": {"kid": "<versioned KEK kid>", "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
     "ciphertext": "<base64url>", "generator": "<free text>"}
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import PackageFormatError
from .guard import refuses

SCHEMA_VERSION = "1.0.0"
ALG = "dir"
ENC = "CKM_RSA_AES_KEY_WRAP"
MAX_PACKAGE_BYTES = 64 * 1024
_TOP_FIELDS = frozenset({"schema_version", "header", "ciphertext", "generator"})
_HEADER_FIELDS = frozenset({"kid", "alg", "enc"})
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_MAX_GENERATOR = 1024
_MAX_INT_DIGITS = 64  # no field of a package is a number: a long one is only ever an attack


def _malformed(message: str) -> PackageFormatError:
    return PackageFormatError(message)


def _bad_base64(message: str) -> PackageFormatError:
    return PackageFormatError(message, reason="bad_base64")


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url, as this project writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@refuses(_bad_base64)
def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without ``=`` padding; reject anything else (whitespace, a
    trailing newline, characters outside the alphabet).

    Raises:
        PackageFormatError: reason ``bad_base64``.
    """
    if (
        not isinstance(text, str)
        or not _B64URL_RE.fullmatch(text)
        or len(text.rstrip("=")) % 4 == 1
    ):
        raise PackageFormatError("ciphertext is not valid base64url", reason="bad_base64")
    stripped = text.rstrip("=")
    if text != stripped and len(text) % 4:
        raise PackageFormatError("ciphertext has wrong base64url padding", reason="bad_base64")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise PackageFormatError("ciphertext is not valid base64url", reason="bad_base64") from None


@dataclass(frozen=True)
class ByokPackage:
    """A parsed package. ``ciphertext`` is wrapped key material: never log it."""

    kid: str
    ciphertext: bytes
    generator: str | None
    schema_version: str = SCHEMA_VERSION
    alg: str = ALG
    enc: str = ENC

    def __repr__(self) -> str:
        return (
            f"ByokPackage(kid={self.kid!r}, ciphertext=<{len(self.ciphertext)} bytes>, "
            f"generator={self.generator!r})"
        )


def encode_package(kid: str, ciphertext: bytes, generator: str) -> bytes:
    """Serialize a package exactly in Azure's format (unpadded base64url, UTF-8 JSON)."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "header": {"kid": kid, "alg": ALG, "enc": ENC},
        "ciphertext": b64url_encode(ciphertext),
        "generator": generator,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def shown(names: Any, *, limit: int = 5, width: int = 40) -> str:
    """Attacker-chosen names rendered safely for a message: quoted, truncated, a few at most."""
    items = sorted(str(n) for n in names)
    text = ", ".join(repr(n[:width]) + ("..." if len(n) > width else "") for n in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PackageFormatError(f"duplicate JSON field {shown([key])}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise PackageFormatError(f"invalid JSON constant {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 is Infinity spelled differently
        raise PackageFormatError("a JSON number is out of range")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise PackageFormatError(f"a JSON number has more than {_MAX_INT_DIGITS} digits")
    return int(text)


@refuses(_malformed)
def load_json_strict(data: bytes, *, what: str = "package") -> Any:
    """Parse UTF-8 JSON strictly: no duplicate keys, no NaN/Infinity (nor 1e999), no huge
    integers.

    Raises:
        PackageFormatError: reason ``malformed_package``.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PackageFormatError(f"the {what} is not UTF-8 text") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except json.JSONDecodeError as exc:
        raise PackageFormatError(
            f"the {what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise PackageFormatError(f"the {what} JSON is nested too deeply") from None


@refuses(_malformed)
def parse_package(data: bytes, *, max_bytes: int = MAX_PACKAGE_BYTES) -> ByokPackage:
    """Parse a .byok file strictly (pretty-printed, CRLF and padded base64url accepted).

    The kid's form is checked by :func:`offline_packager.kid.parse_kid`, not here.

    Raises:
        PackageFormatError: reasons ``too_large``, ``malformed_package``,
            ``unsupported_schema_version``, ``wrong_alg``, ``wrong_enc``, ``bad_base64``.
    """
    if len(data) > max_bytes:
        raise PackageFormatError(
            f"package is {len(data)} bytes, over the {max_bytes}-byte limit", reason="too_large"
        )
    doc = load_json_strict(data)
    if not isinstance(doc, dict):
        raise PackageFormatError("the package must be a JSON object")
    missing = sorted({"schema_version", "header", "ciphertext"} - doc.keys())
    if missing:
        raise PackageFormatError(f"the package lacks field(s): {', '.join(missing)}")
    unknown = doc.keys() - _TOP_FIELDS
    if unknown:
        raise PackageFormatError(f"the package has unknown field(s): {shown(unknown)}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise PackageFormatError(
            f"schema_version must be {SCHEMA_VERSION!r}", reason="unsupported_schema_version"
        )
    header = doc["header"]
    if not isinstance(header, dict):
        raise PackageFormatError("header must be a JSON object")
    missing = sorted(_HEADER_FIELDS - header.keys())
    if missing:
        raise PackageFormatError(f"header lacks field(s): {', '.join(missing)}")
    unknown = header.keys() - _HEADER_FIELDS
    if unknown:
        raise PackageFormatError(f"header has unknown field(s): {shown(unknown)}")
    kid, alg, enc = header["kid"], header["alg"], header["enc"]
    if not isinstance(kid, str):
        raise PackageFormatError("header.kid must be a string", reason="bad_kid")
    if alg != ALG:
        raise PackageFormatError(f"header.alg must be {ALG!r}", reason="wrong_alg")
    if enc != ENC:
        raise PackageFormatError(f"header.enc must be {ENC!r}", reason="wrong_enc")
    ciphertext = doc["ciphertext"]
    if not isinstance(ciphertext, str) or not ciphertext:
        raise PackageFormatError("ciphertext must be a non-empty string")
    generator = doc.get("generator")
    if generator is not None and (
        not isinstance(generator, str) or len(generator) > _MAX_GENERATOR
    ):
        raise PackageFormatError("generator must be a string of at most 1024 characters")
    return ByokPackage(
        kid=kid,
        ciphertext=b64url_decode(ciphertext),
        generator=generator,
    )
