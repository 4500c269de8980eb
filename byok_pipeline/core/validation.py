"""Validation of a package against its KEK and the import options. Needs no secret.

Every check raises :class:`Rejected` with a stable reason code; nothing returns False.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from byok_pipeline.core.errors import Rejected
from byok_pipeline.core.kek_facts import KekFacts
from byok_pipeline.core.metadata import ImportOptions
from byok_pipeline.core.settings import Settings
from offline_packager.checks import check_package
from offline_packager.errors import ByokError
from offline_packager.kek import Kek, check_kek
from offline_packager.keytypes import TargetType
from offline_packager.kid import KeyId, parse_kid
from offline_packager.package_format import ByokPackage, parse_package, shown


@dataclass(frozen=True)
class ValidatedPackage:
    """A package that passed every offline and KEK check."""

    package: ByokPackage
    kek_kid: KeyId
    target_type: TargetType
    target_type_inferred: bool
    key_ops: tuple[str, ...]


def read_package(data: bytes, settings: Settings) -> tuple[ByokPackage, KeyId]:
    """Parse strictly and pin the kid to the configured HSM (when one is configured: ``byok
    upload`` may run with storage alone) and KEK policy.

    Raises:
        Rejected: malformed_package, wrong_alg, wrong_enc, bad_base64, bad_kid,
            kid_wrong_hsm, kek_not_allowed, unsupported_schema_version, too_large.
    """
    try:
        package = parse_package(data, max_bytes=settings.max_package_bytes)
        kid = parse_kid(package.kid, expected_host=settings.hsm_host or None)
    except ByokError as exc:
        raise Rejected(exc.reason, exc.message) from None
    if settings.allowed_kek_names and kid.name not in settings.allowed_kek_names:
        raise Rejected("kek_not_allowed", f"KEK {kid.name!r} is not in the allowed KEK names")
    return package, kid


def check_kek_facts(kek: KekFacts, now: datetime) -> Kek:
    """The KEK must be enabled, within nbf/exp, RSA 2048/3072/4096 and import-only.

    Raises:
        Rejected: kek_disabled, kek_not_yet_valid, kek_expired, kek_not_rsa,
            kek_wrong_size, kek_not_import_only.
    """
    if not kek.enabled:
        raise Rejected("kek_disabled", f"the KEK {kek.kid} is disabled")
    if kek.not_before is not None and now < kek.not_before:
        raise Rejected(
            "kek_not_yet_valid", f"the KEK is not valid before {kek.not_before.isoformat()}"
        )
    if kek.expires_on is not None and now >= kek.expires_on:
        raise Rejected("kek_expired", f"the KEK expired at {kek.expires_on.isoformat()}")
    if kek.kty != "RSA-HSM" or kek.public_key is None:
        raise Rejected("kek_not_rsa", f"the KEK is {kek.kty}, not RSA-HSM")
    try:
        checked = check_kek(kek.public_key)
    except ByokError as exc:
        raise Rejected(exc.reason, exc.message) from None
    if tuple(kek.key_ops) != ("import",):
        raise Rejected(
            "kek_not_import_only",
            f"the KEK's key operations are {list(kek.key_ops)}; a KEK must allow only ['import']",
        )
    return checked


def check_target(target: TargetType, options: ImportOptions, settings: Settings) -> None:
    """The target type (stated or inferred) against BYOK_ALLOWED_TARGET_TYPES, and the
    metadata against the type, before anything is imported.

    Raises:
        Rejected: ``target_type_not_allowed``, ``bad_metadata``.
    """
    if settings.allowed_target_types and target.name not in settings.allowed_target_types:
        raise Rejected("target_type_not_allowed", f"target type {target.name} is not allowed here")
    if options.key_ops is not None:
        bad = [o for o in options.key_ops if o not in target.allowed_key_ops]
        if bad:
            raise Rejected(
                "bad_metadata", f"key operations {shown(bad)} are not allowed for {target.name}"
            )
    if options.fingerprint is not None:
        expected = "kcv" if target.family == "oct" else "spki-sha256"
        if options.fingerprint.kind != expected:
            raise Rejected(
                "bad_metadata",
                f"a {target.name} key is checked by {expected}, not {options.fingerprint.kind}",
            )


def check_against_kek(
    data: bytes, kek: Kek, kek_kid: KeyId, options: ImportOptions, settings: Settings
) -> ValidatedPackage:
    """Ciphertext lengths and RSA block vs the KEK; target type stated or inferred; policy.

    Raises:
        Rejected: ciphertext_length_mismatch, rsa_block_out_of_range, target_type_unknown,
            target_type_mismatch, target_type_not_allowed.
    """
    stated = options.target_type.name if options.target_type else None
    report = check_package(
        data,
        kek=kek,
        stated_type=stated,
        expected_host=settings.hsm_host,
        max_bytes=settings.max_package_bytes,
    )
    if report.findings:
        first = report.findings[0]
        raise Rejected(first.reason, first.message)
    assert report.package is not None  # noqa: S101  # no findings means it parsed
    assert report.target_type is not None  # noqa: S101  # no findings means a type was fixed
    target = report.target_type
    check_target(target, options, settings)
    return ValidatedPackage(
        package=report.package,
        kek_kid=kek_kid,
        target_type=target,
        target_type_inferred=report.target_type_inferred,
        key_ops=options.key_ops or target.default_key_ops,
    )
