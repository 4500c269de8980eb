"""Audit fixtures: Azurite and the emulator (started on free loopback ports, stopped after), an
import-only KEK, per-test containers, in-memory OpenTelemetry exporters, and a pipeline stack
whose audit goes through the production sinks (trail + telemetry) as wired by ``audit_sink``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_support import Audited, Otel
from azure.storage.blob import BlobServiceClient
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pipeline_support import Stack

from byok_pipeline.adapters import telemetry
from byok_pipeline.audit.events import FanoutAuditSink
from byok_pipeline.localdev.azurite import Azurite
from byok_pipeline.processing.wiring import audit_sink
from managed_hsm_emulator.testing import EmulatorHandle

_COUNTER = itertools.count()


@pytest.fixture(scope="session")
def kek_name(hsm: EmulatorHandle) -> str:
    hsm.key_client().create_rsa_key(
        "audit-kek", size=3072, key_operations=["import"], hardware_protected=True
    )
    return "audit-kek"


@pytest.fixture
def service(azurite: Azurite) -> Iterator[BlobServiceClient]:
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    yield client
    client.close()


@pytest.fixture
def container(service: BlobServiceClient) -> str:
    """A fresh, empty audit container."""
    name = f"trail{next(_COUNTER)}"
    service.create_container(name)
    return name


@pytest.fixture
def stack(azurite: Azurite, hsm: EmulatorHandle, kek_name: str, tmp_path: Path) -> Iterator[Stack]:
    prefix = f"au{next(_COUNTER)}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    s = Stack.create(azurite, hsm, kek_name, prefix, tmp_path, service)
    yield s
    s.close()


@pytest.fixture
def otel() -> Iterator[Otel]:
    """In-memory span and log exporters behind :mod:`byok_pipeline.adapters.telemetry`."""
    spans = InMemorySpanExporter()
    logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    telemetry.install(tracer_provider, logger_provider)
    yield Otel(spans, logs)
    telemetry.reset()
    tracer_provider.shutdown()
    logger_provider.shutdown()


@pytest.fixture
def audited(stack: Stack, azurite: Azurite, otel: Otel, monkeypatch: pytest.MonkeyPatch) -> Audited:
    """The stack with its audit wired as in production (``wiring.audit_sink``): the trail in
    the stack's audit container, then OpenTelemetry. The stack's memory sink sees each event
    after the production sinks accepted it."""
    monkeypatch.setenv("BYOK_STORAGE", azurite.connection_string)
    monkeypatch.delenv("BYOK_STORAGE__blobServiceUri", raising=False)
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)
    production = audit_sink(stack.settings)
    stack.deps.audit = FanoutAuditSink(production, stack.audit)
    return Audited(stack, otel, production)
