"""The import steps shared by the blob pipeline and ``byok import``: validate, import, verify."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import datetime

from byok_pipeline.adapters.keyvault import (
    TAG_KEK_KID,
    TAG_PACKAGE_ID,
    TAG_PACKAGE_SHA256,
    HsmAdapter,
    ImportedKey,
)
from byok_pipeline.core.errors import Rejected
from byok_pipeline.core.metadata import ImportOptions
from byok_pipeline.core.settings import Settings
from byok_pipeline.core.validation import (
    ValidatedPackage,
    check_against_kek,
    check_kek_facts,
    read_package,
)
from byok_pipeline.core.verification import fingerprint_matches, spki_sha256_of_public_jwk
from offline_packager.keytypes import TARGET_TYPES
from offline_packager.target_keys import Fingerprint


def validate(
    data: bytes,
    options: ImportOptions,
    *,
    settings: Settings,
    hsm: HsmAdapter,
    clock: Callable[[], datetime],
    request_id: str,
) -> ValidatedPackage:
    """Every check before an import: package form, kid, the KEK as the HSM has it, lengths.

    Raises:
        Rejected: with the first failing check's reason code.
        TransientError: reading the KEK failed transiently.
    """
    _, kid = read_package(data, settings)
    facts = hsm.get_kek(kid, request_id=request_id)
    kek = check_kek_facts(facts, clock())
    if options.kek_spki_sha256 and not hmac.compare_digest(
        options.kek_spki_sha256, kek.fingerprint
    ):
        raise Rejected(
            "kek_mismatch",
            f"the manifest says the package was wrapped under a KEK with SPKI SHA-256 "
            f"{options.kek_spki_sha256}, but {kid.kid} has {kek.fingerprint}: re-wrap with the KEK "
            "downloaded from this HSM (check --kek-sha256)",
        )
    return check_against_kek(data, kek, kid, options, settings)


def import_validated(
    hsm: HsmAdapter,
    key_name: str,
    *,
    data: bytes,
    package_sha256: str,
    validated: ValidatedPackage,
    options: ImportOptions,
    request_id: str,
    package_id: str | None = None,
    look_first: bool = True,
    before_put: Callable[[], None] | None = None,
) -> ImportedKey:
    """Import once: the version is tagged with the package digest, its canonical identity and
    the KEK kid. ``look_first`` as :meth:`HsmAdapter.import_once`.

    Raises:
        Rejected: the HSM refused (``hsm_refused`` with its code).
        TransientError: retries exhausted.
    """
    tags = dict(options.tags)
    tags[TAG_PACKAGE_SHA256] = package_sha256
    if package_id is not None:
        tags[TAG_PACKAGE_ID] = package_id
    tags[TAG_KEK_KID] = validated.kek_kid.kid
    t = validated.target_type
    return hsm.import_once(
        key_name,
        package_bytes=data,
        package_sha256=package_sha256,
        kty=t.kty,
        crv=t.crv,
        key_ops=validated.key_ops,
        tags=tags,
        request_id=request_id,
        package_id=package_id,
        look_first=look_first,
        before_put=before_put,
    )


def fingerprint_result(
    hsm: HsmAdapter,
    imported: ImportedKey,
    expected: Fingerprint | None,
    target_type: str | None,
    *,
    request_id: str,
) -> str:
    """``match``, ``mismatch`` or ``unverified`` (no expected fingerprint, or an AES key whose
    operations do not allow the encryption that computes its check value).

    Raises:
        TransientError / Rejected: the HSM call for the AES check value failed.
    """
    if expected is None:
        return "unverified"
    if expected.kind == "spki-sha256":
        actual = spki_sha256_of_public_jwk(
            imported.kty, n=imported.n, e=imported.e, crv=imported.crv, x=imported.x, y=imported.y
        )
    else:
        t = TARGET_TYPES.get(target_type or "")
        if t is None or t.key_size is None or "encrypt" not in imported.key_ops:
            return "unverified"
        actual = hsm.aes_check_value(imported.kid, t.key_size, request_id=request_id)
    return "match" if fingerprint_matches(expected, actual) else "mismatch"
