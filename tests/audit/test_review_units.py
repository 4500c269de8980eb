"""Without services: canonical JSON without NaN, the per-event schema rules, and telemetry (the
distro's own option resolution, the sampler override warning, which errors the telemetry sink
swallows)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from audit_support import (
    neutral_distro_env,
    resolved,
    sample_event,
    sampler_built,
    schema_errors,
)
from opentelemetry.sdk.trace import TracerProvider

from byok_pipeline.adapters import telemetry
from byok_pipeline.audit.records import canonical, parse_line, self_hash_ok

# -- canonical JSON -------------------------------------------------------------------------


def test_canonical_json_refuses_nan_and_infinity() -> None:
    from byok_pipeline.audit.records import GENESIS, MalformedRecord, encode_line, seal_record

    with pytest.raises(ValueError, match="Out of range float"):
        canonical({"duration_ms": float("nan")})
    record = seal_record({**sample_event(1), "chain_id": "pipeline-20260101T000000Z-0123456789ab",
                          "sequence": 1, "prev_sha256": GENESIS,
                          "recorded": "2026-01-01T00:00:00Z"})  # fmt: skip
    raw = encode_line(record)[:-1].replace(b'"attempt":1', b'"attempt":NaN')
    with pytest.raises(MalformedRecord, match="NaN is not JSON"):
        parse_line(raw)
    big = encode_line(record)[:-1].replace(b'"attempt":1', b'"attempt":1e400')
    assert not self_hash_ok(big, parse_line(big))  # reads as an infinity: cannot be canonical
    huge = encode_line(record)[:-1].replace(b'"attempt":1', b'"attempt":' + b"9" * 5000)
    with pytest.raises(MalformedRecord):
        parse_line(huge)


# -- per-event schema rules -----------------------------------------------------------------


def imported_event() -> dict[str, Any]:
    return {**sample_event(1), "event": "byok.imported", "state": "imported",
            "target_type": "ec-p256", "kek_kid": "https://h/keys/kek/1",
            "imported_kid": "https://h/keys/payments/2", "fingerprint_result": "match"}  # fmt: skip


@pytest.mark.parametrize(
    ("event", "complaint"),
    [
        ({k: v for k, v in imported_event().items() if k != "imported_kid"}, "'imported_kid' is a required property"),
        ({k: v for k, v in imported_event().items() if k != "key_name"}, "'key_name' is a required property"),
        ({**imported_event(), "state": "rejected"}, "'imported' was expected"),
        ({**sample_event(1), "event": "byok.rejected", "state": "rejected"}, "'reason_code' is a required property"),
        ({**sample_event(1), "state": "bogus"}, "'bogus' is not one of"),
        ({**imported_event(), "event": "byok.verified", "fingerprint_result": "unverified"}, "'match' was expected"),
        ({**sample_event(1), "event": "byok.duplicate", "state": "duplicate"}, "'duplicate_of' is a required property"),
    ],
    ids=["imported without kid", "imported without key", "imported with another state",
         "rejected without reason", "unknown state", "verified unverified", "duplicate of nothing"],
)  # fmt: skip
def test_the_schema_requires_each_events_own_fields(event: dict[str, Any], complaint: str) -> None:
    assert any(complaint in e for e in schema_errors(event)), schema_errors(event)


def test_complete_events_satisfy_the_per_event_rules() -> None:
    assert schema_errors(imported_event()) == []
    assert schema_errors({**sample_event(1), "event": "byok.rejected", "state": "rejected",
                          "reason_code": "bad_package", "message": "no"}) == []  # fmt: skip


# -- telemetry ------------------------------------------------------------------------------


@pytest.fixture
def fresh_telemetry() -> Iterator[None]:
    telemetry.reset()
    yield
    telemetry.reset()


@pytest.fixture
def distro_env(monkeypatch: pytest.MonkeyPatch) -> None:
    neutral_distro_env(monkeypatch)


ENV = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000"}  # fmt: skip


def test_the_distro_resolves_our_options_to_keep_every_record(distro_env: None) -> None:
    from azure.monitor.opentelemetry import _constants

    options = telemetry.azure_monitor_options(ENV)
    known = {v for k, v in vars(_constants).items() if k.endswith("_ARG") and isinstance(v, str)}
    known |= {"credential", "storage_directory", "disable_offline_storage"}  # the exporter's
    assert set(options) <= known, set(options) - known  # a misspelled option is ignored silently
    conf = resolved(options)
    assert sampler_built(conf) == ("application_insights_ratio", 1.0)
    assert conf[_constants.ENABLE_TRACE_BASED_SAMPLING_ARG] is False
    assert conf[_constants.LOGGER_NAME_ARG] == "byok_pipeline"
    assert conf[_constants.ENABLE_LIVE_METRICS_ARG] is False
    assert conf[_constants.DISABLE_LOGGING_ARG] is False
    assert conf[_constants.DISABLE_TRACING_ARG] is False
    assert conf[_constants.CONNECTION_STRING_ARG] == ENV["APPLICATIONINSIGHTS_CONNECTION_STRING"]


def test_otel_traces_sampler_overrides_sampling_and_is_warned_about(
    distro_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    env = {**ENV, "OTEL_TRACES_SAMPLER": "always_off"}
    with caplog.at_level(logging.WARNING, logger="byok_pipeline.adapters.telemetry"):
        options = telemetry.azure_monitor_options(env)
    assert sampler_built(resolved(options)) == ("always_off", 0.0)  # the hazard is real
    assert "OTEL_TRACES_SAMPLER=always_off" in caplog.text
    caplog.clear()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    with caplog.at_level(logging.WARNING, logger="byok_pipeline.adapters.telemetry"):
        options = telemetry.azure_monitor_options({**ENV, "OTEL_TRACES_SAMPLER": "parentbased_always_on"})  # fmt: skip
    assert sampler_built(resolved(options))[0] == "parentbased_always_on"
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="byok_pipeline.adapters.telemetry"):
        telemetry.azure_monitor_options({**ENV, "OTEL_LOGS_EXPORTER": "none"})
    assert "OTEL_LOGS_EXPORTER=none" in caplog.text


class _LoggerProvider:
    def __init__(self, logger: object) -> None:
        self.logger = logger

    def get_logger(self, *_args: Any) -> object:
        return self.logger


class _PositionalOnlyLogger:
    """``Logger.emit(record)`` as in opentelemetry-sdk < 1.38: no keyword form."""

    def emit(self, _record: object) -> None:
        raise AssertionError("not reached")


class _FailingExporterLogger:
    def emit(self, **_kwargs: Any) -> None:
        raise OSError(28, "No space left on device")


def test_a_type_error_from_the_sdk_is_not_swallowed(fresh_telemetry: None) -> None:
    telemetry.install(TracerProvider(), _LoggerProvider(_PositionalOnlyLogger()))
    with pytest.raises(TypeError):
        telemetry.TelemetryAuditSink().emit(sample_event(1))


def test_an_exporter_error_is_logged_with_the_event_name_only(
    fresh_telemetry: None, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry.install(TracerProvider(), _LoggerProvider(_FailingExporterLogger()))
    event = sample_event(1)
    with caplog.at_level(logging.WARNING, logger="byok_pipeline.adapters.telemetry"):
        telemetry.TelemetryAuditSink().emit(event)
    assert "byok.received" in caplog.text
    assert "OSError" in caplog.text
    assert event["correlation_id"] not in caplog.text
