"""``byok upload`` is a gate: what the pipeline would refuse is refused before anything leaves
the machine, with the pipeline's own checks and reason codes (exit 2).

Locally, always (:func:`check_locally`): the file is not plaintext key material
(``plaintext_key``: nothing is sent, the content is never shown); the package's form, kid and
lengths as ``byok-package inspect`` checks them (pinned to this HSM when BYOK_HSM_URL is set);
the manifest describes it; the approvals beside it approve it.

Online, when BYOK_HSM_URL is set and ``--force-offline`` is not given (:func:`check_online`):
the KEK the kid names exists in this HSM, is enabled, RSA, import-only and not expired (and is
the manifest's KEK); this exact package is not imported already (``already_imported``); the
import policy admits the name and type (its approvals may still be missing: the package then
waits for them); a key of that name that exists already may get a version (the policy, and
``existing_key_protected``), and only with ``--new-version`` (``key_exists``).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from byok_pipeline.cli.authorization import Beside, read_beside
from byok_pipeline.core.errors import Rejected, TransientError
from byok_pipeline.core.metadata import ImportOptions
from byok_pipeline.core.settings import Settings
from byok_pipeline.core.validation import check_target, read_package
from offline_packager.checks import check_package

#: The online part's failures that ``--force-offline`` gets around.
_OFFLINE_HELPS = frozenset({"hsm_unreachable", "login_required", "hsm_forbidden", "transient"})


@dataclass(frozen=True)
class LocalFacts:
    """A package that passed the local checks, with what goes up with it."""

    path: Path
    data: bytes
    sha256: str
    key_name: str
    options: ImportOptions
    beside: Beside
    target_type: str | None  # stated or inferred; None when the length fits several KEKs


def check_locally(
    path: Path,
    data: bytes,
    *,
    key_name: str,
    options: ImportOptions,
    manifest: bytes | None,
    settings: Settings,
) -> LocalFacts:
    """The checks that need no service: form, kid, lengths and type (``byok-package
    inspect``'s, without the KEK file), the approvals beside the package. The package and
    manifest were read with :func:`byok_pipeline.cli.files.read_local` (``plaintext_key``).

    Raises:
        Rejected: the first failing check's reason code (``malformed_package``, ``bad_kid``,
            ``kid_wrong_hsm``, ``kek_not_allowed``, ``ciphertext_length_mismatch``,
            ``target_type_*``, ``bad_metadata``, ``approval_invalid``, ...).
    """
    read_package(data, settings)
    report = check_package(
        data,
        stated_type=options.target_type.name if options.target_type else None,
        expected_host=settings.hsm_host or None,
        max_bytes=settings.max_package_bytes,
    )
    if report.findings:
        first = report.findings[0]
        raise Rejected(first.reason, first.message)
    if report.target_type is not None:
        check_target(report.target_type, options, settings)
    sha = hashlib.sha256(data).hexdigest()
    return LocalFacts(
        path=path,
        data=data,
        sha256=sha,
        key_name=key_name,
        options=options,
        beside=read_beside(path, sha, manifest),
        target_type=report.target_type.name if report.target_type else None,
    )


def check_online(
    local: LocalFacts,
    *,
    settings: Settings,
    hsm: Any,
    authz: Any,
    new_version: bool,
    clock: Callable[[], datetime],
) -> dict[str, Any]:
    """The checks against the HSM and the import policy, as the pipeline makes them; what
    they found (the KEK, the target type, the existing key, the approvals still missing).
    Needs keys/read on the HSM and read on the config container.

    Raises:
        Rejected: ``kid_wrong_hsm``, ``kek_*``, lengths and types, ``already_imported``,
            ``key_name_not_allowed``, ``target_type_not_allowed_for_name``,
            ``approval_invalid``, ``policy_invalid``, ``fingerprint_unverifiable``,
            ``existing_key_protected``,
            ``key_version_limit``, ``hsm_key_limit``, ``key_exists``.
        TransientError: the HSM or storage failed; the message also offers ``--force-offline``.
    """
    from byok_pipeline.processing.authorize import (
        Authorization,
        AwaitingApproval,
        authorize,
        check_existing,
        check_verifiable,
    )
    from byok_pipeline.processing.importer import validate

    cid = uuid.uuid4().hex
    name = local.key_name
    with _offering_force_offline():
        validated = validate(
            local.data, local.options, settings=settings, hsm=hsm, clock=clock, request_id=cid
        )
        imported = hsm.find_imported(name, local.sha256, request_id=cid)
    if imported is not None:
        raise Rejected(
            "already_imported",
            f"this exact package (SHA-256 {local.sha256[:16]}...) is already imported as "
            f"{imported.kid}: nothing to upload (`byok status {name}` shows it)",
        )
    with _offering_force_offline():
        policy = authz.policy()
    now = clock()
    waiting: dict[str, Any] | None = None
    try:
        auth = authorize(
            policy=policy,
            authz=local.beside,
            settings=settings,
            key_name=name,
            package_sha256=local.sha256,
            options=local.options,
            dropped=now,
            now=now,
        )
    except AwaitingApproval as exc:  # the approvals may come after the upload
        rule = policy.rule_for(name) if policy is not None else None
        auth = Authorization(policy, rule, local.options, exc.approvals)
        waiting = {"missing": exc.approvals.missing, "required": exc.approvals.required}
    target = validated.target_type.name
    check_verifiable(auth, validated.key_ops)
    with _offering_force_offline():
        checked = check_existing(
            hsm, auth, name, target, package_sha256=local.sha256, package_id=None, request_id=cid
        )
    if checked.ours is not None:  # tagged by another copy or an earlier import of it
        raise Rejected(
            "already_imported",
            f"this package is already imported as version {checked.ours} of {name!r}: "
            "nothing to upload",
        )
    existing = checked.existing
    if existing is not None and not new_version:
        raise Rejected(
            "key_exists",
            f"a key named {name!r} already exists in the HSM ({existing.kid}): this package "
            "would become its next version. Give --new-version if that is meant (the import "
            "policy must allow it), or wrap the key under another name",
        )
    return {
        "kek_kid": validated.kek_kid.kid,
        "target_type": target,
        "new_version_of": existing.kid if existing is not None else None,
        "policy_sha256": policy.sha256 if policy is not None else None,
        "approvals_missing": waiting,
    }


@contextmanager
def _offering_force_offline() -> Iterator[None]:
    """A failure of the HSM (unreachable, no login, no role) also offers ``--force-offline``.

    Raises:
        TransientError: as raised, its message extended.
    """
    try:
        yield
    except TransientError as exc:
        if exc.reason not in _OFFLINE_HELPS:
            raise
        raise TransientError(
            f"{exc.message}; or upload with the local checks only (--force-offline: the "
            "pipeline checks against the HSM again)",
            reason=exc.reason,
        ) from None
