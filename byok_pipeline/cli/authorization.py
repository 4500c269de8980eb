"""``byok policy validate|show|set`` and ``byok approve upload``; the attachments ``byok upload``
stores beside a package (its manifest and approvals)."""

from __future__ import annotations

import argparse
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from byok_pipeline.core.errors import Rejected
from byok_pipeline.core.policy import load_policy
from offline_packager.approval import (
    MAX_APPROVAL_BYTES,
    ApprovalClaims,
    ApprovalError,
    parse_approval,
)

if TYPE_CHECKING:  # the storage SDK is imported by the commands that use it
    from byok_pipeline.adapters.authorization_store import Attachments

Out = Callable[[argparse.Namespace, dict[str, Any], str], None]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    policy = sub.add_parser(
        "policy",
        help="the import policy: validate a file, show or set the one in force",
        description="The import policy decides which key names may be imported, as which "
        "target types, with whose approvals, and whether an existing key may get a new "
        "version. It is a JSON document (schema: byok_pipeline/schemas/import-policy.schema.json) "
        "stored in BYOK_CONFIG_CONTAINER/BYOK_POLICY_BLOB, writable by policy administrators only.",
    )
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    validate = policy_sub.add_parser(
        "validate", help="check a policy file offline (exit 0 valid, 2 invalid)"
    )
    validate.add_argument("file", metavar="POLICY.json")
    validate.add_argument("--json", action="store_true", help="machine-readable output")
    policy_sub.add_parser(
        "show", parents=[common], help="the policy in force: rules, approver groups, SHA-256"
    )
    set_ = policy_sub.add_parser(
        "set",
        parents=[common],
        help="validate FILE, then make it the policy in force (audited: byok.policy.changed)",
    )
    set_.add_argument("file", metavar="POLICY.json")
    set_.add_argument("--actor", help="who sets it, for the audit (default: user@host)")

    approve = sub.add_parser("approve", help="store signed approvals for a waiting package")
    approve_sub = approve.add_subparsers(dest="approve_command", required=True)
    up = approve_sub.add_parser(
        "upload",
        parents=[common],
        help="store NAME.approval-ID.json (from `byok-package approve`) for its package; a "
        "package awaiting approval is then processed again",
    )
    up.add_argument("approval", nargs="+", metavar="NAME.approval-ID.json")


def _read(path: str, limit: int, what: str) -> bytes:
    """Raises: Rejected (``file_not_found``, ``unreadable_input``, ``plaintext_key``;
    ``{what}_invalid`` over ``limit`` bytes)."""
    from byok_pipeline.cli.files import read_local

    return read_local(path, what=what, limit=limit, too_large=f"{what}_invalid")


def cmd_policy(
    args: argparse.Namespace,
    *,
    store: Callable[[], Any],
    audit: Callable[[dict[str, Any]], None],
    out: Out,
) -> int:
    """Raises: Rejected (``policy_invalid``), TransientError, ConfigError."""
    if args.policy_command == "validate":
        policy = load_policy(_read(args.file, 1024 * 1024, "policy"))
        summary = policy.summary()
        out(args, {"valid": True, **summary}, f"{args.file}: valid (sha256 {policy.sha256})")
        return 0
    authz = store()
    if args.policy_command == "show":
        found = authz.policy_bytes()
        if found is None:
            out(
                args,
                {"policy": None},
                "no import policy is set: the safe defaults apply (new names import; existing "
                "keys not imported by the pipeline and KEKs are protected)",
            )
            return 0
        policy = load_policy(found[0])
        out(args, policy.summary(), _describe(policy.summary()))
        return 0
    data = _read(args.file, 1024 * 1024, "policy")
    policy = load_policy(data)  # refuses an invalid file before anything is written
    found = authz.policy_bytes()
    old = hashlib.sha256(found[0]).hexdigest() if found else None
    authz.put_policy(data, replaces=found[1] if found else None)  # never a lost update
    from byok_pipeline.audit.events import cli_event
    from byok_pipeline.cli.upload import default_uploader

    event = cli_event(
        "byok.policy.changed",
        correlation_id=uuid.uuid4().hex,
        policy_sha256=policy.sha256,
        actor=args.actor or default_uploader(),
    )
    event["old_policy_sha256"] = old  # null: there was no policy before
    audit(event)
    out(
        args,
        {"policy_sha256": policy.sha256, "old_policy_sha256": old},
        f"import policy set: sha256 {policy.sha256} (was {old or 'none'})",
    )
    return 0


def _describe(summary: dict[str, Any]) -> str:
    lines = [f"import policy sha256 {summary['sha256']}"]
    lines.append(f"approval deadline: {summary['approval_deadline_hours']} h after the drop")
    for rule in summary["rules"]:
        types = rule["target_types"]
        lines.append(
            f"  {rule['match']}: types {', '.join(types) if isinstance(types, list) else types}; "
            f"approvals {rule['approvals']}; new version "
            f"{'allowed' if rule['allow_new_version'] else 'refused'}"
        )
    for group, members in summary["approver_groups"].items():
        ids = ", ".join(f"{m['id']} ({m['spki_sha256'][:16]}...)" for m in members)
        lines.append(f"  group {group}: {ids}")
    return "\n".join(lines)


def approval_leaf(data: bytes, approver_id: str) -> str:
    """The blob name of an approval under its package: one per approver and content."""
    return f"approval-{approver_id}-{hashlib.sha256(data).hexdigest()[:12]}.json"


def check_approval(data: bytes, path: str, *, package_sha256: str | None = None) -> ApprovalClaims:
    """An approval's form, checked locally (and, given ``package_sha256``, that it approves
    that package).

    Raises:
        Rejected: ``approval_invalid`` (not an approval), ``approval_wrong_package``.
    """
    try:
        claims = parse_approval(data)
    except ApprovalError as exc:
        raise Rejected("approval_invalid", f"{path}: {exc.message}") from None
    if package_sha256 is not None and claims.package_sha256 != package_sha256:
        raise Rejected(
            "approval_wrong_package", f"{path} approves another package (SHA-256 differs)"
        )
    return claims


def store_approval(
    authz: Any, data: bytes, path: str, *, package_sha256: str | None = None
) -> dict[str, Any]:
    """Check an approval (:func:`check_approval`), then store it under its package's SHA-256.

    Raises:
        Rejected: as :func:`check_approval`; ``approval_invalid`` (another file under that
            name).
        TransientError: storage failed.
    """
    return put_approval(
        authz, data, path, check_approval(data, path, package_sha256=package_sha256)
    )


def put_approval(authz: Any, data: bytes, path: str, claims: ApprovalClaims) -> dict[str, Any]:
    """Store a checked approval under its package's SHA-256.

    Raises:
        Rejected: ``approval_invalid``: another file is already stored under that name.
        TransientError: storage failed.
    """
    leaf = approval_leaf(data, claims.approver_id)
    created = authz.put_attachment(claims.package_sha256, leaf, data)
    return {
        "file": path,
        "approver_id": claims.approver_id,
        "key_name": claims.key_name,
        "package_sha256": claims.package_sha256,
        "stored_as": f"{claims.package_sha256}/{leaf}",
        "already_stored": not created,
    }


def cmd_approve(args: argparse.Namespace, *, store: Callable[[], Any], out: Out) -> int:
    """Raises: Rejected (``approval_invalid``), TransientError, ConfigError."""
    authz = store()
    rows = [
        store_approval(authz, _read(path, MAX_APPROVAL_BYTES, "approval"), path)
        for path in args.approval
    ]
    human = "\n".join(
        f"stored {r['file']}: {r['approver_id']} approves {r['key_name']} "
        f"(package {r['package_sha256'][:16]}...)"
        + (" [already stored]" if r["already_stored"] else "")
        for r in rows
    )
    out(args, {"approvals": rows}, human + "\n  `byok status NAME` shows the approvals counted")
    return 0


@dataclass(frozen=True)
class Beside:
    """What ``byok upload`` sends with a package, read and checked before anything is sent:
    its manifest's exact bytes and every ``NAME.approval-*.json`` beside it."""

    package_sha256: str
    manifest: bytes | None
    approvals: tuple[tuple[str, bytes, ApprovalClaims], ...]

    def attachments(self, package_sha256: str) -> Attachments:
        """As :meth:`AuthorizationStore.attachments` will hold them after the upload (the
        import policy's approvals are counted over these before anything is sent)."""
        from byok_pipeline.adapters.authorization_store import Attachments

        assert package_sha256 == self.package_sha256  # noqa: S101  # one package per upload
        return Attachments(self.manifest, tuple((p, d) for p, d, _ in self.approvals))


def read_beside(package: Path, package_sha256: str, manifest: bytes | None) -> Beside:
    """The approvals beside ``package``, each read and checked locally.

    Raises:
        Rejected: ``approval_invalid`` / ``approval_wrong_package`` (a file beside it is not an
            approval of this package), ``plaintext_key``, ``unreadable_input``.
    """
    stem = package.name.removesuffix(".byok")
    approvals = []
    for path in sorted(package.parent.glob(f"{stem}.approval-*.json")):
        data = _read(str(path), MAX_APPROVAL_BYTES, "approval")
        claims = check_approval(data, str(path), package_sha256=package_sha256)
        approvals.append((str(path), data, claims))
    return Beside(package_sha256, manifest, tuple(approvals))


def upload_attachments(authz: Any, beside: Beside) -> dict[str, Any]:
    """Store the manifest and the approvals (before the package itself, so that its
    processing finds them).

    Raises:
        Rejected: ``approval_invalid`` (another file is stored under an approval's name).
        TransientError: storage failed.
    """
    sha = beside.package_sha256
    stored: dict[str, Any] = {"manifest": None, "approvals": []}
    if beside.manifest is not None:
        authz.put_attachment(sha, "manifest.json", beside.manifest)
        stored["manifest"] = f"{sha}/manifest.json"
    for path, data, claims in beside.approvals:
        stored["approvals"].append(put_approval(authz, data, path, claims))
    return stored
