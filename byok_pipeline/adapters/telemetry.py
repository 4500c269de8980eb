"""OpenTelemetry: one span per package, one log record per audit event, and the pipeline's
metrics (:mod:`byok_pipeline.core.metrics`: names, units, attributes). Set up lazily, once.

- With ``APPLICATIONINSIGHTS_CONNECTION_STRING`` set, ``azure-monitor-opentelemetry`` exports
  to Application Insights: audit events land in table ``AppTraces`` (``Message`` is the event
  name, the event's fields are in ``Properties``), spans in ``AppRequests``/``AppDependencies``,
  metrics in ``AppMetrics`` (``Name`` is the metric's name, its attributes in ``Properties``;
  a counter or histogram row holds the delta of one export interval, 60 s: ``Sum``,
  ``ItemCount``, ``Min``, ``Max``; a histogram's buckets are not sent, so percentiles come from
  the audit events; a gauge's value is in ``Sum``).
  Spans are sampled at 100 % (``sampling_ratio=1.0``) and log records are never dropped for
  belonging to an unsampled trace (``enable_trace_based_sampling_for_logs=False``). The
  distro lets ``OTEL_TRACES_SAMPLER`` (and ``OTEL_LOGS_EXPORTER=none``) in the environment
  override that: :func:`azure_monitor_options` warns when they are set. With
  ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` (``Authorization=AAD;ClientId=...``) the
  exporter authenticates with that managed identity (Entra ID).
- Otherwise, when ``BYOK_TELEMETRY_LOG`` is set (or ``BYOK_AUDIT_LOG``: ``telemetry.jsonl``
  beside it), spans and log records are written there as JSON lines, and the metrics as one
  JSON line per collection (every ``OTEL_METRIC_EXPORT_INTERVAL`` ms, default 60 s, and at
  exit); with neither, nothing is exported and spans and metrics cost nothing.

Metrics are recorded beside the events (:class:`TelemetryAuditSink`: ``byok.packages`` and
``byok.drop_to_import`` from each state's audit event) and by whoever computes the backlog
(:func:`observe_backlog`: the reconciler's pass, the dashboard).

Nothing is imported or configured at import time (the Function's cold start stays small): the
first span, audit event or backlog calls :func:`configure_once`. Tests install in-memory
exporters (and an in-memory metric reader) with :func:`install` and undo it with :func:`reset`.

Telemetry is not the audit record (Application Insights can sample or drop): the trail in blob
storage is. :class:`TelemetryAuditSink` therefore does not fail an event for an exporter's
error (logged); a programming error (a ``TypeError`` from an OpenTelemetry SDK older than the
keyword ``Logger.emit`` of 1.38) is raised, so tests see it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from byok_pipeline.core import metrics as m

if TYPE_CHECKING:
    from opentelemetry._logs import Logger
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from opentelemetry.trace import Span, Tracer

    from byok_pipeline.core.settings import Settings

log = logging.getLogger("byok_pipeline.adapters.telemetry")
SCOPE = "byok_pipeline"
SPAN_NAME = "byok.package"
#: Span attributes copied from the audit events emitted inside a package span.
SPAN_FIELDS = (
    "correlation_id",
    "package_sha256",
    "key_name",
    "target_type",
    "state",
    "reason_code",
    "imported_kid",
    "attempt",
)
#: Every attribute a package span can carry: in Application Insights a span is a row of
#: ``AppRequests`` (``Name`` is :data:`SPAN_NAME`) with these in ``Properties``. ``outcome`` is
#: the final state, ``retry`` (a transient failure: the platform redelivers; ``error_reason``
#: says why, ``throttled`` for a 429), ``in_progress`` or ``error`` (``error_type``). The
#: workbook's span queries read only these (``tests/infra`` checks it).
SPAN_ATTRIBUTES = frozenset({*SPAN_FIELDS, "blob_name", "outcome", "error_reason", "error_type"})
#: ``OTEL_TRACES_SAMPLER`` values that keep every span (any other overrides sampling_ratio=1.0).
_KEEPS_EVERY_SPAN = frozenset({"always_on", "parentbased_always_on"})
#: What an exporter or the SDK may raise while a log record is emitted (I/O of a synchronous
#: exporter, a closed stream, a shut-down processor); anything else is a bug and propagates.
TELEMETRY_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError)


class PipelineMetrics:
    """The pipeline's instruments on one meter (:data:`byok_pipeline.core.metrics.METRICS`)."""

    def __init__(self, meter: Meter) -> None:
        specs = m.METRICS
        self.packages = meter.create_counter(
            m.PACKAGES, unit=specs[m.PACKAGES].unit, description=specs[m.PACKAGES].description
        )
        self.drop_to_import = meter.create_histogram(
            m.DROP_TO_IMPORT,
            unit=specs[m.DROP_TO_IMPORT].unit,
            description=specs[m.DROP_TO_IMPORT].description,
            explicit_bucket_boundaries_advisory=m.DROP_TO_IMPORT_BUCKETS,
        )
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        for name in (m.WAITING, m.THROTTLED):
            meter.create_observable_gauge(
                name,
                callbacks=[self._observer(name)],
                unit=specs[name].unit,
                description=specs[name].description,
            )

    def record_event(self, event: Mapping[str, Any]) -> None:
        """Count the state an audit event records; with ``byok.imported``, its drop-to-import
        seconds. Other events (``byok.verified``, KEK and policy events) record nothing."""
        state = m.state_of_event(event)
        if state is None:
            return
        reason = event.get("reason_code")
        self.packages.add(
            1, m.package_attributes(state, reason if isinstance(reason, str) else None)
        )
        if state == "imported":
            dropped, imported = event.get("drop_time"), event.get("time")
            seconds = m.drop_to_import_seconds(
                dropped if isinstance(dropped, str) else None,
                imported if isinstance(imported, str) else None,
            )
            if seconds is not None:
                self.drop_to_import.record(seconds)

    def observe_backlog(self, backlog: m.Backlog) -> None:
        """The gauges' figures, reported once at the next collection (a newer call replaces
        them; no call, no observation)."""
        with self._lock:
            self._pending = {m.WAITING: backlog.waiting, m.THROTTLED: backlog.throttled}

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> list[Observation]:
            from opentelemetry.metrics import Observation

            with self._lock:
                value = self._pending.pop(name, None)
            return [] if value is None else [Observation(value)]

        return observe


@dataclass
class Telemetry:
    """The tracer, logger and instruments every span, audit log record and metric goes
    through."""

    tracer: Tracer
    logger: Logger
    exporter: str  # "azure-monitor", "jsonl:<path>", "memory", "none"
    providers: tuple[Any, ...] = ()  # kept for force_flush/shutdown
    metrics: PipelineMetrics | None = None  # None: built without instruments (records nothing)

    def force_flush(self) -> None:
        for provider in self.providers:
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                flush()


_lock = threading.Lock()
_state: Telemetry | None = None
_current: contextvars.ContextVar[PackageSpan | None] = contextvars.ContextVar(
    "byok_package_span", default=None
)


def configure_once(
    settings: Settings | None = None, env: Mapping[str, str] | None = None
) -> Telemetry:
    """Set telemetry up on first call (thread-safe); later calls return the same object.

    Never raises: a telemetry set-up failure is logged and telemetry is disabled (the audit
    trail does not depend on it).
    """
    global _state  # noqa: PLW0603  # one telemetry set-up per process, by design
    if _state is not None:
        return _state
    with _lock:
        if _state is None:
            env = os.environ if env is None else env
            try:
                _state = _configure(settings, env)
            except Exception:  # any SDK set-up failure must not stop imports
                log.exception("telemetry set-up failed; continuing without telemetry")
                _state = _noop()
        return _state


def install(
    tracer_provider: Any, logger_provider: Any, meter_provider: Any | None = None
) -> Telemetry:
    """Use these SDK providers (tests: in-memory exporters and metric reader; without a meter
    provider, metrics are recorded nowhere). Replaces any earlier set-up for this module only;
    the global OpenTelemetry providers are left alone."""
    global _state  # noqa: PLW0603  # one telemetry set-up per process, by design
    from byok_pipeline import __version__

    if meter_provider is None:
        from opentelemetry.metrics import NoOpMeterProvider

        meter_provider = NoOpMeterProvider()
    with _lock:
        _state = Telemetry(
            tracer_provider.get_tracer(SCOPE, __version__),
            logger_provider.get_logger(SCOPE, __version__),
            "memory",
            (tracer_provider, logger_provider, meter_provider),
            PipelineMetrics(meter_provider.get_meter(m.METER, __version__)),
        )
        return _state


def reset() -> None:
    """Forget the set-up (tests). The next span or event configures again."""
    global _state  # noqa: PLW0603  # one telemetry set-up per process, by design
    with _lock:
        _state = None


def telemetry_log_path(settings: Settings | None, env: Mapping[str, str]) -> Path | None:
    """Where the local JSON-lines exporter writes, None when it is off."""
    explicit = env.get("BYOK_TELEMETRY_LOG")
    if explicit:
        return Path(explicit)
    audit_log = (settings.audit_log if settings else None) or env.get("BYOK_AUDIT_LOG")
    return Path(audit_log).with_name("telemetry.jsonl") if audit_log else None


def azure_monitor_options(env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for ``configure_azure_monitor``: no sampling of audit records, the
    pipeline's logger only, and Entra ID authentication as the Function's managed identity.
    Warns when the environment overrides them (``OTEL_TRACES_SAMPLER``,
    ``OTEL_LOGS_EXPORTER=none``: the distro reads both from the environment and they win).

    ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` with a ``ClientId`` is read by the exporter
    itself (so no ``credential`` is passed); with ``Authorization=AAD`` but no ``ClientId``,
    the user-assigned identity of ``AZURE_CLIENT_ID`` is passed explicitly.
    """
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip()
    if sampler and sampler.lower() not in _KEEPS_EVERY_SPAN:
        log.warning(
            "OTEL_TRACES_SAMPLER=%s is set: azure-monitor-opentelemetry lets it override "
            "sampling_ratio=1.0, so package spans may be sampled (audit log records are "
            "still sent); unset it to keep every span",
            sampler,
        )
    if env.get("OTEL_LOGS_EXPORTER", "").strip().lower() == "none":
        log.warning(
            "OTEL_LOGS_EXPORTER=none is set: audit events are not sent to Application "
            "Insights (the trail still records them)"
        )
    if env.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "none":
        log.warning(
            "OTEL_METRICS_EXPORTER=none is set: the pipeline's metrics (byok.packages, "
            "byok.drop_to_import, byok.waiting, byok.throttled) are not sent to Application "
            "Insights; the workbook's metric panels and the failed-packages alert stay empty"
        )
    options: dict[str, Any] = {
        "connection_string": env["APPLICATIONINSIGHTS_CONNECTION_STRING"],
        "sampling_ratio": 1.0,
        "enable_trace_based_sampling_for_logs": False,
        "logger_name": "byok_pipeline",
        "enable_live_metrics": False,
    }
    auth = env.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "")
    pairs = dict(p.split("=", 1) for p in auth.split(";") if "=" in p)
    pairs = {k.strip().lower(): v.strip() for k, v in pairs.items()}
    client_id = env.get("AZURE_CLIENT_ID")
    if pairs.get("authorization") == "AAD" and not pairs.get("clientid") and client_id:
        from azure.identity import ManagedIdentityCredential

        options["credential"] = ManagedIdentityCredential(client_id=client_id)
    return options


def _configure(settings: Settings | None, env: Mapping[str, str]) -> Telemetry:
    from byok_pipeline import __version__

    if env.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
        from azure.monitor.opentelemetry import configure_azure_monitor
        from opentelemetry import trace
        from opentelemetry._logs import get_logger_provider
        from opentelemetry.metrics import get_meter_provider

        configure_azure_monitor(**azure_monitor_options(env))
        tracer_provider, logger_provider = trace.get_tracer_provider(), get_logger_provider()
        meter_provider = get_meter_provider()  # the distro's: a 60 s periodic reader
        return Telemetry(
            tracer_provider.get_tracer(SCOPE, __version__),
            logger_provider.get_logger(SCOPE, __version__),
            "azure-monitor",
            (tracer_provider, logger_provider, meter_provider),
            PipelineMetrics(meter_provider.get_meter(m.METER, __version__)),
        )
    path = telemetry_log_path(settings, env)
    if path is None:
        return _noop()
    return _jsonl(path)


def _noop() -> Telemetry:
    from opentelemetry._logs import NoOpLogger
    from opentelemetry.metrics import NoOpMeter
    from opentelemetry.trace import NoOpTracer

    return Telemetry(
        NoOpTracer(), NoOpLogger(SCOPE), "none", (), PipelineMetrics(NoOpMeter(m.METER))
    )


def _jsonl(path: Path) -> Telemetry:
    """Spans and log records as JSON lines in ``path`` (synchronous: local runs only), and the
    metrics as one JSON line per collection (a periodic reader; the last at exit)."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    from byok_pipeline import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    out = path.open("a", encoding="utf-8", buffering=1)  # closed at process exit
    resource = Resource.create({"service.name": "byok-pipeline", "service.version": __version__})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        SimpleSpanProcessor(
            ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
        )
    )
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        SimpleLogRecordProcessor(
            ConsoleLogRecordExporter(out=out, formatter=lambda r: r.to_json(indent=None) + "\n")
        )
    )
    reader = PeriodicExportingMetricReader(
        ConsoleMetricExporter(out=out, formatter=lambda data: data.to_json(indent=None) + "\n")
    )
    meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
    return Telemetry(
        tracer_provider.get_tracer(SCOPE, __version__),
        logger_provider.get_logger(SCOPE, __version__),
        f"jsonl:{path}",
        (tracer_provider, logger_provider, meter_provider),
        PipelineMetrics(meter_provider.get_meter(m.METER, __version__)),
    )


# -- spans ------------------------------------------------------------------------------------


class PackageSpan:
    """The span of one package delivery; audit events emitted inside it fill its attributes."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def set_correlation_id(self, correlation_id: str) -> None:
        self.span.set_attribute("correlation_id", correlation_id)

    def set_outcome(self, state: str, reason_code: str | None = None) -> None:
        self.span.set_attribute("outcome", state)
        if reason_code:
            self.span.set_attribute("reason_code", reason_code)

    def note_event(self, event: Mapping[str, Any]) -> None:
        for name in SPAN_FIELDS:
            value = event.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool):
                self.span.set_attribute(name, value)


@contextlib.contextmanager
def package_span(correlation_id: str | None, blob_name: str) -> Iterator[PackageSpan]:
    """The span around processing one delivery of ``blob_name``.

    ``correlation_id`` may be None when it is not known yet: call
    :meth:`PackageSpan.set_correlation_id` once the status is loaded; audit events emitted
    inside the span also set it. An exception marks the span as failed and propagates
    (an :class:`~byok_pipeline.core.errors.InProgress` is recorded as outcome ``in_progress``).
    """
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from byok_pipeline.core.errors import InProgress, PipelineError

    tel = configure_once()
    attributes: dict[str, str] = {"blob_name": blob_name}
    if correlation_id:
        attributes["correlation_id"] = correlation_id
    with tel.tracer.start_as_current_span(
        SPAN_NAME,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        handle = PackageSpan(span)
        token = _current.set(handle)
        try:
            yield handle
        except InProgress:
            span.set_attribute("outcome", "in_progress")
            raise
        except PipelineError as exc:
            span.set_attribute("outcome", "retry")
            span.set_attribute("error_reason", exc.reason)
            span.set_status(Status(StatusCode.ERROR, exc.reason))
            raise
        except BaseException as exc:
            span.set_attribute("outcome", "error")
            span.set_attribute("error_type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            _current.reset(token)


def current_package_span() -> PackageSpan | None:
    return _current.get()


# -- metrics ------------------------------------------------------------------------------------


def observe_backlog(backlog: m.Backlog, settings: Settings | None = None) -> None:
    """Report the ``byok.waiting`` and ``byok.throttled`` gauges' figures (computed by the
    reconciler's pass or the dashboard from what they read anyway). Best effort, like every
    telemetry call: an exporter's error is logged, never raised."""
    try:
        instruments = configure_once(settings).metrics
        if instruments is not None:
            instruments.observe_backlog(backlog)
    except TELEMETRY_ERRORS as exc:
        log.warning("could not record the backlog gauges: %s", type(exc).__name__)


# -- audit events as log records ----------------------------------------------------------------


def event_attributes(event: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """The event's fields as OpenTelemetry attributes (scalars kept, anything else as JSON)."""
    attributes: dict[str, str | int | float | bool] = {}
    for name, value in event.items():
        if value is None:
            continue
        if isinstance(value, str | int | float | bool):
            attributes[name] = value
        else:
            attributes[name] = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return attributes


class TelemetryAuditSink:
    """Writes each audit event as an OpenTelemetry log record: body = the event name,
    attributes = the event's fields (in Application Insights: ``AppTraces``, ``Message`` and
    ``Properties.<field>``), and records the metrics it makes (``byok.packages``,
    ``byok.drop_to_import``: :meth:`PipelineMetrics.record_event`). Best effort: an exporter's
    failure (:data:`TELEMETRY_ERRORS`) is logged, never raised; anything else (a ``TypeError``
    from an SDK without the keyword form of ``Logger.emit``, opentelemetry-sdk < 1.38) is a
    bug and propagates."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        for event in events:
            self.emit(event)

    def emit(self, event: Mapping[str, Any]) -> None:
        from opentelemetry._logs import SeverityNumber

        try:
            tel = configure_once(self.settings)
            name = str(event.get("event", "byok.event"))
            tel.logger.emit(
                body=name,
                attributes=event_attributes(event),
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
            )
            span = _current.get()
            if span is not None:
                span.note_event(event)
            if tel.metrics is not None:
                tel.metrics.record_event(event)
        except TELEMETRY_ERRORS as exc:  # the trail is the record: an exporter's error is logged
            log.warning(
                "could not write audit event %s to telemetry: %s",
                event.get("event"),
                type(exc).__name__,
            )
