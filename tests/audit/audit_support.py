"""Helpers of the audit tests: the event schema, trail reading and tampering, secret scans."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pipeline_support import Stack

import byok_pipeline
from byok_pipeline.audit.events import AuditSink
from byok_pipeline.audit.records import SEAL_EVENT, START_EVENT, parse_line
from byok_pipeline.audit.verify import TrailReader, Trust

SCHEMA_PATH = Path(byok_pipeline.__file__).parent / "schemas" / "audit-event.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=FormatChecker())


def schema_errors(event: Mapping[str, Any]) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(dict(event))]


@dataclass(frozen=True)
class Point:
    """One metric data point as read back: its attributes and value (a counter's or gauge's
    ``value``; a histogram's ``count``, ``sum``, ``min``, ``max``)."""

    metric: str
    attributes: dict[str, Any]
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    min: float | None = None
    max: float | None = None


@dataclass
class Metrics:
    """One collection of the in-memory metric reader (gauges report each backlog once)."""

    points: list[Point]
    units: dict[str, str]
    descriptions: dict[str, str]
    json: str

    def of(self, name: str) -> list[Point]:
        return [p for p in self.points if p.metric == name]

    def counter(self, name: str, **attributes: str) -> float:
        """The counter's value for exactly these attributes (0 when never counted)."""
        return sum(p.value or 0 for p in self.of(name) if p.attributes == attributes)

    def gauge(self, name: str) -> float | None:
        values = [p.value for p in self.of(name)]
        assert len(values) <= 1, values
        return values[0] if values else None


@dataclass
class Otel:
    """The in-memory exporters (and metric reader) behind telemetry."""

    spans: InMemorySpanExporter
    logs: InMemoryLogRecordExporter
    metrics: InMemoryMetricReader

    def collect(self) -> Metrics:
        """Collect every metric now (cumulative since the fixture started)."""
        data = self.metrics.get_metrics_data()
        points: list[Point] = []
        units: dict[str, str] = {}
        descriptions: dict[str, str] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    units[metric.name] = metric.unit or ""
                    descriptions[metric.name] = metric.description or ""
                    for p in metric.data.data_points:
                        fields = {
                            k: getattr(p, k, None) for k in ("value", "count", "sum", "min", "max")
                        }
                        points.append(Point(metric.name, dict(p.attributes or {}), **fields))
        text = data.to_json(indent=None) if data is not None else ""
        return Metrics(points, units, descriptions, text)

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def package_spans(self) -> list[ReadableSpan]:
        return [s for s in self.finished_spans() if s.name == "byok.package"]

    def log_records(self) -> list[ReadableLogRecord]:
        return list(self.logs.get_finished_logs())


@dataclass
class Audited:
    """A pipeline stack audited through the production sinks (signed inside the HSM)."""

    stack: Stack
    otel: Otel
    sink: AuditSink
    trust: Trust
    make_sink: Callable[..., AuditSink]  # another production sink (another writer), for settings

    @property
    def reader(self) -> TrailReader:
        s = self.stack.settings
        return TrailReader(self.stack.service, s.audit_container, s.audit_people_container)

    def trail_records(self) -> list[dict[str, Any]]:
        """The events in the trail (start and seal records left out), in the order recorded."""
        return trail_records(self.reader)


def trail_records(reader: TrailReader) -> list[dict[str, Any]]:
    records = [parse_line(line.raw) for line in reader.lines(reader.blob_names())]
    records.sort(key=lambda r: (r["recorded"], r["chain_id"], r["sequence"]))
    return [r for r in records if r["event"] not in (START_EVENT, SEAL_EVENT)]


def sample_event(i: int, *, key: str = "payments", package: str | None = None) -> dict[str, Any]:
    """A valid ``byok.received`` event (synthetic: the trail does not care where it came from)."""
    return {
        "event": "byok.received",
        "time": "2026-01-02T03:04:05.000000Z",
        "pipeline_version": byok_pipeline.__version__,
        "state": "received",
        "attempt": 1,
        "correlation_id": uuid.uuid4().hex,
        "blob_name": f"{key}-{i}.byok",
        "key_name": key,
        "package_sha256": package or f"{i:064x}",
        "etag": '"0x8DC0000000000"',
    }


def neutral_distro_env(monkeypatch: Any) -> None:
    """Make the environment azure-monitor-opentelemetry reads neutral (restored afterwards)."""
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_LOGS_EXPORTER",
                 "OTEL_TRACES_EXPORTER", "PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    # the distro sets this default in os.environ; "otel" keeps cloud detectors (IMDS) off
    monkeypatch.setenv("OTEL_EXPERIMENTAL_RESOURCE_DETECTORS", "otel")


def resolved(options: Mapping[str, Any]) -> dict[str, Any]:
    """What azure-monitor-opentelemetry makes of ``options`` (its own option resolution)."""
    from azure.monitor.opentelemetry._utils.configurations import _get_configurations

    conf: dict[str, Any] = _get_configurations(**options)
    return conf


def sampler_built(conf: Mapping[str, Any]) -> tuple[str, object]:
    """The sampler the distro's ``_setup_tracing`` builds from resolved options (its order:
    an OTEL_TRACES_SAMPLER choice, else sampling_ratio, else the rate-limited default)."""
    from azure.monitor.opentelemetry._constants import (
        SAMPLER_TYPE,
        SAMPLING_ARG,
        SAMPLING_RATIO_ARG,
        SAMPLING_TRACES_PER_SECOND_ARG,
    )

    if SAMPLING_ARG in conf:
        return str(conf[SAMPLER_TYPE]), conf[SAMPLING_ARG]
    if SAMPLING_RATIO_ARG in conf:
        return "application_insights_ratio", conf[SAMPLING_RATIO_ARG]
    return "rate_limited", conf[SAMPLING_TRACES_PER_SECOND_ARG]


def secret_forms(secret: bytes) -> dict[str, bytes]:
    """Encodings under which a secret could leak: raw, hex, base64 and base64url at each of
    the three alignments (the last group dropped: it depends on what follows)."""
    forms = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for shift in range(3):
        forms[f"b64+{shift}"] = base64.b64encode(secret[shift:]).rstrip(b"=")[:-4]
        forms[f"b64url+{shift}"] = base64.urlsafe_b64encode(secret[shift:]).rstrip(b"=")[:-4]
    return forms


def leaks(secret: bytes, outputs: Mapping[str, bytes]) -> list[str]:
    """Which outputs hold which encoding of ``secret`` (empty when nothing leaked)."""
    return [
        f"{how} in {where}"
        for where, blob in outputs.items()
        for how, form in secret_forms(secret).items()
        if form in blob
    ]


def span_text(span: ReadableSpan) -> bytes:
    text: str = span.to_json(indent=None)
    return text.encode()


def log_text(record: ReadableLogRecord) -> bytes:
    text: str = record.to_json(indent=None)
    return text.encode()


def attrs(item: ReadableSpan | ReadableLogRecord) -> dict[str, Any]:
    if isinstance(item, ReadableSpan):
        return dict(item.attributes or {})
    return dict(item.log_record.attributes or {})


def chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(n):
        yield items[i::n]
