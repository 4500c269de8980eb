"""Without services: CLI events against the schema, telemetry set-up, the audit sink's wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_support import (
    Otel,
    attrs,
    neutral_distro_env,
    resolved,
    sample_event,
    sampler_built,
    schema_errors,
)

from byok_pipeline.adapters import telemetry
from byok_pipeline.audit.events import cli_event


def test_cli_kek_events_match_the_schema() -> None:
    created = cli_event("byok.kek.created", correlation_id="c" * 32, kek_kid="https://h/keys/k/v",
                        key_name="kek-1")  # fmt: skip
    downloaded = cli_event("byok.kek.downloaded", correlation_id="d" * 32,
                           kek_kid="https://h/keys/k/v", kek_spki_sha256="0" * 64)  # fmt: skip
    assert schema_errors(created) == []
    assert schema_errors(downloaded) == []
    assert schema_errors({**created, "event": "byok.made.up"}) != []


# -- telemetry -----------------------------------------------------------------------------


@pytest.fixture
def fresh_telemetry() -> Iterator[None]:
    telemetry.reset()
    yield
    telemetry.reset()


def test_azure_monitor_keeps_every_record_and_uses_the_functions_identity() -> None:
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000",
           "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=AAD;ClientId=1111",
           "AZURE_CLIENT_ID": "1111"}  # fmt: skip
    options = telemetry.azure_monitor_options(env)
    assert options["sampling_ratio"] == 1.0
    assert options["enable_trace_based_sampling_for_logs"] is False
    assert "credential" not in options  # the exporter reads the authentication string itself
    env["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] = "Authorization=AAD"
    options = telemetry.azure_monitor_options(env)
    assert type(options["credential"]).__name__ == "ManagedIdentityCredential"


def test_configure_once_uses_azure_monitor_with_a_connection_string(
    fresh_telemetry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import azure.monitor.opentelemetry as distro

    neutral_distro_env(monkeypatch)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kw: calls.append(kw))
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x"}
    first = telemetry.configure_once(None, env)
    again = telemetry.configure_once(None, env)
    assert first is again
    assert first.exporter == "azure-monitor"
    assert len(calls) == 1
    # what the distro itself makes of the options passed (a misspelled option would not count)
    conf = resolved(calls[0])
    assert sampler_built(conf) == ("application_insights_ratio", 1.0)
    assert conf["enable_trace_based_sampling_for_logs"] is False
    assert conf["logger_name"] == "byok_pipeline"


def test_without_app_insights_a_local_exporter_writes_json_lines(
    fresh_telemetry: None, tmp_path: Path
) -> None:
    path = tmp_path / "telemetry.jsonl"
    tel = telemetry.configure_once(None, {"BYOK_TELEMETRY_LOG": str(path)})
    assert tel.exporter == f"jsonl:{path}"
    with telemetry.package_span("c0ffee", "k.byok"):
        telemetry.TelemetryAuditSink().emit({**sample_event(1), "correlation_id": "c0ffee"})
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    log_line = next(x for x in lines if "body" in x)
    span_line = next(x for x in lines if x.get("name") == "byok.package")
    assert log_line["body"] == "byok.received"
    assert log_line["attributes"]["correlation_id"] == "c0ffee"
    assert span_line["attributes"]["correlation_id"] == "c0ffee"
    assert log_line["trace_id"] == span_line["context"]["trace_id"]


def test_package_spans_carry_only_the_attributes_the_workbook_reads(otel: Otel) -> None:
    """Each way a delivery ends: its outcome (``retry`` and its reason for a transient error,
    as the workbook's "retries in flight" reads them), and no attribute outside SPAN_ATTRIBUTES."""
    from byok_pipeline.core.errors import InProgress, TransientError

    with telemetry.package_span(None, "a.byok") as span:
        span.set_correlation_id("c1")
        telemetry.TelemetryAuditSink().emit({**sample_event(1), "correlation_id": "c1"})
        span.set_outcome("rejected", "bad_kid")
    with pytest.raises(TransientError), telemetry.package_span("c2", "b.byok"):
        raise TransientError("429 from the HSM", reason="throttled", throttled=True)
    with pytest.raises(InProgress), telemetry.package_span("c3", "c.byok"):
        raise InProgress("leased by another worker")
    with pytest.raises(KeyError), telemetry.package_span("c4", "d.byok"):
        raise KeyError("a bug")
    spans = otel.package_spans()
    assert [
        (attrs(s)["blob_name"], attrs(s)["outcome"], attrs(s).get("error_reason")) for s in spans
    ] == [
        ("a.byok", "rejected", None),
        ("b.byok", "retry", "throttled"),
        ("c.byok", "in_progress", None),
        ("d.byok", "error", None),
    ]
    for s in spans:
        assert set(attrs(s)) <= telemetry.SPAN_ATTRIBUTES, set(attrs(s)) - telemetry.SPAN_ATTRIBUTES


def test_telemetry_is_off_without_any_destination(fresh_telemetry: None) -> None:
    assert telemetry.configure_once(None, {}).exporter == "none"
    telemetry.TelemetryAuditSink().emit(sample_event(1))  # nothing to write to, no error


def test_nothing_heavy_is_imported_or_configured_at_import_time() -> None:
    code = (
        "import sys, byok_pipeline.processing.wiring, byok_pipeline.adapters.telemetry, byok_pipeline.audit.trail, "
        "byok_pipeline.cli.audit, byok_pipeline.processing.runtime\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'azure.monitor'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_audit_sink_wires_the_trail_then_telemetry_and_the_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from byok_pipeline.adapters.telemetry import TelemetryAuditSink
    from byok_pipeline.audit.events import FanoutAuditSink, JsonLinesAuditSink
    from byok_pipeline.audit.trail import TrailAuditSink
    from byok_pipeline.core.errors import ConfigError
    from byok_pipeline.core.settings import Settings
    from byok_pipeline.processing.wiring import audit_sink

    monkeypatch.delenv("BYOK_STORAGE__blobServiceUri", raising=False)
    monkeypatch.setenv("BYOK_STORAGE", "UseDevelopmentStorage=true")
    log = str(tmp_path / "audit.jsonl")
    key_file = tmp_path / "person.key.pem"
    key_file.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    settings = Settings(
        hsm_url="https://h.managedhsm.azure.net",
        audit_container="aud",
        audit_people_container="people",
        audit_log=log,
        audit_person_key=str(key_file),
    )
    sink = audit_sink(settings, role="person")
    assert isinstance(sink, TrailAuditSink)
    assert sink.trail.container_name == "people"  # a person's chain: never the pipeline's
    assert sink.trail.role == "person"
    assert sink.trail.signer.kid.startswith("file:")
    assert isinstance(sink.then, FanoutAuditSink)
    assert [type(s) for s in sink.then.sinks] == [TelemetryAuditSink, JsonLinesAuditSink]
    # records are signed: the pipeline without its signing key is a configuration error
    with pytest.raises(ConfigError, match="BYOK_AUDIT_SIGNING_KID"):
        audit_sink(settings, role="pipeline")

    monkeypatch.delenv("BYOK_STORAGE")
    local = audit_sink(settings)  # no storage: the local file is the record
    assert isinstance(local, FanoutAuditSink)
    assert [type(s) for s in local.sinks] == [TelemetryAuditSink, JsonLinesAuditSink]
    with pytest.raises(ConfigError, match="BYOK_AUDIT_LOG"):
        audit_sink(Settings(hsm_url="https://h.managedhsm.azure.net"))
