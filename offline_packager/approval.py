"""Signed import approvals: detached JWS signatures over a package's manifest (dual control).

An approval file ``NAME.approval-ID.json`` is a JWS (RFC 7515) in the flattened JSON
serialization with a detached payload (RFC 7515 Appendix F)::

    {"protected": "<base64url(protected header JSON)>", "signature": "<base64url(signature)>"}

The payload is the manifest file's exact bytes. The signing input is
``ASCII(protected) || "." || base64url(manifest bytes)``; base64url never carries padding.
The protected header has exactly these members (no others, so no ``crit``, ``jwk``, ``b64``)::

    alg                   ES256 | ES384 | EdDSA (Ed25519) | PS256 (RSA-PSS, SHA-256, salt 32)
    typ                   "byok-approval+jws"
    kid                   the approver id
    byok_key_name         the Managed HSM key name approved
    byok_package_sha256   SHA-256 of the .byok file (lower-case hex)
    byok_manifest_sha256  SHA-256 of the manifest file
    byok_signed_at        RFC 3339 UTC, YYYY-MM-DDTHH:MM:SSZ
    byok_not_after        the same form, later than byok_signed_at

ECDSA signatures are JWS's raw ``r || s`` (each the curve's byte length), not DER.
The full description, the approver's ceremony and an auditor's OpenSSL-only check are in
``docs/approvals.md``. Every refusal is an :class:`ApprovalError` with a stable reason:
``approval_invalid``, ``approval_wrong_package``, ``approval_expired``, ``approvers_invalid``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .errors import ApprovalError, ByokError, PackageFormatError, SignerKeyError
from .kek import spki_sha256
from .manifest import parse_manifest
from .package_format import b64url_encode, load_json_strict, shown

__all__ = [
    "ALGORITHMS",
    "APPROVAL_TYPE",
    "APPROVER_ID_RE",
    "CLOCK_SKEW",
    "MAX_APPROVAL_BYTES",
    "ApprovalClaims",
    "ApprovalError",
    "ApprovalSigner",
    "Approver",
    "alg_for_key",
    "approval_signing_input",
    "load_approvers",
    "load_signer_key",
    "make_approver",
    "parse_approval",
    "parse_approvers",
    "sign_approval",
    "software_signer",
    "verify_approval",
]

APPROVAL_TYPE = "byok-approval+jws"
MAX_APPROVAL_BYTES = 16 * 1024
#: How far in the future ``byok_signed_at`` may lie (the signer's clock may run ahead).
CLOCK_SKEW = timedelta(minutes=5)
#: The accepted JWS algorithms; anything else (``none``, ``HS256``, ``RS256``...) is refused.
ALGORITHMS = ("ES256", "ES384", "EdDSA", "PS256")
MIN_RSA_BITS = 3072
PSS_SALT_BYTES = 32
MAX_APPROVERS_BYTES = 1024 * 1024
MAX_APPROVERS = 1000
_MAX_PEM_CHARS = 8192
_MAX_DESCRIPTION = 2000
_MAX_DEPTH = 4  # approval: object > strings; approvers: object > list > object > strings
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

APPROVER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_KEY_NAME_RE = re.compile(r"[0-9a-zA-Z-]{1,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_HEADER_FIELDS = (
    "alg",
    "typ",
    "kid",
    "byok_key_name",
    "byok_package_sha256",
    "byok_manifest_sha256",
    "byok_signed_at",
    "byok_not_after",
)
_CURVE_ALG = {"secp256r1": ("ES256", hashes.SHA256), "secp384r1": ("ES384", hashes.SHA384)}
_EC_BYTES = {"ES256": 32, "ES384": 48}
_ED25519_SIGNATURE_BYTES = 64

ApproverPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
SignerPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PassphraseProvider = Callable[[], bytes]


@dataclass(frozen=True)
class ApprovalClaims:
    """What an approval says (its protected header). Parsed is not verified: see
    :func:`verify_approval`."""

    approver_id: str
    key_name: str
    package_sha256: str
    manifest_sha256: str
    signed_at: datetime
    not_after: datetime
    alg: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form, with the header's member names."""
        return {
            "kid": self.approver_id,
            "alg": self.alg,
            "byok_key_name": self.key_name,
            "byok_package_sha256": self.package_sha256,
            "byok_manifest_sha256": self.manifest_sha256,
            "byok_signed_at": format_time(self.signed_at),
            "byok_not_after": format_time(self.not_after),
        }


@dataclass(frozen=True)
class Approver:
    """One approver: an id, a public key (EC P-256/P-384, Ed25519, RSA >= 3072), its SPKI
    SHA-256, and optionally the time after which their approvals are no longer accepted.

    Build it with :func:`make_approver` or :func:`parse_approvers`, which check the key."""

    id: str
    public_key: ApproverPublicKey = field(repr=False)
    spki_sha256: str
    expires: datetime | None = None


class ApprovalSigner(Protocol):
    """Produces the JWS signature (ECDSA: raw ``r || s``) over a signing input."""

    @property
    def alg(self) -> str: ...

    @property
    def spki_sha256(self) -> str: ...

    def sign(self, signing_input: bytes) -> bytes:
        """The JWS-form signature over ``signing_input``."""
        ...


# --- small helpers ----------------------------------------------------------------------------


def _b64url_decode(value: object, what: str) -> bytes:
    """Strict unpadded, canonical base64url (one encoding per byte string).

    Raises:
        ApprovalError: ``approval_invalid``.
    """
    if not isinstance(value, str) or not _B64URL_RE.fullmatch(value) or len(value) % 4 == 1:
        raise ApprovalError(f"{what} is not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ApprovalError(f"{what} is not unpadded base64url") from None
    if b64url_encode(raw) != value:
        raise ApprovalError(f"{what} is not canonical base64url (stray trailing bits)")
    return raw


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with second precision: ``YYYY-MM-DDTHH:MM:SSZ``."""
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(value: object, what: str, *, reason: str = "approval_invalid") -> datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SSZ`` (UTC).

    Raises:
        ApprovalError: with ``reason`` when the value has another form or is no real time.
    """
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise ApprovalError(
            f"{what}: must be an RFC 3339 UTC time YYYY-MM-DDTHH:MM:SSZ", reason=reason
        )
    try:
        return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ApprovalError(f"{what}: {value} is not a valid time", reason=reason) from None


def _require_aware(moment: datetime, what: str) -> None:
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")


def _nesting_depth(text: str) -> int:
    """The deepest nesting of JSON arrays/objects in ``text`` (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _load_json(data: bytes, what: str, *, reason: str, ascii_only: bool) -> Any:
    """Strict JSON (no duplicate keys, no NaN, at most ``_MAX_DEPTH`` levels).

    Raises:
        ApprovalError: with ``reason``.
    """
    if ascii_only and not data.isascii():
        raise ApprovalError(f"the {what} holds non-ASCII bytes", reason=reason)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApprovalError(f"the {what} is not UTF-8 text", reason=reason) from None
    if _nesting_depth(text) > _MAX_DEPTH:
        raise ApprovalError(f"the {what} JSON is nested too deeply", reason=reason)
    try:
        return load_json_strict(data, what=what)
    except PackageFormatError as exc:
        raise ApprovalError(exc.message, reason=reason) from None
    except (ValueError, RecursionError):  # e.g. an integer over Python's 4300-digit limit
        raise ApprovalError(f"the {what} is not acceptable JSON", reason=reason) from None


def alg_for_key(public_key: object) -> str:
    """The JWS alg an approver key signs with.

    Raises:
        SignerKeyError: the key is not EC P-256/P-384, Ed25519 or RSA >= 3072 (``bad_signer_key``).
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        entry = _CURVE_ALG.get(public_key.curve.name)
        if entry is None:
            raise SignerKeyError(
                f"EC curve {public_key.curve.name} is not accepted for approvals (P-256, P-384)"
            )
        return entry[0]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise SignerKeyError(f"RSA-{public_key.key_size} is too small (>= {MIN_RSA_BITS})")
        return "PS256"
    raise SignerKeyError(
        f"{type(public_key).__name__} keys are not accepted for approvals "
        "(EC P-256/P-384, Ed25519, RSA >= 3072)"
    )


def _describe_key(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__


def approval_signing_input(protected_b64: str, manifest: bytes) -> bytes:
    """``ASCII(protected) || "." || base64url(manifest)``: what the signature covers."""
    return protected_b64.encode("ascii") + b"." + b64url_encode(manifest).encode("ascii")


def _manifest_package_sha256(manifest: bytes, *, reason: str) -> str:
    """The manifest's ``package.sha256``.

    Raises:
        ApprovalError: with ``reason`` when the bytes are not a byok-package manifest.
    """
    try:
        doc = parse_manifest(load_json_strict(manifest, what="manifest"))
    except PackageFormatError as exc:
        raise ApprovalError(
            f"the manifest is not a byok-package manifest: {exc.message}", reason=reason
        ) from None
    except (ValueError, RecursionError):  # e.g. an integer over Python's 4300-digit limit
        raise ApprovalError("the manifest is not acceptable JSON", reason=reason) from None
    sha = doc["package"].get("sha256")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise ApprovalError(
            "the manifest's package.sha256 is not 64 lower-case hex digits", reason=reason
        )
    return sha


# --- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    claims: ApprovalClaims
    protected: str
    signature: bytes = field(repr=False)


def _header_str(header: dict[str, Any], name: str, pattern: re.Pattern[str], form: str) -> str:
    value = header[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ApprovalError(f"header {name} must be {form}")
    return value


def _parse(data: bytes) -> _Parsed:
    if not isinstance(data, bytes | bytearray):
        raise ApprovalError("an approval is read as bytes")
    data = bytes(data)
    if len(data) > MAX_APPROVAL_BYTES:
        raise ApprovalError(
            f"the approval is {len(data)} bytes, over the {MAX_APPROVAL_BYTES}-byte limit"
        )
    doc = _load_json(data, "approval", reason="approval_invalid", ascii_only=True)
    if not isinstance(doc, dict):
        raise ApprovalError("the approval must be a JSON object (flattened JWS)")
    if "payload" in doc:
        raise ApprovalError(
            "the approval carries a payload: approvals are detached JWS (the manifest is the "
            "payload, kept in its own file)"
        )
    unknown = doc.keys() - {"protected", "signature"}
    if unknown:
        raise ApprovalError(
            f"the approval has member(s) other than protected and signature: {shown(unknown)}"
        )
    missing = sorted({"protected", "signature"} - doc.keys())
    if missing:
        raise ApprovalError(f"the approval lacks member(s): {', '.join(missing)}")
    protected = doc["protected"]
    header_bytes = _b64url_decode(protected, "protected")
    assert isinstance(protected, str)  # noqa: S101  # _b64url_decode accepts only str
    header = _load_json(
        header_bytes, "protected header", reason="approval_invalid", ascii_only=True
    )
    if not isinstance(header, dict):
        raise ApprovalError("the protected header must be a JSON object")
    missing = [name for name in _HEADER_FIELDS if name not in header]
    if missing:
        raise ApprovalError(f"the protected header lacks member(s): {', '.join(missing)}")
    unknown = header.keys() - set(_HEADER_FIELDS)
    if unknown:
        raise ApprovalError(f"the protected header has unknown member(s): {shown(unknown)}")
    alg = header["alg"]
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise ApprovalError(f"header alg {shown([alg])} is not accepted ({', '.join(ALGORITHMS)})")
    if header["typ"] != APPROVAL_TYPE:
        raise ApprovalError(f"header typ must be {APPROVAL_TYPE!r}")
    approver_id = _header_str(
        header, "kid", APPROVER_ID_RE, "an approver id (^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$)"
    )
    key_name = _header_str(
        header, "byok_key_name", _KEY_NAME_RE, "a key name (1-127 of 0-9 a-z A-Z -)"
    )
    package_sha = _header_str(header, "byok_package_sha256", _SHA256_RE, "64 lower-case hex digits")
    manifest_sha = _header_str(
        header, "byok_manifest_sha256", _SHA256_RE, "64 lower-case hex digits"
    )
    signed_at = parse_time(header["byok_signed_at"], "header byok_signed_at")
    not_after = parse_time(header["byok_not_after"], "header byok_not_after")
    if not_after <= signed_at:
        raise ApprovalError("header byok_not_after must be later than byok_signed_at")
    signature = _b64url_decode(doc["signature"], "signature")
    _check_signature_length(alg, signature)
    claims = ApprovalClaims(
        approver_id=approver_id,
        key_name=key_name,
        package_sha256=package_sha,
        manifest_sha256=manifest_sha,
        signed_at=signed_at,
        not_after=not_after,
        alg=alg,
    )
    return _Parsed(claims, protected, signature)


def _check_signature_length(alg: str, signature: bytes) -> None:
    if alg in _EC_BYTES:
        want = 2 * _EC_BYTES[alg]
        if len(signature) != want:
            raise ApprovalError(
                f"an {alg} signature is {want} bytes (raw r||s, not DER); this one is "
                f"{len(signature)}"
            )
    elif alg == "EdDSA":
        if len(signature) != _ED25519_SIGNATURE_BYTES:
            raise ApprovalError(f"an EdDSA signature is 64 bytes; this one is {len(signature)}")
    elif len(signature) < MIN_RSA_BITS // 8:
        raise ApprovalError(
            f"a PS256 signature is at least {MIN_RSA_BITS // 8} bytes; this one is {len(signature)}"
        )


def parse_approval(data: bytes) -> ApprovalClaims:
    """Read an approval's structure and protected header; the signature is NOT checked.

    Raises:
        ApprovalError: ``approval_invalid`` for anything malformed (size, JSON, members,
            base64url, header values, signature length); never another exception type.
    """
    return _parse(data).claims


# --- verification -----------------------------------------------------------------------------


def _check_alg(alg: str, approver: Approver) -> None:
    try:
        expected = alg_for_key(approver.public_key)
    except SignerKeyError as exc:
        raise ApprovalError(f"approver {approver.id!r}: {exc.message}") from None
    if alg != expected:
        raise ApprovalError(
            f"the approval's alg {alg} does not match approver {approver.id!r}'s key "
            f"({_describe_key(approver.public_key)}, {expected})"
        )


def _verify_signature(
    alg: str, public_key: ApproverPublicKey, signature: bytes, data: bytes
) -> None:
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            size = _EC_BYTES[alg]
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public_key.verify(der, data, ec.ECDSA(_CURVE_ALG[public_key.curve.name][1]()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif len(signature) != (public_key.key_size + 7) // 8:
            raise ApprovalError("the approval's signature is not as long as the RSA modulus")
        else:
            public_key.verify(
                signature,
                data,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_BYTES),
                hashes.SHA256(),
            )
    except (InvalidSignature, ValueError, TypeError, KeyError):
        raise ApprovalError("the approval's signature does not verify") from None


def verify_approval(
    data: bytes, *, manifest: bytes, approver: Approver, now: datetime
) -> ApprovalClaims:
    """Verify one approval of ``manifest`` (its exact bytes) by ``approver`` at time ``now``.

    Checks, in this order: structure; ``kid`` is ``approver.id``; ``alg`` fits the approver's
    key; the signature; ``byok_manifest_sha256`` is the manifest's SHA-256 and
    ``byok_package_sha256`` its ``package.sha256``; then time: the approver has not expired,
    ``byok_not_after`` is after ``now`` and ``byok_signed_at`` is at most :data:`CLOCK_SKEW`
    after ``now``. The caller checks ``byok_key_name`` against the package's name, and the
    package bytes against the manifest's ``package.sha256``.

    Because the manifest is the signed payload, an approval presented with another manifest
    fails at the signature (``approval_invalid``); the message then names both manifest hashes.

    Raises:
        ApprovalError: ``approval_invalid``, ``approval_wrong_package`` or ``approval_expired``;
            never another exception type for any ``data`` or ``manifest`` bytes.
        ValueError: ``now`` is not timezone-aware (a programming error).
    """
    _require_aware(now, "now")
    parsed = _parse(data)
    claims = parsed.claims
    if claims.approver_id != approver.id:
        raise ApprovalError(
            f"the approval is signed as {claims.approver_id!r}, not by approver {approver.id!r}"
        )
    _check_alg(claims.alg, approver)
    manifest = bytes(manifest)
    manifest_sha = hashlib.sha256(manifest).hexdigest()
    try:
        _verify_signature(
            claims.alg,
            approver.public_key,
            parsed.signature,
            approval_signing_input(parsed.protected, manifest),
        )
    except ApprovalError:
        if claims.manifest_sha256 != manifest_sha:
            raise ApprovalError(
                f"the approval's signature does not verify over this manifest (the approval "
                f"names manifest SHA-256 {claims.manifest_sha256}, this one is {manifest_sha}: "
                "it is probably an approval of another package)"
            ) from None
        raise
    if not hmac.compare_digest(claims.manifest_sha256, manifest_sha):
        raise ApprovalError(
            f"the approval names manifest SHA-256 {claims.manifest_sha256}, the manifest is "
            f"{manifest_sha}",
            reason="approval_wrong_package",
        )
    package_sha = _manifest_package_sha256(manifest, reason="approval_wrong_package")
    if not hmac.compare_digest(claims.package_sha256, package_sha):
        raise ApprovalError(
            f"the approval names package SHA-256 {claims.package_sha256}, the manifest's "
            f"package is {package_sha}",
            reason="approval_wrong_package",
        )
    if approver.expires is not None and approver.expires <= now:
        raise ApprovalError(
            f"approver {approver.id!r} expired at {format_time(approver.expires)}",
            reason="approval_expired",
        )
    if claims.not_after <= now:
        raise ApprovalError(
            f"the approval expired at {format_time(claims.not_after)}", reason="approval_expired"
        )
    if claims.signed_at > now + CLOCK_SKEW:
        raise ApprovalError(
            f"the approval is signed at {format_time(claims.signed_at)}, in the future (more "
            f"than {int(CLOCK_SKEW.total_seconds() // 60)} minutes after {format_time(now)})",
            reason="approval_expired",
        )
    return claims


# --- approvers --------------------------------------------------------------------------------


def make_approver(
    approver_id: str,
    public_key: object,
    *,
    expires: datetime | None = None,
    where: str = "approver",
) -> Approver:
    """An :class:`Approver` after checking its id and key.

    Raises:
        ApprovalError: ``approvers_invalid``; the message starts with ``where``.
    """
    if not isinstance(approver_id, str) or not APPROVER_ID_RE.fullmatch(approver_id):
        raise ApprovalError(
            f"{where}.id: {shown([approver_id])} is not an approver id "
            "(^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$)",
            reason="approvers_invalid",
        )
    try:
        alg_for_key(public_key)
    except SignerKeyError as exc:
        raise ApprovalError(
            f"{where}.public_key_pem: {exc.message}", reason="approvers_invalid"
        ) from None
    if expires is not None:
        _require_aware(expires, "expires")
    assert isinstance(  # noqa: S101  # alg_for_key accepted it, so it is one of these
        public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    )
    return Approver(approver_id, public_key, spki_sha256(public_key), expires)


def _load_public_pem(value: object, where: str) -> object:
    def bad(why: str) -> ApprovalError:
        return ApprovalError(f"{where}.public_key_pem: {why}", reason="approvers_invalid")

    if not isinstance(value, str):
        raise bad("must be a PEM string")
    if len(value) > _MAX_PEM_CHARS:
        raise bad(f"is longer than {_MAX_PEM_CHARS} characters")
    if "PRIVATE KEY" in value:
        raise bad("holds a private key: give the approver's public key only")
    if value.count("-----BEGIN ") != 1 or "-----BEGIN PUBLIC KEY-----" not in value:
        raise bad("must hold exactly one -----BEGIN PUBLIC KEY----- block")
    if not value.isascii():
        raise bad("holds non-ASCII characters")
    try:
        return serialization.load_pem_public_key(value.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise bad("is not a valid PEM public key (SubjectPublicKeyInfo)") from None


def parse_approvers(doc: object) -> dict[str, Approver]:
    """Parse ``{"approvers": [{"id", "public_key_pem", "expires"?}, ...], "description"?}``.

    Keys: EC P-256/P-384, Ed25519, RSA >= 3072. Ids and keys must be unique.

    Raises:
        ApprovalError: ``approvers_invalid``; the message names the field, e.g.
            ``approvers[1].public_key_pem: RSA-2048 is too small (>= 3072)``.
    """

    def bad(message: str) -> ApprovalError:
        return ApprovalError(message, reason="approvers_invalid")

    if not isinstance(doc, dict):
        raise bad("approvers document: must be a JSON object with an 'approvers' list")
    unknown = doc.keys() - {"approvers", "description"}
    if unknown:
        raise bad(f"approvers document: unknown member(s) {shown(unknown)}")
    description = doc.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > _MAX_DESCRIPTION
    ):
        raise bad(f"description: must be a string of at most {_MAX_DESCRIPTION} characters")
    entries = doc.get("approvers")
    if not isinstance(entries, list):
        raise bad("approvers: must be a list")
    if not entries:
        raise bad("approvers: the list is empty")
    if len(entries) > MAX_APPROVERS:
        raise bad(f"approvers: more than {MAX_APPROVERS} entries")
    approvers: dict[str, Approver] = {}
    by_key: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"approvers[{i}]"
        if not isinstance(entry, dict):
            raise bad(f"{where}: must be an object with id and public_key_pem")
        unknown = entry.keys() - {"id", "public_key_pem", "expires"}
        if unknown:
            raise bad(f"{where}: unknown member(s) {shown(unknown)}")
        for name in ("id", "public_key_pem"):
            if name not in entry:
                raise bad(f"{where}.{name}: missing")
        expires = None
        if "expires" in entry:
            expires = parse_time(entry["expires"], f"{where}.expires", reason="approvers_invalid")
        public_key = _load_public_pem(entry["public_key_pem"], where)
        approver = make_approver(entry["id"], public_key, expires=expires, where=where)
        same = [known for known in approvers if known.casefold() == approver.id.casefold()]
        if same:  # ids that differ only in case name one person twice, to a reader
            also = "" if same[0] == approver.id else f" (as {same[0]!r})"
            raise bad(f"{where}.id: {approver.id!r} is listed twice{also}")
        if approver.spki_sha256 in by_key:
            raise bad(
                f"{where}.public_key_pem: the same key as approver {by_key[approver.spki_sha256]!r}"
            )
        approvers[approver.id] = approver
        by_key[approver.spki_sha256] = approver.id
    return approvers


def load_approvers(data: bytes) -> dict[str, Approver]:
    """Parse an approvers file (strict JSON, at most 1 MiB) with :func:`parse_approvers`.

    Raises:
        ApprovalError: ``approvers_invalid``.
    """
    if len(data) > MAX_APPROVERS_BYTES:
        raise ApprovalError(
            f"approvers file: larger than {MAX_APPROVERS_BYTES} bytes", reason="approvers_invalid"
        )
    doc = _load_json(data, "approvers file", reason="approvers_invalid", ascii_only=False)
    return parse_approvers(doc)


# --- signing ----------------------------------------------------------------------------------


class _SoftwareSigner:
    """Signs with a ``cryptography`` private key; its ``repr`` shows no key material."""

    def __init__(self, private_key: SignerPrivateKey, alg: str) -> None:
        self._key = private_key
        self.alg = alg
        self.public_key: ApproverPublicKey = private_key.public_key()
        self.spki_sha256 = spki_sha256(self.public_key)

    def __repr__(self) -> str:
        return f"<software approval signer {self.alg}, SPKI SHA-256 {self.spki_sha256}>"

    def __reduce__(self) -> Any:
        raise TypeError("a signer holds a private key and cannot be pickled")

    def sign(self, signing_input: bytes) -> bytes:
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            size = _EC_BYTES[self.alg]
            r, s = decode_dss_signature(
                key.sign(signing_input, ec.ECDSA(_CURVE_ALG[key.curve.name][1]()))
            )
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(signing_input)
        return key.sign(
            signing_input,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_BYTES),
            hashes.SHA256(),
        )


def software_signer(private_key: object) -> ApprovalSigner:
    """A signer from a ``cryptography`` private key (EC P-256/P-384, Ed25519, RSA >= 3072).

    Raises:
        SignerKeyError: any other key (``bad_signer_key``).
    """
    if not isinstance(
        private_key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise SignerKeyError(
            f"{type(private_key).__name__} keys cannot sign approvals "
            "(EC P-256/P-384, Ed25519, RSA >= 3072)"
        )
    return _SoftwareSigner(private_key, alg_for_key(private_key.public_key()))


def load_signer_key(data: bytes, *, passphrase: PassphraseProvider | None = None) -> ApprovalSigner:
    """A software signer from a private key file: PEM (PKCS#8, PKCS#1, SEC1, encrypted PKCS#8:
    ``passphrase`` is called only then) or unencrypted DER.

    Raises:
        SignerKeyError: unreadable or unsupported key (``bad_signer_key``).
        ByokError: ``bad_passphrase`` (missing or wrong passphrase).
    """
    key: object
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY-----" not in data:
            raise SignerKeyError(
                "the signer key file holds no private key (a public key or certificate cannot sign)"
            )
        password = None
        encrypted = b"ENCRYPTED" in data
        if encrypted:
            if passphrase is None:
                raise ByokError("the signer key is encrypted", reason="bad_passphrase")
            password = passphrase()
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except TypeError:
            raise ByokError(
                "the signer key is encrypted and needs a passphrase", reason="bad_passphrase"
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            if encrypted:
                raise ByokError(
                    "wrong passphrase, or a corrupt encrypted signer key", reason="bad_passphrase"
                ) from None
            raise SignerKeyError("the signer key PEM is malformed") from None
    else:
        try:
            key = serialization.load_der_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SignerKeyError("the signer key file is not a PEM or DER private key") from None
    return software_signer(key)


def _check_produced_signature(signer: ApprovalSigner, signature: bytes) -> None:
    if not isinstance(signature, bytes):
        raise ApprovalError("the signer returned no bytes")
    try:
        _check_signature_length(signer.alg, signature)
    except ApprovalError as exc:
        raise ApprovalError(f"the signer misbehaved: {exc.message}") from None


def sign_approval(
    *,
    manifest: bytes,
    approver_id: str,
    key_name: str,
    not_after: datetime,
    signer: ApprovalSigner,
    now: datetime,
) -> bytes:
    """Sign an approval of ``manifest`` (the manifest file's exact bytes) as ``approver_id``.

    Returns the approval file's bytes: canonical JSON (sorted keys, no spaces) and a newline.
    Times are cut to whole seconds. When the signer exposes its ``public_key`` (both signers of
    this package do), the signature is verified before it is returned.

    Raises:
        ApprovalError: ``approval_invalid``: the manifest is not a byok-package manifest, the
            approver id or key name is malformed, ``not_after`` is not after ``now``, the signer's
            alg is not accepted or its signature is malformed or does not verify.
        ByokError: whatever the signer raises (e.g. ``Pkcs11Error`` from a token).
        ValueError: ``now`` or ``not_after`` is not timezone-aware (a programming error).
    """
    _require_aware(now, "now")
    _require_aware(not_after, "not_after")
    manifest = bytes(manifest)
    package_sha = _manifest_package_sha256(manifest, reason="approval_invalid")
    if not isinstance(approver_id, str) or not APPROVER_ID_RE.fullmatch(approver_id):
        raise ApprovalError(
            f"approver id {shown([approver_id])} is not valid (^[A-Za-z0-9][A-Za-z0-9._@-]{{0,63}}$)"
        )
    if not isinstance(key_name, str) or not _KEY_NAME_RE.fullmatch(key_name):
        raise ApprovalError(f"key name {shown([key_name])} is not valid (1-127 of 0-9 a-z A-Z -)")
    if signer.alg not in ALGORITHMS:
        raise ApprovalError(f"signer alg {shown([signer.alg])} is not accepted")
    signed_at = now.astimezone(UTC).replace(microsecond=0)
    until = not_after.astimezone(UTC).replace(microsecond=0)
    if until <= signed_at:
        raise ApprovalError(
            f"not-after {format_time(until)} is not later than now ({format_time(signed_at)})"
        )
    header = {
        "alg": signer.alg,
        "typ": APPROVAL_TYPE,
        "kid": approver_id,
        "byok_key_name": key_name,
        "byok_package_sha256": package_sha,
        "byok_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "byok_signed_at": format_time(signed_at),
        "byok_not_after": format_time(until),
    }
    protected = b64url_encode(
        json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    )
    signing_input = approval_signing_input(protected, manifest)
    signature = signer.sign(signing_input)
    _check_produced_signature(signer, signature)
    public_key = getattr(signer, "public_key", None)
    if public_key is not None:
        if spki_sha256(public_key) != signer.spki_sha256 or alg_for_key(public_key) != signer.alg:
            raise ApprovalError("the signer's public key does not match its alg or fingerprint")
        try:
            _verify_signature(signer.alg, public_key, signature, signing_input)
        except ApprovalError:
            raise ApprovalError(
                "the signer produced a signature that does not verify under its public key"
            ) from None
    doc = {"protected": protected, "signature": b64url_encode(signature)}
    return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")
