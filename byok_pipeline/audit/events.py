"""One audit interface for every state change. Sinks: local JSON lines, memory (tests).

Events follow ``byok_pipeline/schemas/audit-event.schema.json`` and never carry key material
or ciphertext. The tamper-evident trail (:mod:`byok_pipeline.audit.trail`) and OpenTelemetry
(:mod:`byok_pipeline.adapters.telemetry`) plug in through :class:`AuditSink`; ``wiring.audit_sink``
composes them. See ``docs/audit.md``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from byok_pipeline import __version__
from byok_pipeline.core.status import HistoryEntry, StatusDoc, utc

STATE_EVENTS = {
    "received": "byok.received",
    "validated": "byok.validated",
    "importing": "byok.importing",
    "imported": "byok.imported",
    "rejected": "byok.rejected",
    "failed": "byok.failed",
    "verification_failed": "byok.verification_failed",
    "duplicate": "byok.duplicate",
    "awaiting_approval": "byok.awaiting_approval",
}
_FROM_STATUS = (
    "blob_name",
    "package_sha256",
    "etag",
    "key_name",
    "target_type",
    "kek_kid",
    "imported_kid",
    "correlation_id",
    "uploader",
    "duplicate_of",
    "drop_time",
)
_TERMINAL_FIELDS = ("reason_code", "message", "fingerprint_result")
#: The audit schema's bound on ``message`` (messages may quote uploader-chosen text).
MAX_MESSAGE = 2000


class AuditSink(Protocol):
    """Receives audit events. Must raise if they were not durably accepted. ``emit_many``
    records several at once (the trail: one signed append), in order."""

    def emit(self, event: Mapping[str, Any]) -> None: ...

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None: ...


class _OneByOne:
    """``emit_many`` as ``emit`` of each event, for sinks without batches."""

    def emit(self, event: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        for event in events:
            self.emit(event)


class MemoryAuditSink(_OneByOne):
    """Keeps events in a list (tests)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def emit(self, event: Mapping[str, Any]) -> None:
        with self._lock:
            self.events.append(dict(event))


class JsonLinesAuditSink(_OneByOne):
    """Appends one JSON object per line to a local file, fsynced (local runs)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def emit(self, event: Mapping[str, Any]) -> None:
        line = json.dumps(event, sort_keys=True, separators=(",", ":")) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


class FanoutAuditSink:
    """Sends events to every sink; any failure propagates (the event is not lost silently)."""

    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = sinks

    def emit(self, event: Mapping[str, Any]) -> None:
        self.emit_many([event])

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        for sink in self.sinks:
            sink.emit_many(events)


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def event_for_state(doc: StatusDoc, state: str, attempt: int, at: str) -> dict[str, Any]:
    """The audit event recording that ``doc`` reached ``state``."""
    event: dict[str, Any] = {
        "event": STATE_EVENTS[state],
        "time": at,
        "pipeline_version": __version__,
        "state": state,
        "attempt": attempt,
    }
    for name in _FROM_STATUS:
        value = getattr(doc, name)
        if value is not None:
            event[name] = value
    event["policy_sha256"] = doc.policy_sha256  # null: no policy, the safe defaults applied
    if doc.approvals is not None:
        if state == "awaiting_approval":
            event["approvals_missing"] = int(doc.approvals.get("missing", 0))
        given = doc.approvals.get("given") or []
        if given and state in ("validated", "importing", "imported"):
            event["approvers"] = [
                {"id": g["approver_id"], "spki_sha256": g["spki_sha256"]} for g in given
            ]
    if state in ("rejected", "failed", "verification_failed", "imported", "duplicate"):
        for name in _TERMINAL_FIELDS:
            value = getattr(doc, name)
            if value is not None:
                event[name] = value[:MAX_MESSAGE] if name == "message" else value
    return event


def verified_event(doc: StatusDoc, imported: HistoryEntry) -> dict[str, Any]:
    """``byok.verified``: the imported key matched the manifest fingerprint. Attempt and time
    are those of the ``imported`` history entry, so an event emitted again (after a crash
    between its append and its audited mark) is an identical copy, which export skips."""
    event = event_for_state(doc, "imported", imported.attempt, imported.time)
    event["event"] = "byok.verified"
    event["fingerprint_result"] = "match"
    return event


def cli_event(
    name: str, *, correlation_id: str, clock: Clock = utc_now, **fields: Any
) -> dict[str, Any]:
    """A KEK event from the CLI (``byok.kek.created``, ``byok.kek.downloaded``)."""
    event: dict[str, Any] = {
        "event": name,
        "time": utc(clock()),
        "pipeline_version": __version__,
        "correlation_id": correlation_id,
    }
    event.update({k: v for k, v in fields.items() if v is not None})
    return event
