"""Full pipeline runs (Azurite + the emulator) audited through the production sinks: the event
schema, one event per state change, OpenTelemetry correlation with the HSM's request log, four
concurrent workers, an audit that keeps failing, and no secret in any event, span or log."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from audit_support import Audited, attrs, chunks, leaks, log_text, schema_errors, span_text
from azure.storage.blob import BlobServiceClient
from pipeline_support import Stack

from byok_pipeline.adapters.blobstore import BlobStore
from byok_pipeline.adapters.keyvault import HsmAdapter
from byok_pipeline.adapters.telemetry import SPAN_ATTRIBUTES
from byok_pipeline.audit.events import FanoutAuditSink
from byok_pipeline.audit.records import SEAL_EVENT, START_EVENT, TRAIL_FIELDS
from byok_pipeline.audit.verify import TrailReader, Trust
from byok_pipeline.cli.audit import main as audit_main
from byok_pipeline.core.errors import InProgress, TransientError
from byok_pipeline.processing.processor import Deps, Outcome, process_blob
from offline_packager.package_format import b64url_encode, parse_package

pytestmark = pytest.mark.azurite
ALL_EVENTS = {"byok.received", "byok.validated", "byok.importing", "byok.imported",
              "byok.verified", "byok.rejected", "byok.failed", "byok.verification_failed",
              "byok.duplicate"}  # fmt: skip


def _event_of(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TRAIL_FIELDS}


def _deliver_until_done(stack: Stack, name: str) -> Outcome:
    for _ in range(stack.settings.max_attempts):
        try:
            return stack.deliver(name)
        except (TransientError, InProgress):
            continue
    raise AssertionError(f"{name} did not finish in {stack.settings.max_attempts} deliveries")


def _status(stack: Stack, blob_name: str) -> dict[str, Any]:
    (doc,) = [d for d in stack.status_docs() if d["blob_name"] == blob_name]
    return doc


def test_every_event_matches_the_schema_and_each_state_change_has_exactly_one(
    audited: Audited,
) -> None:
    stack = audited.stack
    aes = stack.package("oct-256", "aes-ok")
    stack.drop(aes.name, aes.data, {**aes.options.to_metadata(), "byok_uploader": "alice@ceremony"})
    ec = stack.package("ec-p256", "ec-ok")
    stack.drop_package(ec)
    mismatch = stack.package("ec-p256", "ec-mismatch")
    meta = {**mismatch.options.to_metadata(), "byok_fingerprint": "spki-sha256:" + "0" * 64}
    stack.drop(mismatch.name, mismatch.data, meta)
    stack.drop("garbage.byok", b"{not a package", {})
    stack.drop("aes-again.byok", aes.data, {})
    down = stack.package("oct-128", "hsm-down")
    stack.drop_package(down)

    states = {name: stack.deliver(name).state
              for name in (aes.name, ec.name, mismatch.name, "garbage.byok", "aes-again.byok")}  # fmt: skip
    stack.hsm.inject_fault("503", method="GET", path="/keys/*", count=10_000)
    try:
        states[down.name] = _deliver_until_done(stack, down.name).state
    finally:
        stack.hsm.clear_faults()
    assert states == {aes.name: "imported", ec.name: "imported",
                      mismatch.name: "verification_failed", "garbage.byok": "rejected",
                      "aes-again.byok": "duplicate", down.name: "failed"}  # fmt: skip

    events = stack.audit.events
    assert {e["event"] for e in events} == ALL_EVENTS
    for event in events:
        assert schema_errors(event) == [], event
    records = audited.trail_records()
    for record in records:
        assert schema_errors(record) == [], record
    assert [_event_of(r) for r in records if r["event"] != SEAL_EVENT] == events

    docs = stack.status_docs()
    assert len(docs) == len(states)
    for doc in docs:
        mine = [e for e in events if e["correlation_id"] == doc["correlation_id"]]
        changes = [e for e in mine if e["event"] != "byok.verified"]
        assert [(e["event"], e["state"], e["time"]) for e in changes] == [
            (f"byok.{h['state']}", h["state"], h["time"]) for h in doc["history"]
        ], doc["blob_name"]
        verified = [e for e in mine if e["event"] == "byok.verified"]
        assert len(verified) == (doc["fingerprint_result"] == "match")
        for event in mine:  # the same identifiers as the status
            assert event["blob_name"] == doc["blob_name"]
            assert event.get("package_sha256") == doc["package_sha256"]
            assert event["etag"] == doc["etag"]
        final = changes[-1]
        for name in ("key_name", "target_type", "kek_kid", "imported_kid", "reason_code"):
            assert final.get(name) == doc[name], (doc["blob_name"], name)
    assert {e.get("uploader") for e in events if e["blob_name"] == aes.name} == {"alice@ceremony"}
    assert _status(stack, down.name)["attempts"] == stack.settings.max_attempts


def test_spans_and_log_records_carry_the_status_correlation_id_the_hsm_saw(
    audited: Audited,
) -> None:
    stack, otel = audited.stack, audited.otel
    pkg = stack.package("ec-p256", "traced")
    stack.drop_package(pkg)
    since = stack.hsm.last_request_seq()
    outcome = stack.deliver(pkg.name)
    assert outcome.state == "imported"
    status = _status(stack, pkg.name)
    cid = status["correlation_id"]

    (span,) = otel.package_spans()
    assert attrs(span)["correlation_id"] == cid
    assert attrs(span)["blob_name"] == pkg.name
    assert set(attrs(span)) <= SPAN_ATTRIBUTES  # what the workbook's span queries may read
    logs = otel.log_records()
    assert [r.log_record.body for r in logs] == [
        "byok.received", "byok.validated", "byok.importing", "byok.imported", "byok.verified",
    ]  # fmt: skip
    for record in logs:
        fields = attrs(record)
        assert fields["correlation_id"] == cid
        assert fields["event"] == record.log_record.body
        assert fields["package_sha256"] == status["package_sha256"]
        assert isinstance(fields["sequence"], int)  # the trail's anchor, for cross-checks
        assert record.log_record.trace_id == span.context.trace_id

    every = stack.hsm.requests_seen(since)
    signs = [r for r in every if r["path"].endswith("/sign")]  # the trail's batch signatures
    assert len(signs) == 2, sorted(
        {r["operation"] for r in every}
    )  # one per append: received..importing, imported+verified
    seen = [r for r in every if not r["path"].endswith("/sign")]
    assert seen, "the delivery made no Key Vault call"
    assert {r["client_request_id"] for r in seen} == {cid}
    imports = [r for r in seen if r["operation"] == "import_key" and r["status"] == 200]
    assert len(imports) == 1


def test_verify_passes_after_four_concurrent_workers_and_fifty_packages(
    audited: Audited, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Four Function instances, each with its own signed chain: no contention (no 412), at
    most 2 trail appends per package, and `byok audit verify --trust` finds every chain intact
    and every batch signed by the pinned pipeline key."""
    stack = audited.stack
    packages = [stack.package("oct-256" if i % 2 else "ec-p256", f"bulk-{i}") for i in range(50)]
    for pkg in packages:
        stack.drop_package(pkg)
    sinks = [audited.make_sink() for _ in range(4)]

    def worker_deps(k: int) -> Deps:  # one Function instance: its own clients and trail writer
        client = stack.hsm.key_client(retry_total=3, retry_backoff_factor=0.05)
        hsm = HsmAdapter(client, stack.settings)
        return Deps(settings=stack.settings, store=BlobStore(stack.service, stack.settings),
                    hsm=hsm, audit=FanoutAuditSink(sinks[k], stack.audit))  # fmt: skip

    workers = [worker_deps(k) for k in range(4)]
    shares = list(chunks([p.name for p in packages], 4))
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        outcomes = [o for share in pool.map(
            lambda k: [process_blob(name, workers[k]) for name in shares[k]], range(4)) for o in share]  # fmt: skip
    elapsed = time.monotonic() - started
    assert [o.state for o in outcomes] == ["imported"] * 50
    assert elapsed < 60, f"50 packages took {elapsed:.1f} s"
    stats = [s.trail.stats for s in sinks]  # type: ignore[attr-defined]  # production trail sinks
    assert sum(s.conflicts for s in stats) == 0
    assert sum(s.appends for s in stats) <= 2 * len(packages)

    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps({"signers": [
        {"kid": k.kid, "spki_sha256": k.spki_sha256, "role": "pipeline",
         "public_key_pem": k.public_key_pem}
        for k in audited.trust.signers.values()
    ]}))  # fmt: skip
    code = audit_main(["verify", "--json", "--container", stack.settings.audit_container,
                       "--people-container", stack.settings.audit_people_container,
                       "--trust", str(trust)])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert (code, report["ok"]) == (0, True), report.get("breaks")
    assert len(report["chains"]) == 4
    events = audited.trail_records()
    assert len(events) == len(stack.audit.events) == 250  # nothing lost, nothing extra
    for pkg in packages:  # each package's events in order, none interleaved within it
        sha = next(e["package_sha256"] for e in events if e["blob_name"] == pkg.name)
        assert [e["event"] for e in events if e.get("package_sha256") == sha] == [
            "byok.received", "byok.validated", "byok.importing", "byok.imported", "byok.verified",
        ]  # fmt: skip


class _FailingOn:
    """Fails every event named ``event`` while ``failing`` is set, like an audit sink whose
    storage keeps refusing; passes everything else on."""

    def __init__(self, inner: Any, event: str) -> None:
        self.inner = inner
        self.event = event
        self.failing = True

    def emit(self, event: Mapping[str, Any]) -> None:
        self.emit_many([event])

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        if self.failing and any(e["event"] == self.event for e in events):
            raise ConnectionError("audit storage unreachable")
        self.inner.emit_many(events)


def test_a_package_whose_audit_trail_is_unavailable_is_not_processed_silently(
    audited: Audited,
) -> None:
    stack = audited.stack
    settings = replace(stack.settings, audit_container=f"{stack.settings.audit_container}-late")
    stack.deps.audit = FanoutAuditSink(audited.make_sink(settings), stack.audit)  # no container
    pkg = stack.package("oct-256", "unaudited")
    stack.drop_package(pkg)
    for _ in range(2):  # every delivery fails, so the platform retries
        with pytest.raises(TransientError):
            stack.deliver(pkg.name)
        doc = _status(stack, pkg.name)
        assert doc["state"] != "imported"
        assert "audit" in (doc["last_error"] or "").lower()
        assert stack.blobs(stack.settings.incoming_container) == [pkg.name]
    assert stack.audit.events == []

    stack.service.create_container(settings.audit_container)  # the trail is back
    assert _deliver_until_done(stack, pkg.name).state == "imported"
    reader = TrailReader(stack.service, settings.audit_container)
    report, lines = reader.verify(trust=audited.trust)
    assert report.ok, report.breaks
    assert [line.record["event"] for line in lines] == [
        START_EVENT, "byok.received", "byok.validated", "byok.importing", "byok.imported",
        "byok.verified",
    ]  # fmt: skip


def test_a_package_whose_imported_event_cannot_be_recorded_is_retried_until_it_is(
    audited: Audited,
) -> None:
    stack = audited.stack
    flaky = _FailingOn(stack.deps.audit, "byok.imported")
    stack.deps.audit = flaky
    pkg = stack.package("ec-p256", "late-record")
    stack.drop_package(pkg)
    with pytest.raises(TransientError):
        stack.deliver(pkg.name)
    doc = _status(stack, pkg.name)
    assert "audit" in (doc["last_error"] or "").lower()
    assert stack.blobs(stack.settings.incoming_container) == [pkg.name]  # not completed
    assert "byok.imported" not in {r["event"] for r in audited.trail_records()}

    flaky.failing = False
    assert _deliver_until_done(stack, pkg.name).state == "imported"
    assert stack.blobs(stack.settings.incoming_container) == []
    trail = [r["event"] for r in audited.trail_records()]
    assert trail.count("byok.imported") == 1
    assert trail[-2:] == ["byok.imported", "byok.verified"]
    versions = list(stack.hsm.key_client().list_properties_of_key_versions("late-record"))
    assert len(versions) == 1


def test_no_event_span_or_log_record_holds_key_material_or_ciphertext(
    audited: Audited, service: BlobServiceClient
) -> None:
    stack, otel = audited.stack, audited.otel
    packages = [stack.package(t, f"secret-{t}") for t in ("oct-256", "ec-p256", "rsa-2048")]
    for pkg in packages:
        stack.drop_package(pkg)
        assert stack.deliver(pkg.name).state == "imported"
    refused = stack.package("oct-128", "refused")  # the HSM refuses it: its error is recorded
    ct = parse_package(refused.data).ciphertext
    doc = json.loads(refused.data)
    doc["ciphertext"] = b64url_encode(ct[:-1] + bytes([ct[-1] ^ 0x55]))
    stack.drop(refused.name, json.dumps(doc).encode(), {})
    assert stack.deliver(refused.name).state == "rejected"

    reader = TrailReader(service, stack.settings.audit_container)
    outputs = {
        "events": json.dumps(stack.audit.events).encode(),
        "trail": b"".join(reader.read(name) for name in reader.blob_names()),
        "spans": b"\n".join(span_text(s) for s in otel.finished_spans()),
        "logs": b"\n".join(log_text(r) for r in otel.log_records()),
    }
    assert len(otel.log_records()) == len(stack.audit.events)
    assert len(otel.package_spans()) == len(packages) + 1
    for pkg in [*packages, refused]:
        ciphertext = parse_package(pkg.data).ciphertext
        assert leaks(ciphertext, {"package": pkg.data}), "the scan must find what it looks for"
        assert leaks(pkg.target.plaintext.reveal(), outputs) == [], pkg.name
        assert leaks(ciphertext, outputs) == [], pkg.name
    assert leaks(ct[:-1] + bytes([ct[-1] ^ 0x55]), outputs) == []


def test_the_dashboard_reports_the_trail_verifiers_result(audited: Audited) -> None:
    """`byok serve`'s trail check: intact and pinned with the right trust, broken with a trust
    that pins another key, and an unreadable trail said, never raised."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from byok_pipeline.cli.audit_init import trust_entry
    from byok_pipeline.processing.dashboard import verify_trail

    stack = audited.stack
    pkg = stack.package("ec-p256", "dash-trail")
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).state == "imported"
    status = verify_trail(audited.reader, trust=audited.trust, fetch_key=None)
    assert (status.ok, status.chains, status.pinned, status.error) == (True, 1, True, None)
    assert status.records >= 6  # start, received ... verified
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    kid = "https://elsewhere.managedhsm.azure.net/keys/other/" + "0" * 32
    wrong = Trust.from_dict({"signers": [trust_entry(kid, other, "pipeline")]})
    broken = verify_trail(audited.reader, trust=wrong, fetch_key=None)
    assert (broken.ok, broken.error) == (False, None)
    assert broken.breaks >= 1
    gone = verify_trail(TrailReader(stack.service, "no-such-trail"), trust=None, fetch_key=None)
    assert (gone.ok, gone.error) == (False, "reading the trail: ResourceNotFoundError")
