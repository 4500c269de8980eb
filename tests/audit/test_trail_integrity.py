"""The trail's writer in Azurite when things go wrong: a tail cut or rewritten under a running
writer (it refuses to build on it) and ``verify --expect-head``; an append whose response was
lost (written once); a clock far ahead and future-dated blobs; a far-behind writer's reread;
later sinks failing; tampering across two day blobs; and a real trail failure at the
``byok.imported`` append of a pipeline run."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from audit_support import (
    Audited,
    SpyContainer,
    day_clock,
    sample_event,
    tamper,
    trail_records,
    write_trail,
)
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.storage.blob import BlobServiceClient

from byok_pipeline.audit.records import (
    SEAL_EVENT,
    TrailError,
    encode_line,
    parse_blob_name,
    parse_line,
    seal_record,
)
from byok_pipeline.audit.trail import AuditTrail, TrailAuditSink
from byok_pipeline.audit.verify import TrailReader
from byok_pipeline.cli.audit import main as audit_main
from byok_pipeline.core.errors import InProgress, TransientError
from byok_pipeline.localdev.azurite import Azurite

pytestmark = pytest.mark.azurite


@pytest.fixture
def storage_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BYOK_STORAGE", azurite.connection_string)
    monkeypatch.delenv("BYOK_STORAGE__blobServiceUri", raising=False)


def verify(capsys: pytest.CaptureFixture[str], container: str, *extra: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
    code = audit_main(["verify", "--json", "--container", container, *extra])
    return code, json.loads(capsys.readouterr().out)


def only_blob(service: BlobServiceClient, container: str) -> str:
    (blob,) = TrailReader(service, container).blob_names()
    return blob


def pin(trail: AuditTrail) -> str:
    """``SEQ:SHA256`` of the head a writer saw (as an operator pins it from telemetry)."""
    assert trail.known_head is not None
    seq, sha = trail.known_head
    return f"{seq}:{sha}"


# -- finding: the tail cut or rewritten under a running writer -------------------------------


def test_a_writer_refuses_to_append_after_the_tail_was_cut(
    service: BlobServiceClient, container: str
) -> None:
    trail = write_trail(service, container, 10)
    tamper(service, container, only_blob(service, container), lambda ls: ls[:7])
    with pytest.raises(TrailError, match=r"ends at sequence 7 .* saw sequence 10") as info:
        trail.append(sample_event(10))
    assert info.value.reason == "audit_trail_broken"
    # 412 (the position moved back), 416 on the reread (nothing at our offset), rediscovery
    assert trail.stats.stale == 1
    assert trail.stats.discoveries == 2
    with pytest.raises(TrailError):  # and it keeps refusing: no silent restart of the chain
        trail.append(sample_event(11))
    assert [r["sequence"] for r in trail_records(TrailReader(service, container))] == list(range(1, 8))  # fmt: skip


def test_a_writer_refuses_a_tail_that_was_cut_and_written_again(
    service: BlobServiceClient, container: str
) -> None:
    trail = write_trail(service, container, 10)
    tamper(service, container, only_blob(service, container), lambda ls: ls[:7])
    other = write_trail(service, container, 6)  # a fresh writer cannot know: 8 ... 13
    assert other.known_head is not None
    assert other.known_head[0] == 13
    with pytest.raises(TrailError, match="does not continue the chain after sequence 10"):
        trail.append(sample_event(99))
    assert len(trail_records(TrailReader(service, container))) == 13


def test_a_record_rewritten_in_place_is_noticed_by_the_writer_and_by_expect_head(
    service: BlobServiceClient,
    container: str,
    storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trail = write_trail(service, container, 5)
    pinned = pin(trail)

    def forge_last(lines: list[bytes]) -> list[bytes]:  # same length, self-consistent, chained
        last = parse_line(lines[-1])
        forged = seal_record({**last, "blob_name": last["blob_name"].replace("payments", "PAYMENTS")})  # fmt: skip
        line = encode_line(forged)[:-1]
        assert len(line) == len(lines[-1])
        return [*lines[:-1], line]

    tamper(service, container, only_blob(service, container), forge_last)
    assert verify(capsys, container)[0] == 0  # the chain alone cannot tell
    code, report = verify(capsys, container, "--expect-head", pinned)
    assert code == 2
    assert (report["broken"]["kind"], report["broken"]["line"]) == ("changed", 5)
    assert report["expected_head"]["found"] is False
    # the writer's ETag condition refuses the append; it rediscovers and sees the change
    with pytest.raises(TrailError, match=r"sequence 5 of the audit trail .* is not the record"):
        trail.append(sample_event(6))
    assert trail.stats.stale == 1


def test_a_fresh_writer_refuses_a_head_record_that_does_not_match_its_own_hash(
    service: BlobServiceClient, container: str
) -> None:
    write_trail(service, container, 3)

    def flip(lines: list[bytes]) -> list[bytes]:  # the last record edited, its hash left alone
        return [*lines[:-1], lines[-1].replace(b'"attempt":1', b'"attempt":2', 1)]

    tamper(service, container, only_blob(service, container), flip)
    with pytest.raises(TrailError, match="does not match its own record_sha256") as info:
        AuditTrail(service, container).append(sample_event(3))
    assert info.value.reason == "audit_trail_broken"
    assert len(trail_records(TrailReader(service, container))) == 3


def test_verify_expect_head_detects_a_cut_tail(
    service: BlobServiceClient,
    container: str,
    storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trail = write_trail(service, container, 10)
    pinned = pin(trail)
    code, report = verify(capsys, container, "--expect-head", pinned)
    assert (code, report["expected_head"]["found"]) == (0, True)

    blob = only_blob(service, container)
    tamper(service, container, blob, lambda ls: ls[:7])
    assert verify(capsys, container)[0] == 0  # without a pin, a cut tail looks intact
    code, report = verify(capsys, container, "--expect-head", pinned)
    assert code == 2
    assert report["ok"] is False
    assert report["broken"]["kind"] == "removed"
    assert (report["broken"]["blob"], report["broken"]["line"]) == (blob, 8)
    assert report["broken"]["expected_sequence"] == 8
    assert "cut from its end" in report["broken"]["detail"]
    code = audit_main(["verify", "--container", container, "--expect-head", pinned])
    assert code == 2
    assert "BROKEN" in capsys.readouterr().out
    # an older pin still holds (the records up to it are there, unchanged)
    records = trail_records(TrailReader(service, container))
    assert verify(capsys, container, "--expect-head", f"5:{records[4]['record_sha256']}")[0] == 0
    # the same sequence with another hash: a different chain
    code, report = verify(capsys, container, "--expect-head", f"5:{'0' * 64}")
    assert (code, report["broken"]["kind"]) == (2, "changed")


def test_verify_expect_head_on_an_empty_trail_is_broken(
    container: str, storage_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(capsys, container)[0] == 0  # nothing to check
    code, report = verify(capsys, container, "--expect-head", f"3:{'ab' * 32}")
    assert code == 2
    assert report["records"] == 0
    assert report["broken"]["kind"] == "removed"
    assert "no records" in report["broken"]["detail"]


def test_verify_expect_head_needs_the_end_of_the_trail(
    service: BlobServiceClient,
    container: str,
    storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trail = write_trail(service, container, 3)
    code = audit_main(["verify", "--json", "--container", container, "--to", "2026-01-02",
                       "--expect-head", pin(trail)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    assert json.loads(out) == {"status": "failed", "reason": "usage",
                               "message": "--expect-head checks the end of the trail: drop --to"}  # fmt: skip
    assert "drop --to" in err
    with pytest.raises(SystemExit):
        audit_main(["verify", "--container", container, "--expect-head", "3:nothex"])
    capsys.readouterr()


# -- finding: an append whose write landed although the call failed -----------------------


def _commit_then_lose_the_response(blob: Any, data: bytes, kwargs: dict[str, Any]) -> Any:
    blob.append_block(data, **kwargs)
    raise ServiceResponseError("connection reset after the request was sent")


def _commit_then_retry_like_the_sdk(blob: Any, data: bytes, kwargs: dict[str, Any]) -> Any:
    blob.append_block(data, **kwargs)
    return blob.append_block(data, **kwargs)  # the SDK's retry of the same request: 412


@pytest.mark.parametrize(
    "fault", [_commit_then_lose_the_response, _commit_then_retry_like_the_sdk], ids=["lost", "412"]
)
def test_an_append_whose_write_landed_is_not_written_twice(
    fault: Callable[[Any, bytes, dict[str, Any]], Any],
    service: BlobServiceClient,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trail = write_trail(service, container, 2)
    spy = SpyContainer(trail._container, when=lambda data: b'"blob_name":"payments-2.byok"' in data,
                       fault=fault, faults=1)  # fmt: skip
    monkeypatch.setattr(trail, "_container", spy)
    record = trail.append(sample_event(2))
    trail.append(sample_event(3))
    records = trail_records(TrailReader(service, container))
    assert [r["blob_name"] for r in records] == [f"payments-{i}.byok" for i in range(4)]
    assert records[2] == record
    assert trail.stats.settled == 1
    report, _ = TrailReader(service, container).verify()
    assert report.ok, report.broken


def test_an_append_that_never_landed_is_retried_and_written_once(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = write_trail(service, container, 2)

    def refuse(blob: Any, data: bytes, kwargs: dict[str, Any]) -> Any:
        raise ServiceResponseError("connection reset before the write")

    spy = SpyContainer(trail._container, when=lambda _: True, fault=refuse, faults=2)
    monkeypatch.setattr(trail, "_container", spy)
    trail.append(sample_event(2))
    assert [r["sequence"] for r in trail_records(TrailReader(service, container))] == [1, 2, 3]
    assert trail.stats.settled == 0
    # each unknown outcome was looked up at its position before anything was sent again
    assert [m for m, _ in spy.calls].count("download_blob") >= 2


# -- finding: the writer's clock --------------------------------------------------------------


def test_a_writer_whose_clock_runs_ahead_stays_within_the_services_day(
    service: BlobServiceClient, container: str, storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    write_trail(service, container, 3)  # 2026-01-02
    ahead = AuditTrail(service, container, clock=lambda: datetime.now(UTC) + timedelta(days=400))
    record = ahead.append(sample_event(3))
    ahead.append(sample_event(4))
    service_today = datetime.now(UTC).date()
    names = TrailReader(service, container).blob_names()
    days = [parsed[0] for parsed in map(parse_blob_name, names) if parsed is not None]
    assert len(days) == 2
    assert all(day <= service_today + timedelta(days=1) for day in days), names
    assert record["recorded"] < f"{service_today + timedelta(days=1)}"
    assert ahead.stats.clock_ahead >= 1
    assert verify(capsys, container)[0] == 0


def test_a_stale_service_time_is_refreshed_before_it_overrules_the_clock(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = [1000.0]
    ahead = AuditTrail(service, container, clock=lambda: datetime.now(UTC) + timedelta(days=400),
                       monotonic=lambda: ticks[0])  # fmt: skip
    ahead.append(sample_event(0))  # the listing's Date is the service's time
    spy = SpyContainer(ahead._container)
    monkeypatch.setattr(ahead, "_container", spy)
    ticks[0] += 3600  # an hour on (or a frozen instance): the last Date seen is old
    record = ahead.append(sample_event(1))
    (head,) = TrailReader(service, container).blob_names()
    assert spy.calls[0] == ("get_blob_properties", head)  # asked the service before deciding
    assert record["recorded"] < f"{datetime.now(UTC).date() + timedelta(days=1)}"
    assert ahead.stats.clock_ahead >= 2


def test_a_trail_blob_dated_in_the_future_is_ignored(
    service: BlobServiceClient, container: str, storage_env: None,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    write_trail(service, container, 3)
    future = "trail/2099/01/01/0000.jsonl"
    service.get_blob_client(container, future).create_append_blob()  # planted, empty
    fresh = AuditTrail(service, container, clock=day_clock("2026-01-02"))
    with caplog.at_level(logging.WARNING, logger="byok_pipeline.audit.trail"):
        record = fresh.append(sample_event(3))
    assert fresh.stats.ignored == 1
    assert future in caplog.text
    assert record["sequence"] == 4
    (first,) = [n for n in TrailReader(service, container).blob_names() if n != future]
    assert [r["sequence"] for r in trail_records(TrailReader(service, container))] == [1, 2, 3, 4]
    assert first == "trail/2026/01/02/0000.jsonl"
    assert verify(capsys, container)[0] == 0


# -- rereads ----------------------------------------------------------------------------------


def test_a_writer_far_behind_reads_only_the_end_of_the_blob(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    behind = write_trail(service, container, 1)
    other = AuditTrail(service, container, clock=day_clock("2026-01-02"))
    for i in range(40):  # about 90 KiB: more than the 64 KiB a reread fetches first
        other.append({**sample_event(100 + i), "message": "m" * 1900})
    spy = SpyContainer(behind._container)
    monkeypatch.setattr(behind, "_container", spy)
    record = behind.append(sample_event(1))
    assert record["sequence"] == 42
    assert behind.stats.conflicts == 1
    assert behind.stats.discoveries == 1  # no rediscovery: the reread found the head
    assert [m for m, _ in spy.calls] == ["append_block", "download_blob", "get_blob_properties",
                                         "download_blob", "append_block"]  # fmt: skip
    report, _ = TrailReader(service, container).verify()
    assert report.ok, report.broken
    assert report.records == 42


# -- finding: sinks after the trail, and the time one append may take -------------------------


class _FullDisk:
    def emit(self, _event: Any) -> None:
        raise OSError(28, "No space left on device")


def test_a_later_sink_failing_does_not_fail_an_event_the_trail_holds(
    service: BlobServiceClient, container: str, caplog: pytest.LogCaptureFixture
) -> None:
    trail = AuditTrail(service, container)
    sink = TrailAuditSink(trail, then=_FullDisk())
    event = sample_event(1)
    with caplog.at_level(logging.WARNING, logger="byok_pipeline.audit.trail"):
        sink.emit(event)
    assert len(trail_records(TrailReader(service, container))) == 1
    (message,) = [r.getMessage() for r in caplog.records]
    assert "byok.received" in message
    assert "No space left on device" in message
    assert event["correlation_id"] not in message  # the name, never the record's body
    assert event["package_sha256"] not in message


# -- tampering across two day blobs ---------------------------------------------------------

DAY1, DAY2 = "trail/2026/01/02/0000.jsonl", "trail/2026/01/03/0000.jsonl"
Edit = Callable[[list[bytes], list[bytes]], tuple[list[bytes], list[bytes]]]


def _flip_in(raw: bytes) -> bytes:
    i = raw.index(b'"blob_name":"') + len(b'"blob_name":"')
    return raw[:i] + b"P" + raw[i + 1 :]


TWO_DAYS: dict[str, tuple[Edit, str, str, int]] = {
    # day 1: records 1-4 and the seal (5); day 2: records 6-9
    "a byte changed on day 2": (lambda a, b: (a, [_flip_in(b[0]), *b[1:]]), "changed", DAY2, 1),
    "the seal of day 1 removed": (lambda a, b: (a[:-1], b), "removed", DAY2, 1),
    "the last record of day 1 removed": (lambda a, b: ([*a[:3], a[4]], b), "removed", DAY1, 4),
    "records swapped across days": (lambda a, b: ([*a[:3], b[0], a[4]], [a[3], *b[1:]]), "reordered", DAY1, 4),
    "a record of day 1 replayed on day 2": (lambda a, b: (a, [*b, a[1]]), "inserted", DAY2, 5),
}  # fmt: skip


@pytest.mark.parametrize("case", TWO_DAYS)
def test_verify_detects_tampering_across_two_day_blobs(
    case: str, service: BlobServiceClient, container: str, storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    clock = day_clock("2026-01-02")
    trail = write_trail(service, container, 4, clock=clock)
    clock.advance(days=1)
    for i in range(4, 8):
        trail.append(sample_event(i))
    assert TrailReader(service, container).blob_names() == [DAY1, DAY2]
    assert verify(capsys, container)[0] == 0
    reader = TrailReader(service, container)
    day1 = [line.raw for line in reader.lines([DAY1])]
    day2 = [line.raw for line in reader.lines([DAY2])]
    assert parse_line(day1[-1])["event"] == SEAL_EVENT
    edit, kind, blob, line = TWO_DAYS[case]
    new1, new2 = edit(day1, day2)
    tamper(service, container, DAY1, lambda _: new1)
    tamper(service, container, DAY2, lambda _: new2)
    code, report = verify(capsys, container)
    assert code == 2
    broken = report["broken"]
    assert (broken["kind"], broken["blob"], broken["line"]) == (kind, blob, line), broken


@pytest.mark.parametrize(
    ("edit", "kind"),
    [(lambda raw: raw.replace(b'"event"', b'"event', 1), "malformed"),
     (lambda raw: raw.replace(b"byok.trail.sealed", b"byok.trail.SEALED"), "changed")],
    ids=["malformed", "changed"],
)  # fmt: skip
def test_a_bad_record_before_the_range_is_a_broken_link_not_a_failure(
    edit: Callable[[bytes], bytes], kind: str, service: BlobServiceClient, container: str,
    storage_env: None, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    clock = day_clock("2026-01-02")
    trail = write_trail(service, container, 2, clock=clock)
    clock.advance(days=1)
    trail.append(sample_event(2))
    tamper(service, container, DAY1, lambda ls: [*ls[:-1], edit(ls[-1])])  # the seal
    code, report = verify(capsys, container, "--from", "2026-01-03")
    assert code == 2
    assert (report["broken"]["kind"], report["broken"]["blob"], report["broken"]["line"]) == (
        kind, DAY1, 3,
    )  # fmt: skip


def test_cli_errors_are_json_with_json(
    service: BlobServiceClient, storage_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = audit_main(["verify", "--json", "--container", "no-such-audit-container"])
    out, err = capsys.readouterr()
    assert code == 1
    doc = json.loads(out)
    assert doc["status"] == "failed"
    assert set(doc) == {"status", "reason", "message"}
    assert "byok: failed" in err
    code = audit_main(["verify", "--json", "--from", "2026-02-01", "--to", "2026-01-01"])
    out, _ = capsys.readouterr()
    assert (code, json.loads(out)["message"]) == (1, "--from is after --to")


# -- a real trail failure at the imported append ---------------------------------------------


def _status(audited: Audited, blob_name: str) -> dict[str, Any]:
    (doc,) = [d for d in audited.stack.status_docs() if d["blob_name"] == blob_name]
    return doc


def test_a_trail_failure_at_the_imported_append_leaves_the_package_imported_and_redelivered(
    audited: Audited, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = audited.stack
    assert isinstance(audited.sink, TrailAuditSink)
    trail = audited.sink.trail
    monkeypatch.setattr(trail, "_sleep", lambda _: None)

    def unreachable(blob: Any, data: bytes, kwargs: dict[str, Any]) -> Any:
        raise ServiceRequestError("audit storage unreachable")

    spy = SpyContainer(trail._container, when=lambda data: b'"event":"byok.imported"' in data,
                       fault=unreachable, faults=10_000)  # fmt: skip
    monkeypatch.setattr(trail, "_container", spy)
    pkg = stack.package("ec-p256", "trail-down-at-import")
    stack.drop_package(pkg)
    with pytest.raises(TransientError):
        stack.deliver(pkg.name)
    doc = _status(audited, pkg.name)
    assert doc["state"] == "imported"
    assert "audit" in (doc["last_error"] or "").lower()
    assert stack.blobs(stack.settings.incoming_container) == [pkg.name]  # not completed
    events = [r["event"] for r in audited.trail_records()]
    assert events == ["byok.received", "byok.validated", "byok.importing"]

    spy.faults = 0  # the trail is back
    for _ in range(stack.settings.max_attempts):
        try:
            outcome = stack.deliver(pkg.name)
            break
        except (TransientError, InProgress):
            continue
    else:
        raise AssertionError("the redelivery did not finish")
    assert outcome.state == "imported"
    assert stack.blobs(stack.settings.incoming_container) == []
    events = [r["event"] for r in audited.trail_records()]
    assert events == ["byok.received", "byok.validated", "byok.importing", "byok.imported",
                      "byok.verified"]  # fmt: skip
    report, _ = audited.reader.verify()
    assert report.ok, report.broken
    versions = list(stack.hsm.key_client().list_properties_of_key_versions("trail-down-at-import"))
    assert len(versions) == 1
