"""Key identifiers: ``https://<host>/keys/<name>/<32 hex version>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import KidError
from .guard import refuses

# Match these with fullmatch only: ``$`` also matches before a final newline.
KEY_NAME_RE = re.compile(r"[0-9a-zA-Z-]{1,127}")
_VERSION_RE = re.compile(r"[0-9a-f]{32}")
_HOST_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
# The documented grammar's alphabet: printable ASCII without spaces (urlsplit silently drops
# tabs and newlines, and NFKC-normalises other characters: they must never reach it).
_KID_CHARS_RE = re.compile(r"[\x21-\x7e]+")
_MAX_KID = 512


def is_key_name(name: object) -> bool:
    """True if ``name`` is a Managed HSM key name (1-127 of 0-9 a-z A-Z -), exactly."""
    return isinstance(name, str) and KEY_NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class KeyId:
    """A parsed, versioned key identifier."""

    vault_url: str  # https://host[:port]
    host: str  # host[:port], lower case
    name: str
    version: str

    @property
    def kid(self) -> str:
        return f"{self.vault_url}/keys/{self.name}/{self.version}"

    def __str__(self) -> str:
        return self.kid


def _bad_kid(message: str) -> KidError:
    return KidError(message)


@refuses(_bad_kid)
def parse_kid(kid: str, *, expected_host: str | None = None) -> KeyId:
    """Parse a versioned kid.

    Raises:
        KidError: not https, malformed host or name, no 32-hex version, or (with
            ``expected_host``) a host other than the expected one (reason ``kid_wrong_hsm``).
    """
    if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID:
        raise KidError("kid must be a non-empty string of at most 512 characters")
    if not _KID_CHARS_RE.fullmatch(kid):
        raise KidError("kid has a character outside printable ASCII (a space, tab or control)")
    try:
        parts = urlsplit(kid)
    except ValueError:  # an unclosed "[", an invalid IPv6 literal
        raise KidError("kid is not a well-formed https URL") from None
    if parts.scheme != "https":
        raise KidError("kid must be an https URL (https://<host>/keys/<name>/<version>)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise KidError("kid must not carry a query, fragment or credentials")
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        raise KidError("kid has an invalid port") from None
    if not _HOST_RE.fullmatch(host):
        raise KidError("kid has an invalid host name")
    netloc = f"{host}:{port}" if port is not None else host
    segments = parts.path.split("/")
    if len(segments) == 4 and segments[0] == "" and segments[1] == "keys":
        _, _, name, version = segments
    elif len(segments) == 3 and segments[1] == "keys":
        raise KidError("kid has no version: the KEK must be named with its exact version")
    else:
        raise KidError("kid path must be /keys/<name>/<version>")
    if not KEY_NAME_RE.fullmatch(name):
        raise KidError("kid key name must match ^[0-9a-zA-Z-]{1,127}$")
    if not version:
        raise KidError("kid has no version: the KEK must be named with its exact version")
    if not _VERSION_RE.fullmatch(version):
        raise KidError("kid version must be 32 lower-case hex digits")
    key_id = KeyId(f"https://{netloc}", netloc, name, version)
    if expected_host is not None and netloc != expected_host.lower():
        raise KidError(
            f"kid names HSM {netloc!r}, not this HSM {expected_host.lower()!r}",
            reason="kid_wrong_hsm",
        )
    return key_id
