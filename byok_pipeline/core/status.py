"""The status document of one package, and its state machine.

    received → [awaiting_approval →] validated → importing → imported | rejected | failed
                                                          | verification_failed
    received → duplicate

``awaiting_approval``: the import policy requires approvals that are not all there yet; the
package waits in the incoming container (an approval upload, or the reconciler, delivers it
again) until they are, or until its approval deadline (then ``rejected``/``approval_expired``).
Schema: ``byok_pipeline/schemas/status.schema.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from byok_pipeline import __version__

STATUS_SCHEMA_VERSION = "1.0"
TERMINAL = frozenset({"imported", "rejected", "failed", "verification_failed", "duplicate"})
STATES = ("received", "awaiting_approval", "validated", "importing", *sorted(TERMINAL))
_NEXT: dict[str | None, frozenset[str]] = {
    None: frozenset({"received"}),
    "received": frozenset({"awaiting_approval", "validated", "rejected", "failed", "duplicate"}),
    "awaiting_approval": frozenset({"validated", "rejected", "failed"}),
    "validated": frozenset({"importing", "rejected", "failed"}),
    "importing": frozenset({"imported", "rejected", "failed", "verification_failed"}),
}
#: States that move the package to the archive container; the rest go to quarantine.
ARCHIVED = frozenset({"imported", "duplicate"})


class IllegalTransition(RuntimeError):
    """A programming error: the processor asked for a transition the machine forbids."""


_UTC_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utc(ts: datetime) -> str:
    return ts.strftime(_UTC_FORMAT)


def parse_utc(text: str) -> datetime:
    """A time written by :func:`utc`, back as an aware UTC datetime.

    Raises:
        ValueError: not in that form.
    """
    return datetime.strptime(text, _UTC_FORMAT).replace(tzinfo=UTC)


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time as the pipeline writes it (``...Z``, :func:`utc`); None for None or
    anything else."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass
class HistoryEntry:
    state: str
    time: str
    attempt: int
    audited: bool = False


@dataclass
class StatusDoc:
    """One package's record. Never holds key material or ciphertext."""

    blob_name: str
    package_sha256: str | None
    etag: str
    correlation_id: str
    drop_time: str | None = None
    key_name: str | None = None
    target_type: str | None = None
    target_type_source: str | None = None  # "stated" or "inferred"
    kek_kid: str | None = None
    imported_kid: str | None = None
    key_ops: list[str] | None = None
    fingerprint_expected: str | None = None
    fingerprint_result: str | None = None  # match | mismatch | unverified
    reason_code: str | None = None
    message: str | None = None
    service_code: str | None = None
    duplicate_of: str | None = None
    package_id: str | None = None  # canonical identity (core.identity): exactly-once is by it
    uploader: str | None = None
    manifest_sha256: str | None = None
    policy_sha256: str | None = None  # the import policy the package was checked against
    approvals: dict[str, Any] | None = None  # given, refused, missing (see core.approvals)
    approval_deadline: str | None = None
    attempts: int = 0
    import_attempt_at: str | None = None  # when the last import PUT was about to be sent
    last_error: str | None = None
    throttled_until: str | None = None  # paced by the HSM: not redelivered for work before this
    import_may_exist: bool = False  # an earlier record of these bytes sent an import PUT
    disposition: str | None = None  # container/blob the package was moved to
    state: str | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    schema_version: str = STATUS_SCHEMA_VERSION
    pipeline_version: str = __version__
    updated: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def reached(self, state: str) -> bool:
        return any(h.state == state for h in self.history)

    def advance(self, state: str, now: datetime) -> bool:
        """Record ``state``; False (no change) if it was already reached (a resumed delivery).

        Raises:
            IllegalTransition: the state machine forbids it.
        """
        if self.reached(state):
            return False
        if state not in _NEXT.get(self.state, frozenset()):
            raise IllegalTransition(f"{self.state} -> {state}")
        self.state = state
        self.history.append(HistoryEntry(state, utc(now), self.attempts))
        self.updated = utc(now)
        return True

    def unaudited(self) -> list[HistoryEntry]:
        return [h for h in self.history if not h.audited]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StatusDoc:
        raw: dict[str, Any] = json.loads(data)
        raw["history"] = [HistoryEntry(**h) for h in raw.get("history", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def summary(self) -> dict[str, Any]:
        """The public view (HTTP API, ``byok status``)."""
        doc = asdict(self)
        for h in doc["history"]:
            h.pop("audited", None)
        doc["audit_pending"] = bool(self.unaudited())
        return doc
