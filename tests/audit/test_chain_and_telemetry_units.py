"""Without services: the record format, the chain checker's verdicts, telemetry set-up."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_support import neutral_distro_env, resolved, sample_event, sampler_built, schema_errors

from byok_pipeline.adapters import telemetry
from byok_pipeline.audit.events import cli_event
from byok_pipeline.audit.records import GENESIS, SEAL_EVENT, encode_line, seal_record, self_hash_ok
from byok_pipeline.audit.verify import Line, verify_lines

BLOB_A = "trail/2026/01/01/0000.jsonl"
BLOB_B = "trail/2026/01/02/0000.jsonl"


def chain(count: int, *, seal_after: int | None = None) -> list[Line]:
    """``count`` records as a writer makes them; with ``seal_after``, blob A is sealed after
    that many records and the rest go to blob B."""
    lines: list[Line] = []
    prev, seq, blob, number = GENESIS, 0, BLOB_A, 0

    def add(fields: dict[str, Any]) -> None:
        nonlocal prev, seq, number
        seq += 1
        number += 1
        record = seal_record(
            {**fields, "sequence": seq, "prev_sha256": prev, "recorded": "2026-01-01T00:00:00Z"}
        )
        lines.append(Line(blob, number, encode_line(record)[:-1]))
        prev = record["record_sha256"]

    for i in range(count):
        add(sample_event(i))
        if seal_after is not None and i + 1 == seal_after:
            add({**sample_event(i), "event": SEAL_EVENT, "next_blob": BLOB_B})
            blob, number = BLOB_B, 0
    return lines


def renumber(lines: list[Line]) -> list[Line]:
    out, counters = [], dict.fromkeys({line.blob for line in lines}, 0)
    for line in lines:
        counters[line.blob] += 1
        out.append(Line(line.blob, counters[line.blob], line.raw))
    return out


def test_an_intact_chain_verifies_and_reports_its_head() -> None:
    lines = chain(8, seal_after=4)
    report = verify_lines(lines)
    assert report.ok, report.broken
    assert report.records == 9
    assert report.head is not None
    assert report.head["sequence"] == 9
    assert report.head["blob"] == BLOB_B


def test_records_are_canonical_and_self_hashed() -> None:
    raw = chain(1)[0].raw
    record = json.loads(raw)
    assert self_hash_ok(raw, record)
    assert raw == json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    # the same JSON value written differently is a change too (no re-canonicalising)
    spaced = raw.replace(b'","', b'", "', 1)
    assert json.loads(spaced) == record
    assert not self_hash_ok(spaced, record)


def _flip(raw: bytes, after: bytes) -> bytes:
    i = raw.index(after) + len(after)
    return raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]


Edit = Callable[[list[Line]], list[Line]]
CASES: dict[str, tuple[Edit, str, int]] = {
    # name: (edit, expected kind, expected line of the break in the blob)
    "byte changed": (
        lambda ls: [*ls[:4], Line(ls[4].blob, 5, _flip(ls[4].raw, b'"key_name":"')), *ls[5:]],
        "changed",
        5,
    ),
    "byte changed in the last record": (
        lambda ls: [*ls[:-1], Line(ls[-1].blob, ls[-1].number, _flip(ls[-1].raw, b'"attempt":'))],
        "changed",
        8,
    ),
    "record removed": (lambda ls: renumber([*ls[:4], *ls[5:]]), "removed", 5),
    "two records swapped": (lambda ls: renumber([*ls[:4], ls[5], ls[4], *ls[6:]]), "reordered", 5),
    "record replayed": (lambda ls: renumber([*ls, ls[2]]), "inserted", 9),
    "line not JSON": (lambda ls: renumber([*ls[:3], Line(BLOB_A, 0, b"{oops"), *ls[3:]]), "malformed", 4),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_each_kind_of_tampering_is_named_at_the_first_broken_link(case: str) -> None:
    edit, kind, line = CASES[case]
    report = verify_lines(edit(chain(8)))
    assert report.broken is not None, case
    assert (report.broken.kind, report.broken.line) == (kind, line), report.broken


def test_a_forged_record_with_a_consistent_hash_but_no_chain_is_inserted() -> None:
    lines = chain(6)
    forged = seal_record({**sample_event(99), "sequence": 7, "prev_sha256": "ab" * 32,
                          "recorded": "2026-01-01T00:00:00Z"})  # fmt: skip
    report = verify_lines([*lines, Line(BLOB_A, 7, encode_line(forged)[:-1])])
    assert report.broken is not None
    assert (report.broken.kind, report.broken.line, report.broken.sequence) == ("inserted", 7, 7)


def test_removing_a_days_seal_breaks_the_link_to_the_next_day() -> None:
    lines = chain(6, seal_after=3)
    report = verify_lines([line for line in lines if SEAL_EVENT.encode() not in line.raw])
    assert report.broken is not None
    assert (report.broken.kind, report.broken.blob) == ("removed", BLOB_B)


def test_a_record_after_a_seal_is_inserted() -> None:
    lines = chain(6, seal_after=3)
    moved = [Line(BLOB_A, 5, lines[4].raw) if i == 4 else line for i, line in enumerate(lines)]
    report = verify_lines(moved)
    assert report.broken is not None
    assert report.broken.kind == "inserted"


def test_a_range_starts_from_the_record_before_it() -> None:
    lines = chain(6, seal_after=3)
    anchor = json.loads(lines[3].raw)  # the seal of blob A
    assert verify_lines(lines[4:], anchor).ok
    report = verify_lines(lines[4:])  # without the anchor, sequence 5 cannot start the trail
    assert report.broken is not None
    assert report.broken.kind == "removed"


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
    from byok_pipeline.adapters.telemetry import TelemetryAuditSink
    from byok_pipeline.audit.events import FanoutAuditSink, JsonLinesAuditSink
    from byok_pipeline.audit.trail import TrailAuditSink
    from byok_pipeline.core.errors import ConfigError
    from byok_pipeline.core.settings import Settings
    from byok_pipeline.processing.wiring import audit_sink

    monkeypatch.delenv("BYOK_STORAGE__blobServiceUri", raising=False)
    monkeypatch.setenv("BYOK_STORAGE", "UseDevelopmentStorage=true")
    log = str(tmp_path / "audit.jsonl")
    settings = Settings(
        hsm_url="https://h.managedhsm.azure.net", audit_container="aud", audit_log=log
    )
    sink = audit_sink(settings)
    assert isinstance(sink, TrailAuditSink)
    assert sink.trail.container_name == "aud"
    assert isinstance(sink.then, FanoutAuditSink)
    assert [type(s) for s in sink.then.sinks] == [TelemetryAuditSink, JsonLinesAuditSink]

    monkeypatch.delenv("BYOK_STORAGE")
    local = audit_sink(settings)  # no storage: the local file is the record
    assert isinstance(local, FanoutAuditSink)
    assert [type(s) for s in local.sinks] == [TelemetryAuditSink, JsonLinesAuditSink]
    with pytest.raises(ConfigError, match="BYOK_AUDIT_LOG"):
        audit_sink(Settings(hsm_url="https://h.managedhsm.azure.net"))
