"""Processing one dropped package, exactly once: claim → validate → import → verify → record.

Exactly-once rests on three mechanisms (see README "How exactly-once works"):
1. the status document ``packages/<sha256>.json`` is created with ``if_none_match='*'``:
   the first delivery of these bytes claims them;
2. a blob lease on that document serialises workers; a delivery that finds it leased raises
   :class:`InProgress` so the platform redelivers later;
3. before every import attempt the HSM is searched for a version tagged with the package's
   SHA-256, so a crash between import and status write never imports twice; the lease is
   renewed right before each import PUT, whose timeouts are bounded well inside the lease, and
   a takeover waits until an earlier PUT can no longer land.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from azure.storage.blob import BlobLeaseClient

from byok_pipeline.adapters.authorization_store import AuthorizationStore
from byok_pipeline.adapters.blobstore import BlobGone, BlobStore, IncomingBlob
from byok_pipeline.adapters.keyvault import HsmAdapter, ImportedKey
from byok_pipeline.adapters.telemetry import PackageSpan, package_span
from byok_pipeline.adapters.transient import PERSON_FIXES
from byok_pipeline.audit.events import AuditSink, event_for_state, utc_now, verified_event
from byok_pipeline.core.errors import InProgress, Rejected, TransientError
from byok_pipeline.core.identity import package_id
from byok_pipeline.core.metadata import ImportOptions, parse_fingerprint, parse_metadata
from byok_pipeline.core.policy import ImportPolicy, PolicyInvalid
from byok_pipeline.core.settings import Settings
from byok_pipeline.core.status import ARCHIVED, TERMINAL, StatusDoc, parse_utc, utc
from byok_pipeline.core.validation import read_package
from byok_pipeline.processing.authorize import (
    Authorization,
    AwaitingApproval,
    authorize,
    check_existing,
    check_verifiable,
    one_import_per_name,
)
from byok_pipeline.processing.importer import fingerprint_result, import_validated, validate
from offline_packager.guard import refuses
from offline_packager.kid import KEY_NAME_RE

log = logging.getLogger("byok_pipeline")

# fullmatch only: ``$`` would match before a final newline ("x.byok\n" is not NAME.byok)
_BLOB_NAME_RE = re.compile(r"(?P<name>[0-9a-zA-Z-]{1,127})\.byok")
Fault = Callable[[str], None]


def _no_fault(stage: str) -> None:
    """Production: no fault injection. Tests pass a hook that crashes at a named stage."""


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Deps:
    """Everything processing needs; clock, ids and fault points are seams for tests."""

    settings: Settings
    store: BlobStore
    hsm: HsmAdapter
    audit: AuditSink
    clock: Callable[[], datetime] = utc_now
    new_id: Callable[[], str] = _new_id
    fault: Fault = _no_fault
    authz: AuthorizationStore | None = None  # None: built from the blob store's account

    def __post_init__(self) -> None:
        if self.authz is None:
            self.authz = AuthorizationStore(self.store.service, self.settings)

    @property
    def authorization(self) -> AuthorizationStore:
        assert self.authz is not None  # noqa: S101  # set in __post_init__
        return self.authz


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery."""

    state: str  # a status state, or "gone" (nothing left to do)
    status_path: str | None = None
    doc: StatusDoc | None = field(default=None, repr=False)

    @property
    def reason_code(self) -> str | None:
        return self.doc.reason_code if self.doc else None


def _bad_key_name(message: str) -> Rejected:
    return Rejected("bad_key_name", message)


@refuses(_bad_key_name)
def key_name_of(blob_name: str) -> str:
    """``NAME.byok`` → ``NAME``, the whole blob name matched (no control character, no
    trailing newline, nothing outside the grammar).

    Raises:
        Rejected: reason ``bad_key_name``.
    """
    match = _BLOB_NAME_RE.fullmatch(blob_name)
    if match is None or not KEY_NAME_RE.fullmatch(match["name"]):
        raise Rejected(
            "bad_key_name", "blob must be named NAME.byok, NAME matching ^[0-9a-zA-Z-]{1,127}$"
        )
    return match["name"]


def _drop_hash(blob: IncomingBlob) -> str:
    return hashlib.sha256(f"{blob.name}\n{blob.etag}".encode()).hexdigest()[:32]


def _fresh_doc(blob: IncomingBlob, sha: str | None, deps: Deps) -> StatusDoc:
    doc = StatusDoc(
        blob_name=blob.name,
        package_sha256=sha,
        etag=blob.etag,
        correlation_id=deps.new_id(),
        drop_time=utc(blob.created.astimezone(UTC)) if blob.created else None,
        uploader=(blob.metadata or {}).get("byok_uploader"),
    )
    with contextlib.suppress(Rejected):  # a bad name is refused later, with its reason
        doc.key_name = key_name_of(blob.name)
    doc.advance("received", deps.clock())
    return doc


def _ascii(text: str, limit: int = 512) -> str:
    """Blob metadata values are HTTP header values: printable ASCII only. A safe rendering of
    an attacker-chosen name: non-ASCII, CR, LF, tabs and other controls become escapes."""
    return text.encode("unicode_escape").decode("ascii")[:limit]


def check_drop(
    blob: IncomingBlob, sha: str | None, settings: Settings
) -> tuple[str, ImportOptions]:
    """The drop's own checks, in the documented order: size, blob name, upload metadata and
    the manifest's package SHA-256. They come before any duplicate check, so a drop is
    refused for what it is, whatever was dropped before.

    Raises:
        Rejected: ``too_large``, ``bad_key_name``, ``bad_metadata``, ``manifest_mismatch``.
    """
    if blob.data is None:
        raise Rejected(
            "too_large",
            f"package is {blob.size} bytes, over the {settings.max_package_bytes}-byte limit",
        )
    key_name = key_name_of(blob.name)
    options = parse_metadata(blob.metadata)
    if options.package_sha256 and options.package_sha256 != sha:
        raise Rejected(
            "manifest_mismatch", "the package differs from the one its manifest describes"
        )
    return key_name, options


class _Run:
    """One leased processing run of one status document."""

    def __init__(
        self, deps: Deps, blob: IncomingBlob, path: str, doc: StatusDoc, lease: BlobLeaseClient
    ) -> None:
        self.deps = deps
        self.blob = blob
        self.path = path
        self.doc = doc
        self.lease = lease
        self._attempt_noted = float("-inf")  # monotonic time the last import attempt was saved
        self._policy: ImportPolicy | None = None
        self._policy_error: PolicyInvalid | None = None
        self._policy_sha256: str | None = None

    def load_policy(self) -> None:
        """Read the import policy and its SHA-256 together (from the worker's cache, or one
        conditional request) before this attempt's first audit event, so that every event
        names the policy in force.

        Raises:
            TransientError: storage failed.
        """
        outcome, sha = self.deps.authorization.snapshot()
        self._policy_sha256 = sha
        if isinstance(outcome, PolicyInvalid):  # a fresh exception: the cached one is shared
            self._policy, self._policy_error = None, PolicyInvalid(outcome.message)
        else:
            self._policy, self._policy_error = outcome, None
        if not self.doc.reached("validated"):  # frozen: the policy that authorized the import
            self.doc.policy_sha256 = sha

    # -- recording --------------------------------------------------------------------------
    def save(self, *, renew: bool = False, keep_for: float | None = None) -> None:
        self.deps.store.save_status(self.path, self.doc, self.lease, renew=renew, keep_for=keep_for)

    def flush_audit(self) -> None:
        """Emit every history entry not yet audited, in order and in one batch (one signed
        trail append), then mark them (next save)."""
        entries = self.doc.unaudited()
        events: list[dict[str, object]] = []
        for entry in entries:
            events.append(event_for_state(self.doc, entry.state, entry.attempt, entry.time))
            if entry.state == "imported" and self.doc.fingerprint_result == "match":
                events.append(verified_event(self.doc, entry))
        emit_or_retry(self.deps.audit, *events)
        for entry in entries:
            entry.audited = True

    def record(self, *states: str, keep_for: float | None = None) -> bool:
        """Advance through ``states``, write the status durably once, then audit each change
        (one signed append). False when nothing changed (nothing written)."""
        now = self.deps.clock()
        if not [state for state in states if self.doc.advance(state, now)]:
            return False
        self.save(keep_for=keep_for)
        self.flush_audit()
        return True

    def finish(self, state: str, *, reason: str | None = None, message: str | None = None) -> None:
        """The outcome: written durably first (with where the package goes), then audited (one
        signed append), then the audited marks written, then the package moved out of
        incoming. When the append fails the outcome stays written, unaudited: redelivery (or
        the reconciler) audits it; no event ever names a state the status did not hold."""
        doc = self.doc
        doc.reason_code = reason
        if message is not None:  # else the message set for this outcome (a duplicate's) stays
            doc.message = message
        doc.throttled_until = None
        doc.advance(state, self.deps.clock())
        doc.disposition = self._destination()[2]
        self.save()
        self.flush_audit()
        self.save()  # the audited marks, before the move (a failed move is retried unaudited)
        self.dispose()

    def _destination(self) -> tuple[str, str, str]:
        s = self.deps.settings
        container = s.archive_container if self.doc.state in ARCHIVED else s.quarantine_container
        if self.blob.data is None:
            dest = f"_oversize/{_drop_hash(self.blob)}.byok"
        else:
            folder = self.doc.key_name or "_invalid-name"
            dest = f"{folder}/{self.doc.package_sha256}.byok"
        return container, dest, f"{container}/{dest}"

    def dispose(self) -> None:
        """Move the package out of incoming (status already durable); note it if it stayed."""
        container, dest, _ = self._destination()
        meta = {
            "original_name": _ascii(self.blob.name),
            "state": self.doc.state or "",
            "correlation_id": self.doc.correlation_id,
        }
        where = self.deps.store.dispose(self.blob, container, dest, meta) or (
            "left in incoming: replaced by a newer drop under the same name"
        )
        if self.doc.disposition != where:
            self.doc.disposition = where
            self.save()

    # -- the steps --------------------------------------------------------------------------
    def run(self) -> None:
        """Check the drop, import it (or find the import of an earlier attempt), verify it.

        Raises:
            Rejected: the package is refused (nothing was imported), or verifying it was.
            TransientError: a dependency failed; the attempt may be repeated.
        """
        data, options = self._check_drop()
        package, kid = read_package(data, self.deps.settings)
        self.doc.kek_kid = kid.kid
        first = self._claim_identity(package_id(package, kid))
        if first is not None:
            self._finish_duplicate(*first)
            return
        imported = self._earlier_import()
        if imported is None or not self.doc.reached("importing"):
            # a version found for a record that never sent a PUT itself (an earlier, refused
            # record of these bytes did) is taken over only through the same checks
            auth = self._authorize(options)
            imported = self._validate_and_import(data, auth, found=imported)
        self.doc.imported_kid = imported.kid  # from here on a crash is recovered by its tag
        self._verify(imported)

    def _check_drop(self) -> tuple[bytes, ImportOptions]:
        """The blob's size, name and upload metadata (the manifest it was uploaded with)."""
        doc = self.doc
        doc.key_name, options = check_drop(self.blob, doc.package_sha256, self.deps.settings)
        doc.manifest_sha256 = options.manifest_sha256
        if options.fingerprint is not None and not doc.reached("validated"):
            # frozen once validated: a resumed run verifies against what was authorized
            doc.fingerprint_expected = f"{options.fingerprint.kind}:{options.fingerprint.value}"
        assert self.blob.data is not None  # noqa: S101  # check_drop refused an oversize blob
        return self.blob.data, options

    def _claim_identity(self, identity: str) -> tuple[str, StatusDoc] | None:
        """Exactly-once is by canonical identity (core.identity), not by the file's bytes: the
        first record of this identity owns it. Returns that record (path, document) when it is
        another one this drop duplicates; None when this record owns the identity (claimed now,
        earlier, or taken over from a record that was refused).

        Raises:
            InProgress: other drops of the same package kept taking the identity over.
            TransientError: storage failed.
        """
        doc, store = self.doc, self.deps.store
        if doc.package_id == identity:
            return None  # claimed by an earlier attempt of this record
        refused: StatusDoc | None = None
        for _ in range(3):
            owner, etag = store.claim_identity(identity, self.path)
            if owner == self.path:
                break
            first = store.load_status(owner)
            if first is not None and first.state not in _RETRYABLE_REFUSALS:
                if not first.terminal:  # it may still fail: then this copy is the package
                    raise InProgress(
                        f"the first drop of this package ({first.blob_name[:200]!r}) is still "
                        "being processed; this copy waits for its outcome"
                    )
                return owner, first
            if store.take_identity(identity, self.path, etag):
                refused = first
                break
        else:
            raise InProgress("another drop of the same package is claiming it; retry later")
        doc.package_id = identity
        if refused is not None and refused.reached("importing"):
            # the refused record sent an import PUT: this copy looks for its version (by the
            # identity tag) and waits while that PUT may still land
            doc.import_may_exist = True
            doc.import_attempt_at = refused.import_attempt_at
            if self.import_in_flight():
                self.save()
                raise InProgress("an import PUT of an earlier copy may still land; retry later")
        return None

    def _finish_duplicate(self, first_path: str, first: StatusDoc) -> None:
        """A reformatted copy of a package already claimed: ``duplicate`` of its first record."""
        doc = self.doc
        doc.package_id = first.package_id
        doc.duplicate_of = first_path
        doc.imported_kid = first.imported_kid
        doc.target_type = first.target_type
        doc.message = _same_package_message(first)
        self.finish("duplicate")

    def _earlier_import(self) -> ImportedKey | None:
        """After a crash past ``importing``, or when an earlier record of these bytes sent an
        import PUT, the import may have happened: the version tagged with this package's
        SHA-256, if any (looked up only then: a fresh claim costs nothing)."""
        doc = self.doc
        if not (doc.reached("importing") or doc.import_may_exist):
            return None
        if not doc.key_name or not doc.package_sha256:
            return None
        return self.deps.hsm.find_imported(
            doc.key_name,
            doc.package_sha256,
            package_id=doc.package_id,
            request_id=doc.correlation_id,
        )

    def _authorize(self, options: ImportOptions) -> Authorization:
        """Policy and approvals, before any HSM call (see processing.authorize).

        Raises:
            Rejected, AwaitingApproval, TransientError: as :func:`authorize`.
        """
        doc, deps = self.doc, self.deps
        assert doc.key_name is not None  # noqa: S101  # set by _check_drop
        assert doc.package_sha256 is not None  # noqa: S101  # data was read, so it was hashed
        if self._policy_error is not None:
            raise self._policy_error
        doc.policy_sha256 = self._policy_sha256  # the policy that authorizes this attempt
        now = deps.clock()
        dropped = parse_utc(doc.drop_time or doc.history[0].time)
        try:
            auth = authorize(
                policy=self._policy,
                authz=deps.authorization,
                settings=deps.settings,
                key_name=doc.key_name,
                package_sha256=doc.package_sha256,
                options=options,
                dropped=dropped,
                now=now,
            )
        except AwaitingApproval as waiting:
            doc.approvals = waiting.approvals.to_status()
            doc.approval_deadline = utc(waiting.deadline)
            if doc.reached("validated"):  # complete before, short now (expired, policy raised M)
                raise Rejected(
                    "approval_expired",
                    f"the approvals were complete when the package was validated but "
                    f"{waiting.approvals.missing} are missing now (an approval expired, or the "
                    "policy changed); collect them again and upload the package again",
                ) from None
            raise
        doc.approvals = auth.approvals.to_status() if auth.approvals else None
        fp = auth.options.fingerprint  # the signed manifest's, when approvals were required
        doc.fingerprint_expected = f"{fp.kind}:{fp.value}" if fp else None
        return auth

    def _validate_and_import(
        self, data: bytes, auth: Authorization, *, found: ImportedKey | None = None
    ) -> ImportedKey:
        """Validate against the KEK and the existing key, then import (audited before the PUT),
        or take over the version already tagged with this package (``found``, or one the
        existing-key check met): an import by ``byok import`` or by an earlier record.

        Raises:
            Rejected: a check refused; ``earlier_version_disabled`` for a disabled version.
            TransientError: a dependency failed.
        """
        doc, deps, options = self.doc, self.deps, auth.options
        assert doc.key_name is not None  # noqa: S101  # set by _check_drop
        assert doc.package_sha256 is not None  # noqa: S101  # data was read, so it was hashed
        validated = validate(
            data,
            options,
            settings=deps.settings,
            hsm=deps.hsm,
            clock=deps.clock,
            request_id=doc.correlation_id,
        )
        doc.target_type = validated.target_type.name
        doc.target_type_source = "inferred" if validated.target_type_inferred else "stated"
        doc.key_ops = list(validated.key_ops)
        check_verifiable(auth, validated.key_ops)
        if one_import_per_name(auth):  # before the check: what it sees stays true to the PUT
            self._claim_key_name(doc.key_name)
        checked = check_existing(
            deps.hsm,
            auth,
            doc.key_name,
            validated.target_type.name,
            package_sha256=doc.package_sha256,
            package_id=doc.package_id,
            request_id=doc.correlation_id,
        )
        if found is None and checked.ours is not None:
            found = deps.hsm.get_imported(doc.key_name, checked.ours, request_id=doc.correlation_id)
        if found is not None:
            return self._take_over(found)
        # both states in one write, with the import attempt noted and the lease renewed if it
        # would not outlive the PUT: the first PUT follows at once (see _before_put). No look
        # for an earlier import: _earlier_import looked if an earlier attempt got this far.
        doc.import_attempt_at = utc(deps.clock())
        keep_for = deps.hsm.put_timeout_seconds()
        # audited before the PUT: with the trail down nothing is imported (one signed append
        # with this attempt's `received`)
        if not self.record("validated", "importing", keep_for=keep_for):
            self.save(keep_for=keep_for)  # a later attempt: its PUT is noted durably all the same
        self._attempt_noted = time.monotonic()
        deps.fault("before_import")
        imported = import_validated(
            deps.hsm,
            doc.key_name,
            data=data,
            package_sha256=doc.package_sha256,
            validated=validated,
            options=options,
            request_id=doc.correlation_id,
            package_id=doc.package_id,
            look_first=False,
            before_put=self._before_put,
        )
        deps.fault("after_import")
        return imported

    def _claim_key_name(self, key_name: str) -> None:
        """Claim the key name for this record (``keys/<name>``), so that no other record of the
        same name (in any case: Managed HSM's names are case-insensitive) passes the
        existing-key check while this one may still import: two packages for one new name
        under a rule that allows no new version would otherwise both see no key and both
        import, the second as a new version.

        The claim passes to another record when its owner has finished (any final state), or
        is idle: this record can lease the owner's status (no worker holds it; and once leased
        here, a worker whose lease ran out can no longer renew it, so it sends no PUT on its
        old check) and no import PUT of it may still land (a drop withdrawn after a failed try,
        a record waiting for approvals, a retired record). An owner claiming again on a later
        attempt re-takes the claim conditionally, so a record that judged it idle a moment
        before fails its take.

        Raises:
            InProgress: another record of this key name is being processed (not an attempt).
            TransientError: storage failed.
        """
        store = self.deps.store
        for _ in range(3):
            owner, etag, created = store.claim_key_name(key_name, self.path)
            if owner == self.path:
                if created or store.take_key_name(key_name, self.path, etag):
                    return
                continue  # taken meanwhile: see by whom
            other = store.load_status(owner)
            if other is None or other.terminal:
                if store.take_key_name(key_name, self.path, etag):
                    return
                continue
            busy = (
                f"another package for key {key_name!r} ({other.blob_name[:200]!r}) is being "
                "imported; this one waits for its outcome"
            )
            # unfinished: judged idle only under its own lease, taken here as a fence (review
            # finding: a worker paused past its lease renewed it and sent its PUT after another
            # record had judged it idle; once another lease was taken, its renewal fails)
            try:
                fence = store.lease(owner)
            except InProgress:
                self._wait(busy)
            try:
                other = store.load_status(owner)  # read under the fence: not stale
                if other is not None and not other.terminal and _import_may_land(other, self.deps):
                    self._wait(busy)
                if store.take_key_name(key_name, self.path, etag):
                    return
            finally:
                store.release(fence)
        self._wait(f"other packages for key {key_name!r} are claiming it; this one waits")

    def _wait(self, why: str) -> NoReturn:
        """Hand the package back to wait for another record: not an attempt; ``byok status``
        shows why.

        Raises:
            InProgress: always.
            TransientError: storage failed (writing the status).
        """
        self.doc.attempts -= 1
        self.doc.last_error = why
        self.save()
        raise InProgress(why)

    def _take_over(self, found: ImportedKey) -> ImportedKey:
        """This package is already imported (a version tagged with it): recorded as this
        record's import, then verified like one. A disabled version is never taken over: it was
        disabled for a reason (a failed verification, an unknown outcome) a person must see.

        Raises:
            Rejected: ``earlier_version_disabled``.
            TransientError: storage or the audit sink failed.
        """
        if not found.enabled:
            raise Rejected(
                "earlier_version_disabled",
                f"this package was imported before as {found.kid}, and that version is "
                "disabled (it failed verification, or its import was uncertain): check it in "
                "the HSM (`byok status` shows the earlier record), enable it by hand if it is "
                "right, or import the key under a new name",
            )
        self.record("validated", "importing")
        return found

    def _verify(self, imported: ImportedKey) -> None:
        """Compare the imported key with the fingerprint recorded when the package was
        authorized (the signed manifest's, when approvals were required); a mismatch disables
        the new version."""
        doc, deps = self.doc, self.deps
        expected = parse_fingerprint(doc.fingerprint_expected) if doc.fingerprint_expected else None
        result = fingerprint_result(
            deps.hsm, imported, expected, doc.target_type, request_id=doc.correlation_id
        )
        doc.fingerprint_result = result
        if result == "mismatch":
            deps.hsm.disable_version(imported.name, imported.version, request_id=doc.correlation_id)
            self.finish(
                "verification_failed",
                reason="fingerprint_mismatch",
                message="the imported key differs from the manifest's fingerprint; "
                "the new version was disabled",
            )
        else:
            self.finish("imported")

    def settle_exhausted(self) -> None:
        """Every attempt is spent and the last PUT's outcome was unknown; it can no longer
        land now. Its version, if it landed, is verified like any import; else ``failed``.

        Raises:
            Rejected: verifying the version was refused.
            TransientError: a dependency failed (retried; this settles again next time).
        """
        found = self._earlier_import()
        if found is not None:
            self.doc.imported_kid = found.kid
            self._verify(found)
            return
        self.finish(
            "failed",
            reason="attempts_exhausted",
            message=f"gave up after {self.doc.attempts} attempts: {self.doc.last_error}; "
            "the last import request did not create a version",
        )

    def _before_put(self) -> None:
        """Right before each import PUT: the attempt is noted and the lease renewed, so the lease
        outlives the PUT (whose timeouts are bounded by it, see HsmAdapter.import_once). The
        write that recorded ``importing`` did both (renewing when less than the PUT's timeouts
        was left); it is repeated when more than a second has passed since (a slow look for the
        tagged version, a retry, a wait for the pace), else the lease is renewed if due."""
        if time.monotonic() - self._attempt_noted > 1.0:
            self.doc.import_attempt_at = utc(self.deps.clock())
            self.save(renew=True)
            self._attempt_noted = time.monotonic()
        else:  # the `importing` write just now: renew only if the PUT could outlive the lease
            self.deps.store.renew_if_due(self.lease, keep_for=self.deps.hsm.put_timeout_seconds())
        self.deps.fault("before_put")

    def import_in_flight(self) -> bool:
        """An import PUT of an earlier delivery may still land: too recent to import again."""
        return _import_may_land(self.doc, self.deps)

    def disable_after_import(self) -> str:
        """Best effort: disable a version that was imported but will not end ``imported``."""
        doc, hsm = self.doc, self.deps.hsm
        if (
            doc.imported_kid is None
            and doc.key_name
            and doc.package_sha256
            and doc.reached("importing")
        ):
            try:
                found = hsm.find_imported(
                    doc.key_name, doc.package_sha256, request_id=doc.correlation_id
                )
            except (Rejected, TransientError):
                return "; whether the import happened is unknown: look for versions tagged byok-package-sha256"
            doc.imported_kid = found.kid if found else None
        if doc.imported_kid is None:
            return ""
        name, version = doc.imported_kid.rstrip("/").split("/")[-2:]
        try:
            hsm.disable_version(name, version, request_id=doc.correlation_id)
        except (Rejected, TransientError):
            return f"; the imported version {doc.imported_kid} could NOT be disabled: disable it by hand"
        return f"; the imported version {doc.imported_kid} was disabled"


def _import_may_land(doc: StatusDoc, deps: Deps) -> bool:
    """An import PUT of ``doc``'s record may still land: sent less than the lease plus the
    PUT's timeouts ago."""
    if not doc.import_attempt_at:  # set from `importing` on (or by a retired record)
        return False
    grace = deps.settings.lease_seconds + deps.hsm.put_timeout_seconds() + 5
    age = (deps.clock() - parse_utc(doc.import_attempt_at)).total_seconds()
    return age < grace


# A record in one of these states gives up its identity to a new drop of the same package (as a
# re-drop of the same bytes retires it and starts over).
_RETRYABLE_REFUSALS = frozenset({"rejected", "failed", "verification_failed"})


def _same_package_message(first: StatusDoc) -> str:
    return f"same package as {first.blob_name[:200]!r} ({first.state}" + (
        f", imported as {first.imported_kid})" if first.imported_kid else ")"
    )


def emit_or_retry(audit: AuditSink, *events: dict[str, object]) -> None:
    """Emit audit events as one batch; any sink failure becomes a TransientError (never
    skipped).

    Raises:
        TransientError: the sink did not accept the events; processing must not complete.
    """
    if not events:
        return
    try:
        audit.emit_many(events)
    except TransientError as exc:  # keep the trail's own reason (e.g. audit_trail_broken)
        keep = exc.reason.startswith("audit") or exc.reason in PERSON_FIXES
        raise TransientError(
            f"audit append failed: {exc.message}",
            retry_after=exc.retry_after,
            reason=exc.reason if keep or exc.throttled else "audit_failed",
            throttled=exc.throttled,
        ) from None
    except Exception as exc:  # noqa: BLE001  # any sink failure means the record is not durable
        raise TransientError(
            f"audit append failed: {type(exc).__name__}: {exc}", reason="audit_failed"
        ) from None


def process_blob(name: str, deps: Deps) -> Outcome:
    """Process one delivery of ``incoming/name``. Safe to call any number of times, concurrently.

    Returns the outcome for handled cases (terminal states, or "gone").

    Raises:
        InProgress: another worker holds the package; redeliver later.
        TransientError: a dependency failed and attempts remain; redeliver later.
    """
    with package_span(None, name) as span:
        outcome = _process_blob(name, deps, span)
        span.set_outcome(outcome.state, outcome.reason_code)
        return outcome


def _process_blob(name: str, deps: Deps, span: PackageSpan) -> Outcome:
    store = deps.store
    try:
        blob = store.read_incoming(name)
    except BlobGone:
        return Outcome("gone")
    if blob.data is None:
        sha = None
        path = f"packages/oversize-{_drop_hash(blob)}.json"
    else:
        sha = hashlib.sha256(blob.data).hexdigest()
        path = f"packages/{sha}.json"

    fresh = _fresh_doc(blob, sha, deps)
    fresh.attempts = 1  # the claim is this delivery's first attempt: no write to count it
    created = store.create_status(path, fresh)
    if created is not None:  # ours: lease it as written, no need to read it back
        lease = store.lease(path, etag=created)
        doc: StatusDoc | None = fresh
    else:
        try:
            lease = store.lease(path)
        except InProgress:
            finished = _finished_elsewhere(blob, path, sha, deps)
            if finished is None:
                raise
            return finished
    settled = False
    try:
        if created is None:
            doc = store.load_status(path)
        assert doc is not None  # noqa: S101  # created above or before, never deleted
        span.set_correlation_id(doc.correlation_id)
        if doc.etag != blob.etag:
            redropped = _redrop(_Run(deps, blob, path, doc, lease), sha)
            if isinstance(redropped, Outcome):
                return redropped
            doc = redropped
        outcome = _run_leased(_Run(deps, blob, path, doc, lease), counted=created is not None)
        settled = outcome.status_path == path and _settled(outcome.doc)
        return outcome
    finally:
        # a settled record keeps its lease until it runs out (one request less): nobody writes
        # it again, and another drop of its bytes is recorded without it (_finished_elsewhere)
        store.release(lease, keep=settled)


def _settled(doc: StatusDoc | None) -> bool:
    """The record is done for good: imported or a duplicate, fully audited, moved."""
    return (
        doc is not None
        and doc.state in ARCHIVED
        and not doc.unaudited()
        and doc.disposition is not None
        and not doc.disposition.startswith("left in incoming")
    )


def _finished_elsewhere(
    blob: IncomingBlob, path: str, sha: str | None, deps: Deps
) -> Outcome | None:
    """Another drop of bytes whose record is leased: when that record is settled (see
    :func:`_settled`; it may keep its lease a while after its outcome) this drop is recorded
    as its duplicate without the lease, which the duplicate's record does not need. None when
    the record is not settled: the caller waits for the lease.

    Raises:
        TransientError: storage or the audit sink failed.
    """
    first = deps.store.load_status(path)
    if first is None or first.etag == blob.etag:
        return None
    if not _settled(first):
        return None
    return _duplicate_of_finished(blob, path, first, sha, deps)


def _duplicate_of_finished(
    blob: IncomingBlob, path: str, first: StatusDoc, sha: str | None, deps: Deps
) -> Outcome:
    """A new drop of a finished record's bytes: its own checks first (README: check order),
    then ``duplicate`` of that record, or ``rejected`` with the drop's own refusal."""
    try:
        check_drop(blob, sha, deps.settings)
    except Rejected as refused:
        return _duplicate(blob, path, first, deps, refused=refused)
    return _duplicate(blob, path, first, deps)


def _redrop(first: _Run, sha: str | None) -> StatusDoc | Outcome:
    """This drop is not the one the record was made for (same bytes, dropped again): the first
    record's audit is completed, then a refused record is retired and started over, an
    unfinished one is taken over by this drop, and a finished one makes this drop a duplicate.
    Returns the record to process, or the duplicate's outcome."""
    blob, deps, doc, path, store = first.blob, first.deps, first.doc, first.path, first.deps.store
    if doc.unaudited():
        first.flush_audit()
        first.save()
    if doc.state in _RETRYABLE_REFUSALS:
        retired = f"history/{sha}/{_drop_hash(blob)}-{doc.etag.strip(chr(34))}.json"
        store.put_status(retired, doc, index=False)
        _keep_name_on(retired, doc, path, store)
        doc = _retire_into_fresh(doc, blob, sha, deps)
    elif not doc.terminal:
        # e.g. its worker died and the custodian re-uploaded: this drop finishes the record
        doc.etag, doc.blob_name = blob.etag, blob.name
    else:
        return _duplicate_of_finished(blob, path, doc, sha, deps)
    store.index_name(doc, path)  # first: a crash between the two writes leaves it findable
    store.save_status(path, doc, first.lease)
    return doc


def _keep_name_on(retired: str, doc: StatusDoc, path: str, store: BlobStore) -> None:
    """A retired record keeps its name: ``byok status`` of the name it was refused under shows
    that refusal, not the record of a later drop of the same bytes under another name.

    Raises:
        TransientError: storage failed.
    """
    if store.indexed_path(doc.blob_name) == path:
        store.index_name(doc, retired)


def _retire_into_fresh(
    old: StatusDoc, blob: IncomingBlob, sha: str | None, deps: Deps
) -> StatusDoc:
    """The record a new drop of a refused record's bytes starts over with. When the refused
    record got as far as an import PUT, the new one inherits when that PUT was sent and must
    look for its version before importing: a refusal after a PUT (a verification refused, a
    failure whose import is unknown) may have left that version in the HSM."""
    doc = _fresh_doc(blob, sha, deps)
    if old.reached("importing"):
        doc.import_attempt_at = old.import_attempt_at
        doc.import_may_exist = True
    return doc


def complete_audit(path: str, deps: Deps) -> bool:
    """Emit a status document's missing audit events (reconciler). True if any were missing.

    Raises:
        InProgress: another worker holds the document.
        TransientError: the audit sink or storage failed.
    """
    store = deps.store
    lease = store.lease(path)
    try:
        doc = store.load_status(path)
        if doc is None or not doc.unaudited():
            return False
        blob = IncomingBlob(doc.blob_name, doc.etag, 0, None)
        run = _Run(deps, blob, path, doc, lease)
        run.flush_audit()
        run.save()
        return True
    finally:
        store.release(lease)


def _run_leased(run: _Run, *, counted: bool = False) -> Outcome:
    """The leased part of a delivery: finish a terminal record, or process one more attempt
    (``counted``: the claim that created the record counted it already)."""
    doc = run.doc
    if doc.terminal:
        try:
            run.flush_audit()
            run.save()
            run.dispose()
        except TransientError as exc:
            doc.last_error = exc.message
            run.save()
            raise
        return Outcome(doc.state or "", run.path, doc)
    if run.import_in_flight():
        raise InProgress("an earlier import attempt may still be in flight; retry after it settles")
    # the last attempt's PUT had an unknown outcome: now that it can no longer land, settle it
    settle = doc.attempts >= run.deps.settings.max_attempts and doc.reached("importing")
    if not counted and not settle:
        doc.attempts += 1
        run.save()
    try:
        run.load_policy()
        if any(entry.state != "received" for entry in doc.unaudited()):
            run.flush_audit()  # an earlier attempt's records first: nothing goes on unaudited
        if settle:
            run.settle_exhausted()
        else:
            run.run()  # a fresh `received` goes with this attempt's first batch
    except AwaitingApproval:
        doc.attempts -= 1  # waiting for people is not an attempt
        doc.last_error = None
        doc.throttled_until = None
        if doc.state != "awaiting_approval":
            run.record("awaiting_approval")  # written, then audited once
        run.save()  # the tally (and the audited mark) persist; the package stays in incoming
    except Rejected as exc:
        if doc.imported_kid is not None:  # imported, but verifying it was refused
            doc.fingerprint_result = doc.fingerprint_result or "unverified"
            note = run.disable_after_import()
            run.finish(
                "verification_failed",
                reason="verification_error",
                message=f"the key was imported but could not be verified: {exc.message}{note}",
            )
        else:
            doc.service_code = exc.service_code
            run.finish("rejected", reason=exc.reason, message=exc.message)
    except InProgress:
        raise
    except Exception as exc:  # noqa: BLE001  # anything else is retried, counted, never lost
        _failed_try(run, exc if isinstance(exc, TransientError) else _internal(exc))
    return Outcome(doc.state or "", run.path, doc)


def _failed_try(run: _Run, err: TransientError) -> None:
    """A try that failed transiently: record it and raise ``err`` for redelivery, or, once
    BYOK_MAX_ATTEMPTS tries failed, end the package ``failed``. Throttling is not a try.

    Raises:
        TransientError: ``err``, when the package is to be delivered again.
    """
    doc, deps = run.doc, run.deps
    doc.last_error = err.message
    if not err.outcome_unknown:
        doc.import_attempt_at = None  # the HSM answered: no import PUT is left in flight
    if doc.state in TERMINAL:  # only its audit record is missing: redelivery emits it
        run.save()
        raise err from None
    if err.throttled:  # waiting for the HSM's pace is not an attempt, and never fails
        doc.attempts -= 1
        wait = err.retry_after if err.retry_after is not None else 1.0
        doc.throttled_until = utc(deps.clock() + timedelta(seconds=wait))
        run.save()
        raise err from None
    doc.throttled_until = None
    if doc.attempts < deps.settings.max_attempts or err.outcome_unknown:
        # an unknown outcome is never the end: the next delivery, once that PUT can no longer
        # land, settles it (``_Run.settle_exhausted``) before anything ends `failed`
        run.save()
        raise err from None
    note = run.disable_after_import()
    run.finish(
        "failed",
        reason="attempts_exhausted",
        message=f"gave up after {doc.attempts} attempts: {err.message}{note}",
    )


def _internal(exc: Exception) -> TransientError:
    log.error("byok: unexpected error while processing a package", exc_info=exc)
    return TransientError(f"internal error: {type(exc).__name__}", reason="internal_error")


def _duplicate(
    blob: IncomingBlob,
    first_path: str,
    first: StatusDoc,
    deps: Deps,
    *,
    refused: Rejected | None = None,
) -> Outcome:
    """A new drop of bytes already claimed: record ``duplicate`` pointing at the first result,
    or, when the drop fails its own checks (``refused``), ``rejected`` with that reason."""
    path = f"duplicates/{first.package_sha256}/{_drop_hash(blob)}.json"
    doc = deps.store.load_status(path)
    if doc is None:
        doc = _fresh_doc(blob, first.package_sha256, deps)
        doc.target_type = first.target_type
        doc.kek_kid = first.kek_kid
        doc.package_id = first.package_id
        doc.attempts = 1
        if refused is None:
            doc.key_name = first.key_name
            doc.imported_kid = first.imported_kid
            doc.duplicate_of = first_path
            doc.message = f"same bytes as {first.blob_name[:200]!r} ({first.state}" + (
                f", imported as {first.imported_kid})" if first.imported_kid else ")"
            )
            doc.advance("duplicate", deps.clock())
        else:
            doc.reason_code, doc.message = refused.reason, refused.message
            doc.advance("rejected", deps.clock())
        if deps.store.create_status(path, doc) is None:  # a concurrent delivery made it first
            made = deps.store.load_status(path)
            if made is None:
                raise TransientError(
                    "the duplicate's record vanished; retry", reason="storage_error"
                )
            doc = made
    entries = doc.unaudited()
    emit_or_retry(  # one batch: one signed append
        deps.audit, *(event_for_state(doc, e.state, e.attempt, e.time) for e in entries)
    )
    for entry in entries:
        entry.audited = True
    deps.store.put_status(path, doc)
    s = deps.settings
    container = s.archive_container if doc.state == "duplicate" else s.quarantine_container
    dest = f"{doc.key_name or '_invalid-name'}/{doc.package_sha256}.{doc.state}-{_drop_hash(blob)}.byok"
    doc.disposition = deps.store.dispose(
        blob,
        container,
        dest,
        {
            "original_name": _ascii(blob.name),
            "state": doc.state or "",
            "correlation_id": doc.correlation_id,
        },
    )
    deps.store.put_status(path, doc)
    return Outcome(doc.state or "", path, doc)
