"""Audit fixtures: Azurite and the emulator (started on free loopback ports, stopped after), an
import-only KEK, per-test containers, in-memory OpenTelemetry exporters, and a pipeline stack
whose audit goes through the production sinks (trail + telemetry) as wired by ``audit_sink``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from audit_support import Audited, Otel
from azure.storage.blob import BlobServiceClient
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pipeline_support import Stack

from byok_pipeline.adapters import telemetry
from byok_pipeline.audit.events import AuditSink, FanoutAuditSink
from byok_pipeline.audit.trail import TrailAuditSink
from byok_pipeline.audit.verify import Trust
from byok_pipeline.cli.audit_init import trust_entry
from byok_pipeline.core.settings import Settings
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
    """In-memory span and log exporters and an in-memory metric reader behind
    :mod:`byok_pipeline.adapters.telemetry`."""
    spans = InMemorySpanExporter()
    logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    telemetry.install(tracer_provider, logger_provider, meter_provider)
    yield Otel(spans, logs, reader)
    telemetry.reset()
    tracer_provider.shutdown()
    logger_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture(scope="session")
def audit_signing_kid(hsm: EmulatorHandle) -> str:
    """The pipeline's audit signing key inside the emulator (as `byok audit init` makes it)."""
    key = hsm.key_client().create_ec_key(
        "byok-audit-signer", curve="P-256", key_operations=["sign", "verify"],
        hardware_protected=True,
    )  # fmt: skip
    return str(key.id)


@pytest.fixture
def audited(
    stack: Stack,
    azurite: Azurite,
    hsm: EmulatorHandle,
    audit_signing_kid: str,
    otel: Otel,
    monkeypatch: pytest.MonkeyPatch,
) -> Audited:
    """The stack with its audit wired as in production (``wiring.audit_sink``): the trail in
    the stack's audit container, signed inside the HSM, then OpenTelemetry. The stack's memory
    sink sees each event after the production sinks accepted it."""
    monkeypatch.setenv("BYOK_STORAGE", azurite.connection_string)
    monkeypatch.delenv("BYOK_STORAGE__blobServiceUri", raising=False)
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)
    settings = replace(stack.settings, audit_signing_kid=audit_signing_kid)
    stack.deps.settings = settings

    def make_sink(s: Settings | None = None) -> AuditSink:
        """Another production audit sink: its own writer, its own chain."""
        return audit_sink(
            replace(s or settings, audit_signing_kid=audit_signing_kid),
            credential=hsm.credential(),
            ca_bundle=str(hsm.ca),
        )

    production = make_sink()
    stack.deps.audit = FanoutAuditSink(production, stack.audit)
    assert isinstance(production, TrailAuditSink)
    public = production.trail.signer.public_key()  # type: ignore[attr-defined]  # HsmSigner
    trust = Trust.from_dict({"signers": [trust_entry(audit_signing_kid, public, "pipeline")]})
    return Audited(stack, otel, production, trust, make_sink)
