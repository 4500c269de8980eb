"""Without services: the bounds of one append (deadline, lock), canonical JSON without NaN,
``--expect-head`` verdicts, the per-event schema rules, and telemetry (the distro's own option
resolution, the sampler override warning, which errors the telemetry sink swallows)."""

from __future__ import annotations

import json
import logging
import threading
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
from azure.storage.blob import BlobServiceClient
from opentelemetry.sdk.trace import TracerProvider

from byok_pipeline.adapters import telemetry
from byok_pipeline.audit import trail as audit_trail
from byok_pipeline.audit.records import (
    GENESIS,
    MalformedRecord,
    canonical,
    encode_line,
    parse_line,
    seal_record,
)
from byok_pipeline.audit.trail import AuditTrail
from byok_pipeline.audit.verify import Line, check_expected_head, verify_lines
from byok_pipeline.cli.audit import main as audit_main
from byok_pipeline.core.errors import TransientError

BLOB = "trail/2026/01/01/0000.jsonl"


def offline_trail(**kwargs: Any) -> AuditTrail:
    """A writer whose storage is never reached (the tests replace its attempts)."""
    service = BlobServiceClient.from_connection_string("UseDevelopmentStorage=true")
    return AuditTrail(service, "offline", **kwargs)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def always_conflicting(trail: AuditTrail, time: FakeTime, monkeypatch: pytest.MonkeyPatch) -> list[int]:  # fmt: skip
    attempts: list[int] = []

    def attempt(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        time.now += 0.3  # one round trip
        raise audit_trail._Conflict("another writer appended first")

    monkeypatch.setattr(trail, "_try_append", attempt)
    return attempts


# -- one append is bounded ------------------------------------------------------------------


def test_one_append_gives_up_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    time = FakeTime()
    trail = offline_trail(deadline=5.0, max_attempts=1000, backoff=0.2, backoff_max=1.0,
                          sleep=time.sleep, monotonic=time.monotonic)  # fmt: skip
    attempts = always_conflicting(trail, time, monkeypatch)
    start = time.now
    with pytest.raises(TransientError, match=r"not appended within 5 s") as info:
        trail.append(sample_event(1))
    assert info.value.reason == "audit_trail"
    assert info.value.outcome_unknown is False
    assert time.now - start <= 5.0 + 0.3  # the last attempt may start just before
    assert 3 < len(attempts) < 1000


def test_the_lock_is_not_held_while_backing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    time = FakeTime()
    held: list[bool] = []

    def sleep(seconds: float) -> None:
        held.append(trail._lock.locked())
        time.sleep(seconds)

    trail = offline_trail(max_attempts=5, monotonic=time.monotonic, sleep=sleep)
    always_conflicting(trail, time, monkeypatch)
    with pytest.raises(TransientError, match="after 5 attempts"):
        trail.append(sample_event(1))
    assert held  # it did back off, and never with the lock
    assert not any(held)


def test_waiting_for_another_append_in_the_process_is_bounded_too() -> None:
    trail = offline_trail(deadline=0.2)
    trail._lock.acquire()  # another thread's append hangs on storage
    try:
        with pytest.raises(TransientError, match=r"held the trail past the 0\.2 s deadline"):
            trail.append(sample_event(1))
    finally:
        trail._lock.release()


def test_appends_from_threads_each_wait_for_one_attempt_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trail = offline_trail()
    inside = threading.Event()
    release = threading.Event()
    records: list[int] = []

    def attempt(fields: Any, call: Any) -> dict[str, Any]:
        if not records:
            records.append(1)
            inside.set()
            release.wait(5)
        else:
            records.append(2)
        return dict(fields)

    monkeypatch.setattr(trail, "_try_append", attempt)
    first = threading.Thread(target=trail.append, args=(sample_event(1),))
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=trail.append, args=(sample_event(2),))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # serialized: one attempt at a time
    release.set()
    first.join(5)
    second.join(5)
    assert records == [1, 2]


# -- canonical JSON -------------------------------------------------------------------------


def test_canonical_json_refuses_nan_and_infinity() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        canonical({"duration_ms": float("nan")})
    with pytest.raises(ValueError, match="Out of range float"):
        offline_trail().append({**sample_event(1), "duration_ms": float("inf")})
    record = seal_record({**sample_event(1), "sequence": 1, "prev_sha256": GENESIS,
                          "recorded": "2026-01-01T00:00:00Z"})  # fmt: skip
    raw = encode_line(record)[:-1].replace(b'"attempt":1', b'"attempt":NaN')
    with pytest.raises(MalformedRecord, match="NaN is not JSON"):
        parse_line(raw)
    big = encode_line(record)[:-1].replace(b'"attempt":1', b'"attempt":1e400')
    report = verify_lines([Line(BLOB, 1, raw), Line(BLOB, 2, big)])
    assert report.broken is not None
    assert report.broken.kind == "malformed"
    report = verify_lines([Line(BLOB, 1, big)])  # reads as an infinity: cannot be canonical
    assert report.broken is not None
    assert report.broken.kind == "changed"


# -- --expect-head verdicts -----------------------------------------------------------------


def chain(count: int) -> list[Line]:
    lines, prev = [], GENESIS
    for i in range(count):
        record = seal_record({**sample_event(i), "sequence": i + 1, "prev_sha256": prev,
                              "recorded": "2026-01-01T00:00:00Z"})  # fmt: skip
        lines.append(Line(BLOB, i + 1, encode_line(record)[:-1]))
        prev = record["record_sha256"]
    return lines


def sha_of(line: Line) -> str:
    value: str = json.loads(line.raw)["record_sha256"]
    return value


def test_expect_head_verdicts() -> None:
    lines = chain(6)
    report = verify_lines(lines)
    check_expected_head(report, lines, None, (6, sha_of(lines[5])))
    assert report.ok
    assert report.expected_head is not None
    assert report.expected_head["found"] is True

    cut = lines[:4]
    report = verify_lines(cut)
    check_expected_head(report, cut, None, (6, sha_of(lines[5])))
    assert report.broken is not None
    assert (report.broken.kind, report.broken.line, report.broken.expected_sequence) == ("removed", 5, 5)  # fmt: skip

    report = verify_lines(lines)
    check_expected_head(report, lines, None, (3, "f" * 64))
    assert report.broken is not None
    assert (report.broken.kind, report.broken.line) == ("changed", 3)

    # a range starting after the pinned record cannot judge it; nor can one ending early
    anchor = json.loads(lines[2].raw)
    report = verify_lines(lines[3:], anchor)
    check_expected_head(report, lines[3:], anchor, (2, sha_of(lines[1])))
    assert report.ok
    assert report.expected_head is not None
    assert report.expected_head["found"] is None
    report = verify_lines(lines[:3])
    check_expected_head(report, lines[:3], None, (6, sha_of(lines[5])), bounded=True)
    assert report.ok
    assert report.expected_head is not None
    assert report.expected_head["found"] is None
    # the anchor itself can be the pinned record
    report = verify_lines(lines[3:], anchor)
    check_expected_head(report, lines[3:], anchor, (3, sha_of(lines[2])))
    assert report.expected_head is not None
    assert report.expected_head["found"] is True


def test_the_to_option_says_it_has_no_default_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        audit_main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: today" not in text
    assert "(default: no limit, the end of the trail)" in text
    assert "--expect-head SEQ:SHA256" in text


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
