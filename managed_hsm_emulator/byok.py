"""BYOK import: turn a ``key_hsm`` value into verified key material.

Pure core: it takes the request's facts and a KEK lookup, and returns the unwrapped
:class:`KeyMaterial` or raises. Steps (byok-facts.md sections 1-3): decode ``key_hsm``
(padded or not), parse the package, find the KEK by its exact kid on this HSM, require it
enabled, inside nbf/exp and import-only, unwrap, parse the plaintext, and require it to be the
requested ``kty``/``crv`` in a supported size.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from offline_packager.errors import ByokError, KidError, PackageFormatError, TargetKeyError
from offline_packager.kid import KeyId, parse_kid
from offline_packager.package_format import b64url_decode, parse_package
from offline_packager.wrap import unwrap_target

from .errors import BadParameterError, KeyNotFoundError
from .material import Family, KeyMaterial
from .model import KeyVersion


@dataclass(frozen=True)
class Kek:
    """A KEK as found for a package: its version record and private key."""

    version: KeyVersion
    private_key: rsa.RSAPrivateKey


# Given a parsed kid, return the KEK, or raise KeyNotFoundError.
FindKek = Callable[[KeyId], Kek]


def _refuse(reason: str, message: str) -> BadParameterError:
    return BadParameterError(f"BYOK import refused ({reason}): {message}", reason=reason)


def _from_byok_error(exc: ByokError) -> BadParameterError:
    return _refuse(exc.reason, exc.message)


def check_kek(kek: KeyVersion, *, now: float) -> None:
    """Require an enabled, currently valid, import-only RSA KEK.

    Raises:
        BadParameterError: reasons ``kek_not_rsa``, ``kek_not_import_only``, ``kek_disabled``,
            ``kek_not_yet_valid``, ``kek_expired``.
    """
    ref = f"KEK {kek.name}/{kek.version}"
    if kek.family != "RSA":
        raise _refuse("kek_not_rsa", f"{ref} is not an RSA-HSM key")
    if kek.key_ops != ("import",):
        raise _refuse(
            "kek_not_import_only",
            f'{ref} has key_ops {list(kek.key_ops)}; a KEK must have exactly ["import"]',
        )
    why = kek.attributes.usable_reason(now)
    if why is not None:
        raise _refuse(f"kek_{why}", f"{ref} is {why.replace('_', ' ')}")


def parse_kek_kid(kid: str, hosts: frozenset[str]) -> KeyId:
    """Parse a package's kid and require it to name this HSM: one of ``hosts`` (the
    ``host[:port]`` authorities this emulator answers to, lower case, IPv6 in brackets).

    Raises:
        KidError: reason ``bad_kid`` (malformed) or ``kid_wrong_hsm`` (another HSM).
    """
    try:
        parts = urlsplit(kid)
        hostname, port = parts.hostname, parts.port
    except ValueError:  # an invalid port or IPv6 literal
        raise KidError("kid is not a valid https URL") from None
    if hostname is not None and ":" in hostname:
        # offline_packager.kid reads DNS names and IPv4 only: check the rest of the kid with a
        # stand-in host, and the IPv6 literal here.
        if parts.username is not None or parts.password is not None:
            raise KidError("kid must not carry a query, fragment or credentials")
        try:
            literal = ipaddress.IPv6Address(hostname).compressed
        except ValueError:
            raise KidError("kid has an invalid host name") from None
        authority = f"[{literal}]" + (f":{port}" if port is not None else "")
        key_id = parse_kid(urlunsplit(parts._replace(netloc="ipv6-literal.invalid")))
    else:
        key_id = parse_kid(kid)
        authority = key_id.host
    if authority not in hosts:
        raise KidError(
            f"kid names HSM {authority!r}, not this HSM (it answers to {', '.join(sorted(hosts))})",
            reason="kid_wrong_hsm",
        )
    return key_id


def import_byok(
    key_hsm: object,
    *,
    family: Family,
    crv: object,
    hosts: frozenset[str],
    find_kek: FindKek,
    now: float,
) -> KeyMaterial:
    """Unwrap a BYOK package for a key of ``family`` (and ``crv`` for EC) on this HSM, whose
    names (``host[:port]``) are ``hosts``; the package's kid must use one of them.

    Raises:
        BadParameterError: every refusal, with a reason code: ``bad_key_hsm``, the package
            format reasons (``malformed_package``, ``bad_base64``, ``wrong_alg``...), ``bad_kid``,
            ``kid_wrong_hsm``, the :func:`check_kek` reasons, ``rsa_unwrap_failed``,
            ``kwp_integrity``, ``ciphertext_length_mismatch``, ``kty_mismatch``,
            ``target_not_pkcs8``, ``plaintext_trailing_zeros``, ``target_invalid``, ``crv_mismatch``, ``crv_required``, ``unsupported_target``,
            ``unsupported_curve``.
        KeyNotFoundError: reason ``kek_not_found``: no key or no such version for the kid.
    """
    if not isinstance(key_hsm, str) or not key_hsm:
        raise _refuse("bad_key_hsm", "key_hsm must be a non-empty base64url string")
    if family == "EC" and not isinstance(crv, str):
        raise _refuse("crv_required", "an EC-HSM import needs crv (P-256, P-384, P-521, P-256K)")
    try:
        raw = b64url_decode(key_hsm)
    except PackageFormatError:
        raise _refuse("bad_key_hsm", "key_hsm is not valid base64url") from None
    try:
        package = parse_package(raw)
        kid = parse_kek_kid(package.kid, hosts)
    except (PackageFormatError, KidError) as exc:
        raise _from_byok_error(exc) from None
    kek = find_kek(kid)
    check_kek(kek.version, now=now)
    try:
        with unwrap_target(kek.private_key, package.ciphertext) as plaintext:
            material = KeyMaterial.from_plaintext(family, plaintext)
    except ByokError as exc:
        raise _from_byok_error(exc) from None
    except BadParameterError as exc:
        raise _refuse(exc.reason, exc.message) from None
    try:
        material.target_type()
    except TargetKeyError as exc:
        raise _refuse(exc.reason, exc.message) from None
    if family == "EC" and material.crv != crv:
        raise _refuse(
            "crv_mismatch", f"the unwrapped key is on curve {material.crv}, not the requested {crv}"
        )
    return material


def kek_not_found(kid: KeyId, *, name_exists: bool) -> KeyNotFoundError:
    """The 404 for a package whose kid names no KEK here."""
    if name_exists:
        return KeyNotFoundError(
            f"BYOK import refused (kek_not_found): key {kid.name} has no version {kid.version}; "
            "the package was made for another KEK version",
            reason="kek_not_found",
        )
    return KeyNotFoundError(
        f"BYOK import refused (kek_not_found): no KEK named {kid.name} in this HSM",
        reason="kek_not_found",
    )
