"""The dashboard's data, read from storage: every status document and the incoming container's
listing, handed to the pure :func:`byok_pipeline.core.dashboard.compute`.

Needs read access to the status and incoming containers (what ``GET /api/packages`` needs).
What the Function's ``dashboard`` route and ``byok serve`` both call. Each view also reports the
``byok.waiting`` and ``byok.throttled`` gauges from the figures it shows (one computation).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from byok_pipeline.adapters.telemetry import observe_backlog
from byok_pipeline.audit.verify import KeyFetcher, TrailReader, Trust
from byok_pipeline.core.dashboard import Dashboard, TrailStatus, compute
from byok_pipeline.core.dashboard_page import render
from byok_pipeline.core.errors import PipelineError
from byok_pipeline.processing.processor import Deps

#: Runs the audit trail verifier (``byok serve`` passes one; the Function does not: reading a
#: whole trail on each page view is not cheap there).
TrailCheck = Callable[[], TrailStatus]


def collect(
    deps: Deps, *, now: datetime | None = None, trail_check: TrailCheck | None = None
) -> Dashboard:
    """The dashboard's figures as of ``now`` (default: the deps' clock).

    Raises:
        TransientError: storage failed (listing or reading a document).
    """
    incoming = deps.store.list_incoming_items()
    docs = list(deps.store.iter_statuses())
    trail = trail_check() if trail_check is not None else None
    figures = compute(docs, incoming, now=now or deps.clock(), trail=trail)
    observe_backlog(figures.backlog, deps.settings)
    return figures


def page(deps: Deps, *, trail_check: TrailCheck | None = None) -> str:
    """The dashboard page (HTML), every stored value escaped.

    Raises:
        TransientError: storage failed.
    """
    return render(collect(deps, trail_check=trail_check))


def verify_trail(
    reader: TrailReader, *, trust: Trust | None, fetch_key: KeyFetcher | None
) -> TrailStatus:
    """Run the audit trail verifier (``byok audit verify``) over every chain; a failure to
    read the trail or a signer's key is reported in ``error``, never raised."""
    from azure.core.exceptions import AzureError

    try:
        report, _ = reader.verify(trust=trust, fetch_key=fetch_key)
    except AzureError as exc:
        return TrailStatus(ok=False, error=f"reading the trail: {type(exc).__name__}")
    except PipelineError as exc:
        return TrailStatus(ok=False, error=f"[{exc.reason}] {exc.message}")
    return TrailStatus(
        ok=report.ok,
        chains=len(report.chains),
        records=report.records,
        breaks=len(report.breaks),
        pinned=report.pinned,
    )
