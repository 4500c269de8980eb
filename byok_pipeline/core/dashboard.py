"""What the dashboard shows, computed from status documents and the incoming container's listing.

Pure: :func:`compute` takes the documents, the waiting blobs and the time, and returns a
:class:`Dashboard`; nothing here reads storage (``processing.dashboard`` does) or renders HTML
(``core.dashboard_page`` does). The same figures serve ``byok serve`` and the Function's
``dashboard`` route.

- **Counts per state**: every status document by its current state, plus ``waiting`` (blobs
  still in the incoming container) and ``throttled`` (unfinished packages the HSM paced, whose
  ``throttled_until`` is ahead): the figures of the ``byok.waiting`` and ``byok.throttled``
  gauges, from the same :func:`~byok_pipeline.core.metrics.backlog` (``Dashboard.backlog``).
- **Imports per day**: ``imported`` history entries per UTC day, the last :data:`DAYS` days.
- **Refusals by reason**: ``rejected`` documents per reason code.
- **Failures**: ``failed`` and ``verification_failed`` documents.
- **Drop to import**: p50 and p95 (nearest rank) of the time from ``drop_time`` (else the
  ``received`` entry) to the ``imported`` entry.
- **Waiting**: each blob in the incoming container with its age; one older than ``lost_after``
  whose record (if any) did not change for as long is *lost*: its event was probably lost, and the
  reconciler (``byok reconcile``, the timer) redelivers it.
- **Audit**: documents with state changes not yet in the audit trail (``audit_pending``), and,
  when the caller ran it, the trail verifier's result.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from byok_pipeline.core.metrics import Backlog, backlog, drop_to_import_seconds, throttled_ahead
from byok_pipeline.core.status import STATES, TERMINAL, StatusDoc, parse_time, utc

#: Days of the imports-per-day chart (today included).
DAYS = 14
#: A blob waiting longer than this with no progress is shown as lost (its event went missing).
LOST_AFTER = timedelta(minutes=10)
#: States a package is still moving through (not terminal).
IN_PROGRESS = tuple(s for s in STATES if s not in TERMINAL)
#: States that mean something went wrong after validation.
FAILURE_STATES = ("failed", "verification_failed")


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least ``pct`` % of the values at
    or below it); None for no values.

    Raises:
        ValueError: ``pct`` is not in (0, 100].
    """
    if not 0 < pct <= 100:
        raise ValueError("a percentile is in (0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


@dataclass(frozen=True)
class Step:
    """One history entry of a package."""

    state: str
    time: str
    attempt: int


@dataclass(frozen=True)
class PackageRow:
    """One package's current state (a status document, without what the page does not show)."""

    blob_name: str
    state: str
    key_name: str | None
    package_sha256: str | None
    reason_code: str | None
    message: str | None
    attempts: int
    updated: str | None
    drop_time: str | None
    throttled_until: str | None
    audit_pending: bool
    imported_kid: str | None
    fingerprint_result: str | None
    last_error: str | None
    history: tuple[Step, ...]

    @classmethod
    def of(cls, doc: StatusDoc) -> PackageRow:
        return cls(
            blob_name=doc.blob_name,
            state=doc.state or "none",
            key_name=doc.key_name,
            package_sha256=doc.package_sha256,
            reason_code=doc.reason_code,
            message=doc.message,
            attempts=doc.attempts,
            updated=doc.updated,
            drop_time=doc.drop_time,
            throttled_until=doc.throttled_until if doc.state not in TERMINAL else None,
            audit_pending=bool(doc.unaudited()),
            imported_kid=doc.imported_kid,
            fingerprint_result=doc.fingerprint_result,
            last_error=doc.last_error,
            history=tuple(Step(h.state, h.time, h.attempt) for h in doc.history),
        )


@dataclass(frozen=True)
class Waiting:
    """A blob in the incoming container: not delivered yet, waiting for a retry, throttled or
    awaiting approvals (``state``: its record's state; None when it has none yet)."""

    blob_name: str
    since: str | None
    age_seconds: float | None
    state: str | None
    lost: bool


@dataclass(frozen=True)
class TrailStatus:
    """The audit trail verifier's result (``byok audit verify``): ``error`` when it could not
    run (storage, the HSM key), else ``ok`` with the counts."""

    ok: bool
    chains: int = 0
    records: int = 0
    breaks: int = 0
    pinned: bool = False
    error: str | None = None


@dataclass(frozen=True)
class DropToImport:
    """Seconds from drop to import over ``count`` imported packages (None when there are none)."""

    count: int
    p50_seconds: float | None
    p95_seconds: float | None


@dataclass(frozen=True)
class Dashboard:
    generated: str
    counts: dict[str, int]
    imports_per_day: list[tuple[str, int]]
    refusals_by_reason: list[tuple[str, int]]
    failures: list[PackageRow]
    throttled: list[PackageRow]
    waiting: list[Waiting]
    drop_to_import: DropToImport
    audit_pending: int
    packages: list[PackageRow]
    #: the ``byok.waiting`` and ``byok.throttled`` gauges' figures (``counts`` shows them too)
    backlog: Backlog = field(default_factory=lambda: Backlog(0, 0))
    trail: TrailStatus | None = None
    lost_after_seconds: float = field(default=LOST_AFTER.total_seconds())


def _imported_time(doc: StatusDoc) -> str | None:
    return next((h.time for h in doc.history if h.state == "imported"), None)


def _imported_at(doc: StatusDoc) -> datetime | None:
    return parse_time(_imported_time(doc))


def _dropped_time(doc: StatusDoc) -> str | None:
    return doc.drop_time or (doc.history[0].time if doc.history else None)


def drop_to_import(docs: Iterable[StatusDoc]) -> DropToImport:
    """p50/p95 seconds from drop to import of the imported documents among ``docs``: each the
    figure the ``byok.drop_to_import`` histogram recorded for it
    (:func:`~byok_pipeline.core.metrics.drop_to_import_seconds`)."""
    seconds: list[float] = []
    for doc in docs:
        if doc.state != "imported":
            continue
        took = drop_to_import_seconds(_dropped_time(doc), _imported_time(doc))
        if took is not None:
            seconds.append(took)
    return DropToImport(len(seconds), percentile(seconds, 50), percentile(seconds, 95))


def imports_per_day(
    docs: Iterable[StatusDoc], now: datetime, days: int = DAYS
) -> list[tuple[str, int]]:
    """(YYYY-MM-DD, imports) for the ``days`` UTC days ending today, oldest first, zeros kept."""
    today = now.astimezone(UTC).date()
    window = [(today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]
    per_day: Counter[str] = Counter()
    for doc in docs:
        at = _imported_at(doc) if doc.state == "imported" else None
        if at is not None:
            per_day[at.date().isoformat()] += 1
    return [(day, per_day[day]) for day in window]


def _latest_by_name(docs: Iterable[StatusDoc]) -> dict[str, StatusDoc]:
    """The latest record of each blob name (a name dropped again has several)."""
    latest: dict[str, StatusDoc] = {}
    for doc in docs:
        seen = latest.get(doc.blob_name)
        if seen is None or (doc.updated or "") > (seen.updated or ""):
            latest[doc.blob_name] = doc
    return latest


def waiting(
    incoming: Iterable[tuple[str, datetime | None]],
    docs: Iterable[StatusDoc],
    now: datetime,
    lost_after: timedelta = LOST_AFTER,
) -> list[Waiting]:
    """The incoming container's blobs, oldest first, each with its record's state (a record that
    is already terminal belongs to an earlier drop of the name: this drop has none yet)."""
    latest = _latest_by_name(docs)
    rows: list[Waiting] = []
    for name, modified in incoming:
        doc = latest.get(name)
        state = doc.state if doc is not None and doc.state not in TERMINAL else None
        age = (now - modified).total_seconds() if modified is not None else None
        touched = parse_time(doc.updated) if doc is not None and state is not None else None
        quiet = touched is None or (now - touched) > lost_after
        lost = age is not None and age > lost_after.total_seconds() and quiet
        since = utc(modified.astimezone(UTC)) if modified is not None else None
        rows.append(Waiting(name, since, age, state, lost))
    return sorted(rows, key=lambda w: (w.since is None, w.since or "", w.blob_name))


def compute(
    docs: Iterable[StatusDoc],
    incoming: Iterable[tuple[str, datetime | None]],
    *,
    now: datetime,
    trail: TrailStatus | None = None,
    lost_after: timedelta = LOST_AFTER,
) -> Dashboard:
    """Every figure of the dashboard from the status documents (``packages/`` and
    ``duplicates/``), the incoming container's (name, last modified) and the time."""
    docs = list(docs)
    rows = sorted(
        (PackageRow.of(d) for d in docs),
        key=lambda r: (r.updated or "", r.blob_name),
        reverse=True,
    )
    incoming = list(incoming)
    waiting_rows = waiting(incoming, docs, now, lost_after)
    throttled = [r for r in rows if throttled_ahead(r.state, r.throttled_until, now)]
    gauges = backlog(docs, incoming, now)
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    counts["waiting"] = gauges.waiting
    counts["throttled"] = gauges.throttled
    refusals = Counter(r.reason_code or "unknown" for r in rows if r.state == "rejected")
    return Dashboard(
        generated=utc(now.astimezone(UTC)),
        counts=counts,
        imports_per_day=imports_per_day(docs, now),
        refusals_by_reason=sorted(refusals.items(), key=lambda kv: (-kv[1], kv[0])),
        failures=[r for r in rows if r.state in FAILURE_STATES],
        throttled=throttled,
        waiting=waiting_rows,
        drop_to_import=drop_to_import(docs),
        audit_pending=sum(r.audit_pending for r in rows),
        packages=rows,
        backlog=gauges,
        trail=trail,
        lost_after_seconds=lost_after.total_seconds(),
    )
