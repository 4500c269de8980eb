"""M-of-N approvals of one package: which approvals count, which are refused, what is missing.

Pure: the approval files, the manifest's bytes and the policy's approvers in, a tally out. An
approval counts when its signature verifies against a known, unexpired approver of the rule's
group, it signs exactly the manifest the package was uploaded with, it names this package and
key name, and it is within its validity. One approver counts once, however many files they sign.
An approval that does not count is listed with its reason and never fails the package by itself
(a bad file cannot block a good package): the package waits for enough valid ones until its
approval deadline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from byok_pipeline.core.errors import Rejected
from byok_pipeline.core.policy import ApprovalRequirement
from offline_packager.approval import (
    ApprovalClaims,
    ApprovalError,
    Approver,
    parse_approval,
    verify_approval,
)

#: How many approval files of one package are read per delivery (storage reads stay bounded
#: whatever a writer of the approvals container puts there); every file read is checked, so
#: junk below this count hides no approval, and more are named in the status as not read.
MAX_APPROVAL_FILES = 256


def _ts(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class GivenApproval:
    approver_id: str
    spki_sha256: str
    signed_at: str
    not_after: str
    file: str


@dataclass(frozen=True)
class RefusedApproval:
    file: str
    reason: str
    message: str


@dataclass(frozen=True)
class ApprovalTally:
    group: str
    required: int
    given: tuple[GivenApproval, ...]
    refused: tuple[RefusedApproval, ...]
    waiting_for: tuple[str, ...]  # approvers of the group who have not approved yet

    @property
    def complete(self) -> bool:
        return len(self.given) >= self.required

    @property
    def missing(self) -> int:
        return max(0, self.required - len(self.given))

    def to_status(self) -> dict[str, Any]:
        """The ``approvals`` member of the status document (no signature, no key material)."""
        return {
            "group": self.group,
            "required": self.required,
            "missing": self.missing,
            "given": [g.__dict__ for g in self.given],
            "refused": [r.__dict__ for r in self.refused],
            "waiting_for": list(self.waiting_for),
        }

    def approvers(self) -> list[dict[str, str]]:
        """Who approved, for the audit events: ids and key fingerprints only."""
        return [{"id": g.approver_id, "spki_sha256": g.spki_sha256} for g in self.given]


def _short(name: str, limit: int = 100) -> str:
    """An uploader-chosen file name, bounded for status documents and audit events."""
    return name if len(name) <= limit else f"{name[: limit - 3]}..."


def refused_summary(refused: Sequence[RefusedApproval], *, names: int = 3) -> str:
    """``N approval_invalid (a.json, b.json, ...); M approval_expired (...)``: bounded."""
    by_reason: dict[str, list[str]] = {}
    for r in refused:
        by_reason.setdefault(r.reason, []).append(r.file)
    return "; ".join(
        f"{len(files)} {reason} ({', '.join(files[:names])}{', ...' if len(files) > names else ''})"
        for reason, files in sorted(by_reason.items())
    )


def tally(
    requirement: ApprovalRequirement,
    approvers: dict[str, Approver],
    files: Sequence[tuple[str, bytes]],
    *,
    manifest: bytes,
    key_name: str,
    package_sha256: str,
    now: datetime,
    unread: int = 0,
) -> ApprovalTally:
    """Count the approvals in ``files`` (name, bytes) against the rule's group; every file is
    checked (the store bounds how many are read: ``unread`` more were not)."""
    given: dict[str, GivenApproval] = {}
    refused: list[RefusedApproval] = []
    for name, data in sorted(files):
        try:
            approval = _check_one(
                data,
                approvers,
                manifest=manifest,
                key_name=key_name,
                package_sha256=package_sha256,
                now=now,
            )
        except (ApprovalError, Rejected) as exc:
            refused.append(RefusedApproval(_short(name), exc.reason, exc.message[:300]))
            continue
        if approval.approver_id not in given:
            given[approval.approver_id] = GivenApproval(
                approver_id=approval.approver_id,
                spki_sha256=approvers[approval.approver_id].spki_sha256,
                signed_at=_ts(approval.signed_at),
                not_after=_ts(approval.not_after),
                file=name,
            )
    if unread:
        refused.append(
            RefusedApproval(
                f"{unread} more file(s)",
                "approval_invalid",
                f"not read: a package has at most {MAX_APPROVAL_FILES} approval files read; "
                "remove the files that are not approvals of this package",
            )
        )
    return ApprovalTally(
        group=requirement.group,
        required=requirement.required,
        given=tuple(given.values()),
        refused=tuple(refused),
        waiting_for=tuple(sorted(set(approvers) - set(given))),
    )


def _check_one(
    data: bytes,
    approvers: dict[str, Approver],
    *,
    manifest: bytes,
    key_name: str,
    package_sha256: str,
    now: datetime,
) -> ApprovalClaims:
    """One approval's claims, verified.

    Raises:
        Rejected: ``approval_wrong_package`` (another key name, package or manifest),
            ``approval_unknown_approver``.
        ApprovalError: ``approval_invalid``, ``approval_wrong_package``, ``approval_expired``.
    """
    claims = parse_approval(data)
    # what the (still unverified) header says it approves: a mismatch is refused as such, a
    # clearer answer than the signature failure it would otherwise be
    if claims.key_name != key_name:
        raise Rejected(
            "approval_wrong_package",
            f"the approval is for key name {claims.key_name!r}, not {key_name!r}",
        )
    if claims.package_sha256 != package_sha256:
        raise Rejected("approval_wrong_package", "the approval is for another package")
    if claims.manifest_sha256 != hashlib.sha256(manifest).hexdigest():
        raise Rejected("approval_wrong_package", "the approval signs another manifest")
    approver = approvers.get(claims.approver_id)
    if approver is None:
        raise Rejected(
            "approval_unknown_approver",
            f"{claims.approver_id!r} is not an approver of the group the policy requires",
        )
    # the signature covers the header, so the claims checked above are now proven too
    return verify_approval(data, manifest=manifest, approver=approver, now=now)
