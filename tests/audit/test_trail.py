"""The trail in Azurite: chaining across days, concurrent writers (threads and processes),
bounded retries, tampering detected by ``byok audit verify``, and ``byok audit export``."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from audit_support import (
    day_clock,
    sample_event,
    schema_errors,
    tamper,
    trail_records,
    write_trail,
)
from azure.storage.blob import BlobServiceClient

from byok_pipeline.audit.records import GENESIS, SEAL_EVENT, encode_line, parse_line, seal_record
from byok_pipeline.audit.trail import AuditTrail, TrailAuditSink
from byok_pipeline.audit.verify import TrailReader
from byok_pipeline.cli.audit import main as audit_main
from byok_pipeline.core.errors import TransientError
from byok_pipeline.localdev.azurite import Azurite

pytestmark = pytest.mark.azurite
HERE = Path(__file__).parent


@pytest.fixture
def storage_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BYOK_STORAGE", azurite.connection_string)
    monkeypatch.delenv("BYOK_STORAGE__blobServiceUri", raising=False)


def run_audit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = audit_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys: pytest.CaptureFixture[str], container: str, *extra: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
    code, out, _ = run_audit(capsys, "verify", "--json", "--container", container, *extra)
    return code, json.loads(out)


def test_records_chain_with_sequence_and_hash_and_match_the_schema(
    service: BlobServiceClient, container: str
) -> None:
    trail = write_trail(service, container, 5)
    records = trail_records(TrailReader(service, container))
    assert [r["sequence"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_sha256"] == GENESIS
    assert all(b["prev_sha256"] == a["record_sha256"] for a, b in itertools.pairwise(records))
    assert all(schema_errors(r) == [] for r in records)
    # the cheap path: one listing at first use, then one append per record, nothing reread
    assert trail.stats.discoveries == 1
    assert trail.stats.created == 1
    assert trail.stats.conflicts == 0
    assert trail.stats.appended == 5


def test_the_first_record_of_a_day_chains_to_the_previous_day_with_records(
    service: BlobServiceClient,
    container: str,
    storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = day_clock("2026-01-02")
    trail = write_trail(service, container, 3, clock=clock)
    late = AuditTrail(service, container, clock=day_clock("2026-01-02"))  # its clock lags
    late.append(sample_event(3))
    clock.advance(days=3)  # no records on the 3rd and 4th
    trail.append(sample_event(4))
    late.append(sample_event(5))  # still on the 2nd: it must follow the seal, not append there
    reader = TrailReader(service, container)
    assert reader.blob_names() == ["trail/2026/01/02/0000.jsonl", "trail/2026/01/05/0000.jsonl"]
    records = trail_records(reader)
    assert [r["event"] for r in records].count(SEAL_EVENT) == 1
    seal = next(r for r in records if r["event"] == SEAL_EVENT)
    first_of_fifth = records[records.index(seal) + 1]
    assert seal["next_blob"] == "trail/2026/01/05/0000.jsonl"
    assert first_of_fifth["prev_sha256"] == seal["record_sha256"]
    assert [r["sequence"] for r in records] == list(range(1, 8))
    assert verify_json(capsys, container)[0] == 0
    code, report = verify_json(capsys, container, "--from", "2026-01-05")
    assert (code, report["records"], report["first_sequence"]) == (0, 2, 6)
    code, report = verify_json(capsys, container, "--to", "2026-01-04")
    assert (code, report["records"]) == (0, 5)


def test_concurrent_writers_in_threads_never_interleave_or_lose_records(
    service: BlobServiceClient,
    container: str,
    storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    writers = [AuditTrail(service, container) for _ in range(4)]  # no shared lock or cache

    def work(k: int) -> None:
        for i in range(20):
            writers[k].append(sample_event(i, key=f"w{k}"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = trail_records(TrailReader(service, container))
    assert len(records) == 80
    for k in range(4):  # each writer's records, in its order
        mine = [r["blob_name"] for r in records if r["key_name"] == f"w{k}"]
        assert mine == [f"w{k}-{i}.byok" for i in range(20)]
    assert verify_json(capsys, container)[0] == 0
    assert sum(w.stats.conflicts for w in writers) > 0  # they did contend (412, reread, retry)


def test_concurrent_writer_processes_never_interleave_or_lose_records(
    service: BlobServiceClient, container: str, azurite: Azurite, storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    env = {**os.environ, "BYOK_STORAGE": azurite.connection_string,
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "pipeline"),
                                          str(HERE.parent.parent)])}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "trail_writer.py"), container, str(k), "25"], env=env
        )
        for k in range(3)
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    records = trail_records(TrailReader(service, container))
    assert len(records) == 75
    for k in range(3):
        mine = [r["blob_name"] for r in records if r["key_name"] == f"writer-{k}"]
        assert mine == [f"writer-{k}-{i}.byok" for i in range(25)]
    assert verify_json(capsys, container)[0] == 0


def test_an_append_that_keeps_failing_raises_transient_never_skips(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = TrailAuditSink(AuditTrail(service, "no-such-audit-container"))
    with pytest.raises(TransientError, match="audit trail"):
        missing.emit(sample_event(1))

    from byok_pipeline.audit import trail as audit_trail

    trail = AuditTrail(service, container, max_attempts=3, sleep=lambda _: None)
    attempts: list[int] = []

    def always_conflict(self: AuditTrail, *args: Any, **kwargs: Any) -> None:
        attempts.append(1)
        raise audit_trail._Conflict("another writer appended first")

    monkeypatch.setattr(AuditTrail, "_append_at", always_conflict)
    with pytest.raises(TransientError, match="after 3 attempts") as info:
        trail.append(sample_event(1))
    assert info.value.reason == "audit_trail"
    assert len(attempts) == 3


def _forged_append(lines: list[bytes]) -> list[bytes]:
    """A record appended by hand: well-formed, self-consistent, but not chained."""
    last = parse_line(lines[-1])
    forged = seal_record({**sample_event(99), "sequence": last["sequence"] + 1,
                          "prev_sha256": "ab" * 32, "recorded": last["recorded"]})  # fmt: skip
    return [*lines, encode_line(forged)[:-1]]


def _change_one_byte(lines: list[bytes]) -> list[bytes]:
    raw = lines[4]
    i = raw.index(b'"blob_name":"') + len(b'"blob_name":"')
    return [*lines[:4], raw[:i] + b"P" + raw[i + 1 :], *lines[5:]]  # 'p' -> 'P'


TAMPERING = {
    "one byte changed": (_change_one_byte, "changed", 5),
    "a record removed": (lambda ls: [*ls[:4], *ls[5:]], "removed", 5),
    "two records swapped": (lambda ls: [*ls[:4], ls[5], ls[4], *ls[6:]], "reordered", 5),
    "a record appended by hand": (_forged_append, "inserted", 11),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_verify_detects_tampering_in_the_blob(
    case: str, service: BlobServiceClient, container: str, storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    write_trail(service, container, 10)
    assert verify_json(capsys, container)[0] == 0
    edit, kind, line = TAMPERING[case]
    (blob,) = TrailReader(service, container).blob_names()
    tamper(service, container, blob, edit)
    code, report = verify_json(capsys, container)
    assert code == 2
    assert report["ok"] is False
    assert (report["broken"]["kind"], report["broken"]["blob"], report["broken"]["line"]) == (
        kind, blob, line,
    )  # fmt: skip
    code, out, _ = run_audit(capsys, "verify", "--container", container)
    assert code == 2
    assert f"BROKEN at {blob} line {line}" in out
    assert kind in out


def test_export_prints_the_history_of_a_key_or_a_package(
    service: BlobServiceClient,
    container: str,
    storage_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trail = AuditTrail(service, container)
    sha = "ab" * 32
    received = {**sample_event(1, key="payments", package=sha)}
    del received["key_name"]  # as the pipeline emits it: the key name is not known yet
    trail.append(received)
    imported = {**sample_event(1, key="payments", package=sha), "event": "byok.imported",
                "state": "imported", "imported_kid": "https://h/keys/payments/v1"}  # fmt: skip
    trail.append(imported)
    trail.append(imported)  # emitted again after a failed status save: at-least-once
    trail.append(sample_event(2, key="other"))
    code, out, _ = run_audit(capsys, "export", "--key", "payments", "--container", container)
    assert code == 0
    doc = json.loads(out)
    assert [r["event"] for r in doc["records"]] == ["byok.received", "byok.imported"]
    assert doc["copies_skipped"] == 1  # the same event emitted twice (at-least-once)
    assert doc["chain"]["ok"] is True
    code, out, _ = run_audit(capsys, "export", "--package", sha, "--format", "csv",
                             "--container", container)  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert [(r["sequence"], r["event"]) for r in rows] == [
        ("1", "byok.received"),
        ("2", "byok.imported"),
    ]
    assert rows[1]["imported_kid"] == "https://h/keys/payments/v1"


def test_a_writer_refuses_to_chain_onto_a_malformed_head(
    service: BlobServiceClient, container: str
) -> None:
    write_trail(service, container, 3)
    (blob,) = TrailReader(service, container).blob_names()
    tamper(service, container, blob, lambda ls: [*ls[:-1], b'{"sequence": "three"}'])
    with pytest.raises(TransientError, match="malformed") as info:
        AuditTrail(service, container).append(sample_event(4))
    assert info.value.reason == "audit_trail_broken"


def test_a_full_blob_continues_in_the_next_part_of_the_same_day(
    service: BlobServiceClient,
    container: str,
    storage_env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from byok_pipeline.audit import trail as audit_trail

    monkeypatch.setattr(audit_trail, "MAX_BLOCKS", 3)  # instead of 49,000 (limit: 50,000)
    write_trail(service, container, 7)  # 3 records and a seal, 3 and a seal, 1
    reader = TrailReader(service, container)
    assert reader.blob_names() == [f"trail/2026/01/02/{part:04d}.jsonl" for part in range(3)]
    sealed = [r["event"] == SEAL_EVENT for r in trail_records(reader)]
    assert sealed == [False, False, False, True, False, False, False, True, False]
    assert verify_json(capsys, container)[0] == 0
