"""The pipeline's OpenTelemetry metrics: their stable names, units and attributes, and the pure
computations behind them. Recording them is the telemetry adapter's job
(:mod:`byok_pipeline.adapters.telemetry`); nothing here imports OpenTelemetry.

==========================  ===============  =======  ======================================
name                        instrument       unit     attributes
==========================  ===============  =======  ======================================
``byok.packages``           counter          package  ``state``, ``reason_code`` (refusals)
``byok.drop_to_import``     histogram        s        none
``byok.waiting``            observable gauge package  none
``byok.throttled``          observable gauge package  none
==========================  ===============  =======  ======================================

- ``byok.packages`` counts packages reaching a state, recorded beside each state's audit event
  (``byok.<state>``, after the signed trail took it): one per package and state, at least once
  like the events (a worker that dies between the trail append and its mark appends again).
  ``reason_code`` is set for ``rejected``, ``failed`` and ``verification_failed`` only, and is a
  documented reason code (anything else is counted as ``other``).
- ``byok.drop_to_import`` is recorded with ``byok.imported``: seconds from the status
  document's ``drop_time`` (the blob's creation) to the ``imported`` history entry, the same
  figure the dashboard's p50/p95 are computed from (:func:`drop_to_import_seconds`).
- ``byok.waiting`` (blobs in the incoming container) and ``byok.throttled`` (unfinished
  packages whose ``throttled_until`` is ahead) are observed from :func:`backlog` over what the
  reconciler pass and the dashboard already read (every status document, the incoming
  listing): no storage request of their own. Each computation is observed once, at the next
  collection; between computations the gauges report nothing, so no instance repeats a stale
  figure another instance has since replaced.

Attribute values come from closed sets (states and reason codes): no key material, name, kid
or digest ever becomes a metric attribute.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.status import STATES, TERMINAL, StatusDoc, parse_time

#: Meter (instrumentation scope) name, as for the spans and log records.
METER = "byok_pipeline"
PACKAGES = "byok.packages"
DROP_TO_IMPORT = "byok.drop_to_import"
WAITING = "byok.waiting"
THROTTLED = "byok.throttled"
#: Attribute keys of ``byok.packages``: the only attributes any metric carries.
STATE = "state"
REASON_CODE = "reason_code"
METRIC_ATTRIBUTES = frozenset({STATE, REASON_CODE})
#: States whose packages carry a reason code in the counter.
REFUSED_STATES = frozenset({"rejected", "failed", "verification_failed"})
#: A reason code that is not a documented one (never a free-form string as an attribute).
OTHER_REASON = "other"
#: Explicit bucket boundaries of the drop-to-import histogram in seconds (local exporters and
#: tests; Application Insights keeps only sum, count, min and max of a histogram).
DROP_TO_IMPORT_BUCKETS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400,
)  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    """One metric as it is exported: name, OpenTelemetry instrument, unit, description and the
    attribute keys it may carry."""

    name: str
    instrument: str  # "counter", "histogram", "observable_gauge"
    unit: str
    description: str
    attributes: frozenset[str] = frozenset()


#: Every metric the pipeline exports, by name: stable (dashboards and alerts match on them).
METRICS: Mapping[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            PACKAGES,
            "counter",
            "{package}",
            "Packages that reached a state (state; reason_code for refusals)",
            METRIC_ATTRIBUTES,
        ),
        MetricSpec(
            DROP_TO_IMPORT,
            "histogram",
            "s",
            "Seconds from a package's drop (blob created) to its import",
        ),
        MetricSpec(
            WAITING,
            "observable_gauge",
            "{package}",
            "Blobs waiting in the incoming container (at the last reconciler pass or dashboard view)",
        ),
        MetricSpec(
            THROTTLED,
            "observable_gauge",
            "{package}",
            "Unfinished packages paced by the HSM: throttled_until ahead (at the last reconciler "
            "pass or dashboard view)",
        ),
    )
}


def package_attributes(state: str, reason_code: str | None = None) -> dict[str, str]:
    """The attributes of one ``byok.packages`` count: the state, and for a refusal its reason
    code (a documented one, else :data:`OTHER_REASON`).

    Raises:
        ValueError: ``state`` is not a status state.
    """
    if state not in STATES:
        raise ValueError(f"not a package state: {state!r}")
    attributes = {STATE: state}
    if state in REFUSED_STATES:
        attributes[REASON_CODE] = reason_code if reason_code in REASONS else OTHER_REASON
    return attributes


def state_of_event(event: Mapping[str, object]) -> str | None:
    """The state an audit event records (``byok.<state>`` with that ``state``), None for any
    other event (``byok.verified``, KEK and policy events)."""
    state = event.get("state")
    if isinstance(state, str) and state in STATES and event.get("event") == f"byok.{state}":
        return state
    return None


def drop_to_import_seconds(dropped: str | None, imported: str | None) -> float | None:
    """Seconds from ``dropped`` to ``imported`` (status times); None when either is missing or
    unreadable, or the import would come before the drop (clocks of two machines)."""
    start, end = parse_time(dropped), parse_time(imported)
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


def throttled_ahead(state: str | None, throttled_until: str | None, now: datetime) -> bool:
    """An unfinished package the HSM paced, whose next try is after ``now``."""
    if state in TERMINAL:
        return False
    until = parse_time(throttled_until)
    return until is not None and until > now


@dataclass(frozen=True)
class Backlog:
    """What the gauges report: blobs waiting in incoming, and packages throttled right now."""

    waiting: int
    throttled: int


def backlog(
    docs: Iterable[StatusDoc], incoming: Iterable[tuple[str, datetime | None]], now: datetime
) -> Backlog:
    """The gauges' figures from the status documents and the incoming container's listing."""
    return Backlog(
        waiting=sum(1 for _ in incoming),
        throttled=sum(throttled_ahead(d.state, d.throttled_until, now) for d in docs),
    )
