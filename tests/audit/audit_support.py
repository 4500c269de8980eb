"""Helpers of the audit tests: the event schema, trail reading and tampering, secret scans."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient
from jsonschema import Draft202012Validator, FormatChecker
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pipeline_support import Stack

import byok_pipeline
from byok_pipeline.audit.events import AuditSink
from byok_pipeline.audit.records import parse_line
from byok_pipeline.audit.trail import AuditTrail
from byok_pipeline.audit.verify import TrailReader, split_lines

SCHEMA_PATH = Path(byok_pipeline.__file__).parent / "schemas" / "audit-event.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=FormatChecker())


def schema_errors(event: Mapping[str, Any]) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(dict(event))]


@dataclass
class Otel:
    """The in-memory exporters behind telemetry."""

    spans: InMemorySpanExporter
    logs: InMemoryLogRecordExporter

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def package_spans(self) -> list[ReadableSpan]:
        return [s for s in self.finished_spans() if s.name == "byok.package"]

    def log_records(self) -> list[ReadableLogRecord]:
        return list(self.logs.get_finished_logs())


@dataclass
class Audited:
    """A pipeline stack audited through the production sinks."""

    stack: Stack
    otel: Otel
    sink: AuditSink

    @property
    def reader(self) -> TrailReader:
        return TrailReader(self.stack.service, self.stack.settings.audit_container)

    def trail_records(self) -> list[dict[str, Any]]:
        return trail_records(self.reader)


def trail_records(reader: TrailReader) -> list[dict[str, Any]]:
    return [parse_line(line.raw) for line in reader.lines(reader.blob_names())]


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


class Clock:
    """A settable UTC clock."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def day_clock(day: str) -> Clock:
    return Clock(datetime.fromisoformat(f"{day}T12:00:00").replace(tzinfo=UTC))


def write_trail(
    service: BlobServiceClient, container: str, count: int, *, clock: Clock | None = None
) -> AuditTrail:
    trail = AuditTrail(service, container, clock=clock or day_clock("2026-01-02"))
    for i in range(count):
        trail.append(sample_event(i))
    return trail


def tamper(
    service: BlobServiceClient,
    container: str,
    blob: str,
    edit: Callable[[list[bytes]], list[bytes]],
) -> None:
    """Rewrite an append blob's lines with ``edit``, in place, as someone with write access
    to the storage account could (the replaced blob is again an append blob)."""
    client = service.get_blob_client(container, blob)
    lines = [line.raw for line in split_lines(blob, client.download_blob().readall())]
    data = b"".join(line + b"\n" for line in edit(lines))
    client.delete_blob()
    client.create_append_blob()
    client.append_block(data)


AppendFault = Callable[[Any, bytes, dict[str, Any]], Any]


class SpyContainer:
    """Stands in for a trail writer's ``ContainerClient``: records which blob methods were
    called, and hands ``append_block`` calls whose data ``when`` accepts to ``fault`` (given
    the real blob client, the data and the keywords) while ``faults`` lasts."""

    def __init__(self, inner: Any, *, when: Callable[[bytes], bool] = lambda _: False,
                 fault: AppendFault | None = None, faults: int = 0) -> None:  # fmt: skip
        self.inner = inner
        self.when = when
        self.fault = fault
        self.faults = faults
        self.calls: list[tuple[str, str]] = []  # (method, blob name)

    def get_blob_client(self, name: str) -> _SpyBlob:
        return _SpyBlob(self, self.inner.get_blob_client(name), name)

    def list_blobs(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("list_blobs", ""))
        return self.inner.list_blobs(*args, **kwargs)


class _SpyBlob:
    def __init__(self, owner: SpyContainer, inner: Any, name: str) -> None:
        self._owner = owner
        self._inner = inner
        self._name = name

    def append_block(self, data: bytes, **kwargs: Any) -> Any:
        owner = self._owner
        owner.calls.append(("append_block", self._name))
        if owner.fault is not None and owner.faults > 0 and owner.when(data):
            owner.faults -= 1
            return owner.fault(self._inner, data, kwargs)
        return self._inner.append_block(data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def spied(*args: Any, **kwargs: Any) -> Any:
            self._owner.calls.append((name, self._name))
            return method(*args, **kwargs)

        return spied


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
