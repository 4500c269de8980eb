"""The trail writer against Azurite: one signed chain per writer, one request per append, lost
responses never written twice, foreign bytes never built on, day and part roll-over, bounded
time; and the pipeline's HSM signer through the real SDK."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives.asymmetric import ec

from byok_pipeline.audit import trail as trail_module
from byok_pipeline.audit.records import (
    GENESIS,
    SEAL_EVENT,
    START_EVENT,
    parse_blob_name,
    parse_line,
    self_hash_ok,
    signed_bytes,
)
from byok_pipeline.audit.signers import FileSigner, verify_digest
from byok_pipeline.audit.trail import AuditTrail
from byok_pipeline.core.errors import TransientError
from managed_hsm_emulator.testing import EmulatorHandle

pytestmark = pytest.mark.azurite


def event(i: int) -> dict[str, Any]:
    return {
        "event": "byok.received",
        "time": "2026-01-02T03:04:05.000000Z",
        "pipeline_version": "0.1.0",
        "correlation_id": f"c{i}",
        "state": "received",
        "attempt": 1,
        "blob_name": f"k{i}.byok",
        "key_name": f"k{i}",
        "package_sha256": f"{i:064x}",
    }


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def signer() -> FileSigner:
    return FileSigner(ec.generate_private_key(ec.SECP256R1()))


def chains(service: BlobServiceClient, container: str) -> dict[str, list[dict[str, Any]]]:
    """Every record, per chain, in blob order (day, part), each checked for its own hash."""
    blobs = sorted(
        (parse_blob_name(b.name), b.name) for b in service.get_container_client(container).list_blobs()
    )  # fmt: skip
    out: dict[str, list[dict[str, Any]]] = {}
    for parsed, name in blobs:
        assert parsed is not None, name
        data = service.get_blob_client(container, name).download_blob().readall()
        for raw in data.splitlines():
            record = parse_line(raw)
            assert self_hash_ok(raw, record)
            out.setdefault(parsed.chain_id, []).append(record)
    return dict(sorted(out.items(), key=lambda kv: (kv[1][0]["recorded"], kv[0])))


def check_chain(records: list[dict[str, Any]], public_key: Any) -> None:
    """Links, sequence, batch coverage and signatures of one chain."""
    assert records[0]["event"] == START_EVENT
    assert records[0]["prev_sha256"] == GENESIS
    covered = 0
    for i, r in enumerate(records):
        assert r["sequence"] == i + 1
        if i:
            assert r["prev_sha256"] == records[i - 1]["record_sha256"]
        if "signature" in r:
            assert r["batch_start"] == covered + 1
            covered = r["sequence"]
            value = base64.urlsafe_b64decode(r["signature"]["value"] + "==")
            digest = hashlib.sha256(signed_bytes(r)).digest()
            assert verify_digest(public_key, digest, value)
    assert covered == len(records), "a record is covered by no signature"


def test_one_chain_one_request_per_batch_each_batch_signed(
    service: BlobServiceClient, container: str
) -> None:
    key = signer()
    trail = AuditTrail(service, container, signer=key, role="pipeline", writer="test")
    stored = [trail.append_many([event(2 * i), event(2 * i + 1)]) for i in range(5)]
    assert [len(s) for s in stored] == [2] * 5
    assert trail.stats.appends == 5
    assert trail.stats.requests == 5 + 1  # one create, then one Append Block per batch
    assert trail.stats.conflicts == 0
    (only,) = chains(service, container).values()
    check_chain(only, key.public_key())
    assert only[0]["writer_role"] == "pipeline"
    assert only[0]["signer_kid"] == key.kid
    assert only[0]["signer_spki_sha256"] == key.spki_sha256
    assert [r["sequence"] for r in only if "signature" in r] == [3, 5, 7, 9, 11]
    assert stored[-1][-1] == only[-1]  # the caller gets the records as stored


def test_concurrent_writers_each_write_their_own_chain_without_conflicts(
    service: BlobServiceClient, container: str, azurite: Any, tmp_path: Path
) -> None:
    """4 threads over one writer, and 3 writer processes: no 412, every event recorded once."""
    key = signer()
    shared = AuditTrail(service, container, signer=key, role="pipeline", writer="threads")

    def work(offset: int) -> None:
        for i in range(10):
            shared.append(event(offset + i))

    threads = [threading.Thread(target=work, args=(100 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    script = Path(__file__).with_name("trail_writer.py")
    procs = [
        subprocess.Popen(  # our own helper script, fixed arguments
            [sys.executable, str(script), azurite.connection_string, container, str(1000 * (p + 1))]
        )
        for p in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    found = chains(service, container)
    assert len(found) == 4
    assert shared.stats.conflicts == 0
    keys = [r["correlation_id"] for rs in found.values() for r in rs if r["event"] != START_EVENT]
    assert len(keys) == len(set(keys)) == 40 + 3 * 10


def _lose_response_after(commit: bool) -> Callable[..., Any]:
    """An append_block that (optionally) commits, then raises as a dropped connection does."""
    original = trail_module.AuditTrail._append_block
    fired: list[bool] = []

    def patched(self: AuditTrail, head: Any, data: bytes) -> None:
        if not fired:
            fired.append(True)
            if commit:
                original(self, head, data)
            raise trail_module._Lost("connection reset")
        original(self, head, data)

    return patched


@pytest.mark.parametrize("landed", [True, False])
def test_a_lost_response_is_looked_up_never_written_twice(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    key = signer()
    trail = AuditTrail(service, container, signer=key, role="pipeline", writer="t", backoff=0)
    trail.append(event(0))
    monkeypatch.setattr(AuditTrail, "_append_block", _lose_response_after(landed))
    trail.append(event(1))
    (only,) = chains(service, container).values()
    check_chain(only, key.public_key())
    assert [r["correlation_id"] for r in only[1:]] == ["c0", "c1"]
    assert trail.stats.settled == (1 if landed else 0)


def test_foreign_bytes_in_the_chain_start_a_new_chain(
    service: BlobServiceClient, container: str
) -> None:
    """Someone appends to this writer's blob: the writer never chains onto it; it goes on in a
    new chain (the verifier reports the foreign line)."""
    key = signer()
    trail = AuditTrail(service, container, signer=key, role="pipeline", writer="t", backoff=0)
    trail.append(event(0))
    first = trail.chain_id
    (blob,) = [b.name for b in service.get_container_client(container).list_blobs()]
    service.get_blob_client(container, blob).append_block(b'{"forged": true}\n')
    trail.append(event(1))
    assert trail.chain_id != first
    assert trail.stats.foreign == 1
    found = chains_lenient(service, container)
    assert found[str(first)][-1] == b'{"forged": true}'
    assert trail.chain_id is not None
    new = [parse_line(raw) for raw in found[str(trail.chain_id)]]
    check_chain(new, key.public_key())
    assert new[-1]["correlation_id"] == "c1"


def chains_lenient(service: BlobServiceClient, container: str) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for b in service.get_container_client(container).list_blobs():
        parsed = parse_blob_name(b.name)
        assert parsed is not None
        data = service.get_blob_client(container, b.name).download_blob().readall()
        out.setdefault(parsed.chain_id, []).extend(data.splitlines())
    return out


def test_a_new_day_and_a_full_blob_continue_after_a_signed_seal(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(datetime(2026, 1, 2, 23, 59, tzinfo=UTC))
    key = signer()
    monkeypatch.setattr(trail_module, "MAX_BLOCKS", 3)
    trail = AuditTrail(service, container, signer=key, role="pipeline", writer="t", clock=clock)
    trail.append(event(0))
    clock.now += timedelta(minutes=2)  # the next UTC day
    for i in range(1, 6):
        trail.append(event(i))
    names = sorted(b.name for b in service.get_container_client(container).list_blobs())
    days = {parse_blob_name(n).day.isoformat() for n in names}  # type: ignore[union-attr]  # all trail blobs
    assert days == {"2026-01-02", "2026-01-03"}
    assert len(names) >= 3  # the day's blob filled up and went on in part 0001
    (only,) = chains(service, container).values()
    check_chain(only, key.public_key())
    seals = [r for r in only if r["event"] == SEAL_EVENT]
    assert len(seals) == len(names) - 1
    assert all(s["next_blob"] in names for s in seals)
    assert trail.stats.seals == len(seals)


def test_an_append_that_keeps_failing_raises_within_its_deadline(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    times = iter(x * 0.5 for x in range(1000))
    trail = AuditTrail(
        service, container, signer=signer(), role="pipeline", writer="t", deadline=3.0,
        monotonic=lambda: next(times), sleep=lambda _: None,
    )  # fmt: skip

    def broken(self: AuditTrail, head: Any, data: bytes) -> None:
        raise ServiceResponseError("connection reset")

    monkeypatch.setattr(AuditTrail, "_append_block", broken)
    with pytest.raises(TransientError) as err:
        trail.append(event(0))
    assert err.value.reason == "audit_trail"


def test_a_refused_append_fails_at_once(service: BlobServiceClient) -> None:
    trail = AuditTrail(service, "nocontainer", signer=signer(), role="pipeline", writer="t")
    with pytest.raises(TransientError, match="refused"):
        trail.append(event(0))


def test_the_pipeline_signs_inside_the_hsm(
    service: BlobServiceClient, container: str, hsm: EmulatorHandle
) -> None:
    """The HSM signer through the real SDK (the emulator's sign operation): batches verify with
    the key's public half read from the HSM."""
    from byok_pipeline.processing.wiring import hsm_signer

    key = hsm.key_client().create_ec_key(
        "audit-signer-test",
        curve="P-256",
        key_operations=["sign", "verify"],
        hardware_protected=True,
    )
    hsm_key = hsm_signer(str(key.id), hsm.credential(), ca_bundle=str(hsm.ca))
    trail = AuditTrail(service, container, signer=hsm_key, role="pipeline", writer="t")
    trail.append_many([event(0), event(1)])
    (only,) = chains(service, container).values()
    check_chain(only, hsm_key.public_key())
    assert only[-1]["signature"]["kid"] == str(key.id)
    assert "audit-signer-test" in repr(hsm_key)


def test_a_first_append_that_never_lands_leaves_no_headless_chain(
    service: BlobServiceClient, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain's first append fails (its blob already created), the next comes on a new UTC
    day: the writer starts a chain with its start record; it never seals a chain that has none."""
    clock = Clock(datetime(2026, 1, 2, 23, 59, tzinfo=UTC))
    key = signer()
    times = iter(x * 0.5 for x in range(10_000))
    trail = AuditTrail(
        service, container, signer=key, role="pipeline", writer="t", clock=clock,
        monotonic=lambda: next(times), sleep=lambda _: None, deadline=2.0,
    )  # fmt: skip
    original = AuditTrail._append_block

    def lost(self: AuditTrail, head: Any, data: bytes) -> None:
        if head.offset == 0 and head.blocks == 0:
            self._create(self._container.get_blob_client(head.blob))
        raise trail_module._Lost("connection reset")

    monkeypatch.setattr(AuditTrail, "_append_block", lost)
    with pytest.raises(TransientError) as err:
        trail.append(event(0))
    assert err.value.outcome_unknown
    monkeypatch.setattr(AuditTrail, "_append_block", original)
    clock.now += timedelta(minutes=2)
    trail.append(event(1))
    found = chains(service, container)
    (only,) = [records for records in found.values() if records]
    check_chain(only, key.public_key())
    assert [r["event"] for r in only] == [START_EVENT, "byok.received"]
    assert not [r for r in only if r["event"] == SEAL_EVENT]
