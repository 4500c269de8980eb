"""The reconciler: what at-least-once delivery can still leave undone, done on a timer.

Event Grid and the Functions host give up after their retry budgets (Event Grid dead-letters,
the host's poison threshold). The reconciler, run by a timer trigger and by ``byok reconcile``:

1. emits the missing audit events of status documents (an audit sink outage outlasting the
   retries), so no state change stays unrecorded;
2. redelivers packages still in the incoming container whose last delivery is older than the
   lease (their events were lost, dead-lettered, or gave up), through the same
   :func:`~byok_pipeline.processing.processor.process_blob` the trigger calls; a package paced
   by the HSM (``throttled_until`` ahead) waits for its time, and a throttled redelivery ends
   the pass (the HSM is at its pace); each pass takes the packages in another order;
3. reports the ``byok.waiting`` and ``byok.throttled`` gauges from what it has just read (every
   status document, the incoming listing: no request of its own), as the pass began: in Azure
   the gauges are as fresh as the last pass (``BYOK_RECONCILE_SCHEDULE``, every 10 minutes).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from byok_pipeline.adapters.telemetry import observe_backlog
from byok_pipeline.core.errors import InProgress, PipelineError, TransientError
from byok_pipeline.core.metrics import backlog
from byok_pipeline.core.status import StatusDoc, parse_utc
from byok_pipeline.processing.processor import Deps, complete_audit, process_blob

log = logging.getLogger("byok_pipeline")


@dataclass
class ReconcileReport:
    audits_completed: int = 0
    redelivered: dict[str, str] = field(default_factory=dict)  # blob name -> outcome or error
    errors: int = 0


def reconcile(deps: Deps, *, now: datetime | None = None) -> ReconcileReport:
    """One pass. Never raises for one bad package; counts it in ``errors``."""
    report = ReconcileReport()
    store = deps.store
    docs: list[StatusDoc] = []
    for path, doc in store.iter_status_items():
        docs.append(doc)
        if doc.unaudited():
            try:
                report.audits_completed += int(complete_audit(path, deps))
            except PipelineError as exc:
                report.errors += 1
                log.warning("byok reconcile: %s: %s", path, exc.reason)
    at = now or deps.clock()
    stale_before = at - timedelta(seconds=deps.settings.lease_seconds)
    incoming = store.list_incoming_items()
    observe_backlog(backlog(docs, incoming, at), deps.settings)
    # each pass in another order (by the pass's time), so a pass cut short by throttling does
    # not always leave the same packages for last
    items = sorted(
        incoming,
        key=lambda item: hashlib.sha256(f"{at.isoformat()}|{item[0]}".encode()).digest(),
    )
    for name, modified in items:
        if modified is not None and modified > stale_before:
            continue  # just dropped: its own event is on the way
        try:
            latest = store.status_by_name(name)
            if latest is not None and latest.updated and parse_utc(latest.updated) > stale_before:
                continue  # delivered recently: its own retries are still running
            paced_until = latest.throttled_until if latest is not None else None
            if paced_until and parse_utc(paced_until) > at:
                continue  # paced by the HSM: its next try is later
            report.redelivered[name] = process_blob(name, deps).state
        except InProgress:
            report.redelivered[name] = "in_progress"
        except TransientError as exc:
            report.errors += 1
            report.redelivered[name] = f"error: {exc.reason}"
            if exc.throttled:  # the HSM is at its pace: the next pass (in another order)
                break
        except Exception as exc:  # noqa: BLE001  # one failing package must not stop the pass
            report.errors += 1
            report.redelivered[name] = f"error: {getattr(exc, 'reason', type(exc).__name__)}"
    return report
