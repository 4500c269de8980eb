"""Access tokens: a compact JWT (HS256) signed with the data directory's ``token.key``.

The emulator checks signature, audience and time window; :class:`EmulatorCredential`
(:mod:`.credential`) mints them. Anyone who can read ``token.key`` can mint tokens: this is
a development tool's authentication, not Entra ID.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from offline_packager.errors import PackageFormatError
from offline_packager.package_format import b64url_decode, b64url_encode
from offline_packager.secret import SecretBytes

from .errors import UnauthorizedError

AUDIENCE = "https://managedhsm.azure.net"
SCOPE = f"{AUDIENCE}/.default"
ISSUER = "https://managed-hsm-emulator.invalid/"
TENANT_ID = "00000000-0000-0000-0000-000000000000"
TOKEN_KEY_BYTES = 32
CLOCK_SKEW_SECONDS = 60
_HEADER = {"alg": "HS256", "typ": "JWT"}
_MAX_TOKEN = 8192


def audience_for_scope(scope: str) -> str:
    """``https://managedhsm.azure.net/.default`` -> ``https://managedhsm.azure.net``."""
    return scope.removesuffix("/.default")


def _sign(key: SecretBytes, signing_input: bytes) -> bytes:
    return hmac.new(key.reveal(), signing_input, hashlib.sha256).digest()


def mint_token(
    key: SecretBytes,
    *,
    audience: str,
    issued_at: int,
    lifetime_seconds: int,
    subject: str = "emulator-user",
) -> str:
    """A signed token for ``audience`` valid from ``issued_at`` for ``lifetime_seconds``."""
    claims = {
        "aud": audience,
        "iss": ISSUER,
        "tid": TENANT_ID,
        "sub": subject,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + lifetime_seconds,
    }
    parts = [
        b64url_encode(json.dumps(_HEADER, separators=(",", ":")).encode()),
        b64url_encode(json.dumps(claims, separators=(",", ":")).encode()),
    ]
    signing_input = ".".join(parts).encode("ascii")
    return f"{parts[0]}.{parts[1]}.{b64url_encode(_sign(key, signing_input))}"


def _decode_part(part: str) -> bytes:
    """Strict base64url of one token part: unpadded and canonical.

    A base64url text whose last character carries non-zero spare bits decodes to the same bytes
    as the canonical one, so without this check several spellings of one signature verify.
    Re-encoding and comparing rejects every non-canonical (or padded) form.

    Raises:
        UnauthorizedError: reason ``token_malformed``.
    """
    try:
        raw = b64url_decode(part)
    except PackageFormatError:
        raise UnauthorizedError("the access token is malformed", reason="token_malformed") from None
    if b64url_encode(raw) != part:
        raise UnauthorizedError(
            "the access token is not canonical base64url", reason="token_malformed"
        )
    return raw


def _decode_json(part: str) -> Mapping[str, Any]:
    raw = _decode_part(part)
    try:
        value = json.loads(raw)
    except ValueError:
        raise UnauthorizedError("the access token is malformed", reason="token_malformed") from None
    if not isinstance(value, dict):
        raise UnauthorizedError("the access token is malformed", reason="token_malformed")
    return value


def verify_token(key: SecretBytes, token: str, *, now: float) -> Mapping[str, Any]:
    """Check a bearer token and return its claims.

    Raises:
        UnauthorizedError: reasons ``token_malformed``, ``token_bad_signature``,
            ``token_wrong_audience``, ``token_expired``, ``token_not_yet_valid``.
    """
    parts = token.split(".")
    if len(token) > _MAX_TOKEN or len(parts) != 3:  # header.claims.signature
        raise UnauthorizedError("the access token is malformed", reason="token_malformed")
    header = _decode_json(parts[0])
    if header.get("alg") != _HEADER["alg"]:
        raise UnauthorizedError(
            "the access token's algorithm is not HS256", reason="token_malformed"
        )
    signature = _decode_part(parts[2])
    expected = _sign(key, f"{parts[0]}.{parts[1]}".encode("ascii", "replace"))
    if not hmac.compare_digest(signature, expected):
        raise UnauthorizedError(
            "the access token's signature is not valid for this emulator",
            reason="token_bad_signature",
        )
    claims = _decode_json(parts[1])
    if audience_for_scope(str(claims.get("aud", ""))).rstrip("/") != AUDIENCE:
        raise UnauthorizedError(
            f"the access token's audience is not {AUDIENCE}", reason="token_wrong_audience"
        )
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if not isinstance(exp, int) or not isinstance(nbf, int):
        raise UnauthorizedError("the access token lacks exp/nbf", reason="token_malformed")
    if now >= exp + CLOCK_SKEW_SECONDS:
        raise UnauthorizedError("the access token has expired", reason="token_expired")
    if now < nbf - CLOCK_SKEW_SECONDS:
        raise UnauthorizedError("the access token is not valid yet", reason="token_not_yet_valid")
    return claims
