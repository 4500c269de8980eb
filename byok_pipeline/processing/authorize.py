"""Authorization of one import, before any HSM call: the import policy's name and type rules
and the package's M-of-N approvals; then, once the KEK is read, the protection of existing keys.

Order (fixed, documented in README "Import authorization"): the name (never the KEK's; a rule
must match when there is a policy) → the stated target type → the approvals (over the manifest
the package was uploaded with) → [KEK checks] → the inferred target type → an approved
fingerprint the import can verify → the existing key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from byok_pipeline.adapters.authorization_store import Attachments
from byok_pipeline.adapters.keyvault import HsmAdapter
from byok_pipeline.core.approvals import ApprovalTally, refused_summary, tally
from byok_pipeline.core.errors import Rejected
from byok_pipeline.core.identity import same_package
from byok_pipeline.core.metadata import ImportOptions, options_from_manifest
from byok_pipeline.core.policy import (
    ExistingKey,
    ImportPolicy,
    Rule,
    check_existing_key,
    check_name,
    check_target_type,
)
from byok_pipeline.core.settings import Settings
from offline_packager.manifest import parse_manifest
from offline_packager.package_format import load_json_strict


class AttachmentSource(Protocol):
    """Where a package's manifest and approvals are read: the approvals container
    (:class:`~byok_pipeline.adapters.authorization_store.AuthorizationStore`), or the files
    beside a package that ``byok upload`` is about to send."""

    def attachments(self, package_sha256: str) -> Attachments: ...


class AwaitingApproval(Exception):  # a state, not an error
    """The policy's approvals are not all there yet; the package waits until ``deadline``."""

    def __init__(self, approvals: ApprovalTally, deadline: datetime) -> None:
        super().__init__(f"{approvals.missing} approval(s) missing")
        self.approvals = approvals
        self.deadline = deadline


@dataclass(frozen=True)
class Authorization:
    """What was decided: the rule that governs the name (None: no policy), the options to
    import with (from the signed manifest when approvals were required), the approvals."""

    policy: ImportPolicy | None
    rule: Rule | None
    options: ImportOptions
    approvals: ApprovalTally | None = None


def authorize(
    *,
    policy: ImportPolicy | None,
    authz: AttachmentSource,
    settings: Settings,
    key_name: str,
    package_sha256: str,
    options: ImportOptions,
    dropped: datetime,
    now: datetime,
) -> Authorization:
    """Everything that decides whether this package may be imported under ``key_name``, short
    of the HSM's own facts. Needs read on the config and approvals containers.

    ``policy`` is the configured policy (None: none), read by the caller.

    Raises:
        Rejected: ``key_name_not_allowed``,
            ``target_type_not_allowed_for_name``, ``approval_invalid`` (approvals required but
            no manifest), ``manifest_mismatch``, ``approval_expired`` (deadline passed).
        AwaitingApproval: approvals are missing and the deadline has not passed.
        TransientError: storage failed.
    """
    rule = check_name(policy, key_name, kek_name=settings.kek_name)
    stated = options.target_type.name if options.target_type else None
    check_target_type(rule, key_name, stated)
    if policy is None or rule is None or rule.approvals is None:
        return Authorization(policy, rule, options)
    attachments = authz.attachments(package_sha256)
    if attachments.manifest is None:
        raise Rejected(
            "approval_invalid",
            f"the import policy requires {rule.approvals.required} approval(s) of the manifest "
            f"for {key_name!r}, but the package was uploaded without its manifest: upload it "
            "again with NAME.manifest.json beside it (`byok upload`)",
        )
    signed = _signed_options(attachments.manifest, options, package_sha256)
    check_target_type(rule, key_name, signed.target_type.name if signed.target_type else None)
    result = tally(
        rule.approvals,
        policy.groups[rule.approvals.group],
        attachments.approvals,
        manifest=attachments.manifest,
        key_name=key_name,
        package_sha256=package_sha256,
        now=now,
        unread=attachments.unread,
    )
    if result.complete:
        return Authorization(policy, rule, signed, result)
    deadline = dropped + policy.approval_deadline
    if now >= deadline:
        refused = refused_summary(result.refused)
        raise Rejected(
            "approval_expired",
            f"{result.missing} of {result.required} approval(s) of group "
            f"{result.group!r} still missing at the deadline "
            f"({deadline:%Y-%m-%dT%H:%M:%SZ})"
            + (f"; refused: {refused}" if refused else "")
            + ": collect the approvals, then upload the package again",
        )
    raise AwaitingApproval(result, deadline)


def _signed_options(manifest: bytes, uploaded: ImportOptions, package_sha256: str) -> ImportOptions:
    """The import options the approvers signed (the manifest's), not the upload metadata's.

    Raises:
        Rejected: ``manifest_mismatch`` (another manifest than the package was uploaded with,
            or one that describes other bytes), ``bad_metadata`` (not a manifest).
    """
    digest = hashlib.sha256(manifest).hexdigest()
    if uploaded.manifest_sha256 != digest:
        raise Rejected(
            "manifest_mismatch",
            "the stored manifest is not the one the package was uploaded with: upload both again",
        )
    try:
        signed = options_from_manifest(
            parse_manifest(load_json_strict(manifest, what="manifest")), digest
        )
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001  # any failure on these uploader bytes is one refusal
        raise Rejected(
            "bad_metadata", f"the stored manifest is not a valid manifest ({type(exc).__name__})"
        ) from None
    if signed.package_sha256 != package_sha256:
        raise Rejected("manifest_mismatch", "the manifest describes another package")
    return replace(signed, uploader=uploaded.uploader, tags=uploaded.tags)


def check_verifiable(auth: Authorization, key_ops: Sequence[str]) -> None:
    """An approved fingerprint must be one the import can verify: approvers signed that the
    package holds the key with this fingerprint. An AES key's check value is computed in the HSM
    by encrypting a zero block, so a key without ``encrypt`` among its operations could only be
    recorded ``unverified`` (review finding: a manifest with another key's check value, approved,
    was imported enabled).

    Raises:
        Rejected: ``fingerprint_unverifiable``.
    """
    fp = auth.options.fingerprint
    if auth.approvals is None or fp is None or fp.kind != "kcv" or "encrypt" in key_ops:
        return
    raise Rejected(
        "fingerprint_unverifiable",
        "the approved manifest gives the AES key's check value, which the HSM computes only with "
        "the encrypt operation, and the key's operations lack it: package the key again with "
        "encrypt among its key operations and have it approved again, or import it under a rule "
        "that needs no approvals (its fingerprint is then recorded unverified)",
    )


def one_import_per_name(auth: Authorization) -> bool:
    """Whether two packages for one key name must not both be imported: with a policy whose
    rule for the name allows no new version, a second import would add one, so records of that
    name import one at a time (the processor claims the name before the existing-key check).
    Without a policy a version on top of the pipeline's own import is allowed anyway."""
    return auth.policy is not None and not (auth.rule is not None and auth.rule.allow_new_version)


@dataclass(frozen=True)
class ExistingCheck:
    """What :func:`check_existing` found: the key of that name (None: a new name) and the
    version already tagged with this package, if any."""

    existing: ExistingKey | None
    ours: str | None


def check_existing(
    hsm: HsmAdapter,
    auth: Authorization,
    key_name: str,
    target_type: str,
    *,
    package_sha256: str,
    package_id: str | None,
    request_id: str,
) -> ExistingCheck:
    """After the KEK checks: the inferred target type against the rule, then the key that
    already has this name, if any (one GET), then Managed HSM's limits: the versions of that
    key (listed only when it exists), or the HSM's key count for a new name (from the worker's
    cached count). Returns the existing key (None: a new name) and the version of
    ``key_name`` already tagged with this package (an import by ``byok import``, or by an
    earlier record), which is taken over instead of importing again. Needs keys/read.

    Raises:
        Rejected: ``target_type_not_allowed_for_name``, ``existing_key_protected``,
            ``key_version_limit``, ``hsm_key_limit``.
        TransientError: the HSM read failed.
    """
    check_target_type(auth.rule, key_name, target_type)
    existing = hsm.existing_key(key_name, request_id=request_id)
    if existing is not None and same_package(
        existing.package_sha256_tag, existing.package_id_tag, package_sha256, package_id
    ):
        # this very package: nothing to protect
        return ExistingCheck(existing, existing.kid.rstrip("/").split("/")[-1])
    check_existing_key(existing, auth.rule, key_name, policy=auth.policy is not None)
    limits = hsm.settings
    if existing is not None:
        most = limits.hsm_max_versions_per_key
        count, ours = hsm.scan_versions(
            key_name,
            stop_at=most,
            package_sha256=package_sha256,
            package_id=package_id,
            request_id=request_id,
        )
        if ours is not None:
            return ExistingCheck(existing, ours)
        if count >= most:
            raise Rejected(
                "key_version_limit",
                f"{key_name!r} already has {most} versions, Managed HSM's limit per key, and "
                "versions cannot be deleted one by one: import under a new key name (and move "
                "its users to it), then upload again",
            )
        return ExistingCheck(existing, None)
    most = limits.hsm_max_keys
    if hsm.count_keys(stop_at=most, request_id=request_id) >= most:
        raise Rejected(
            "hsm_key_limit",
            f"the HSM holds {most} keys, Managed HSM's limit: delete and purge keys that are "
            "no longer needed, or import into another HSM, then upload again",
        )
    return ExistingCheck(None, None)
