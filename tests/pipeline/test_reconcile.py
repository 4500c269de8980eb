"""The reconciler completes what exhausted retries left undone: audit records, lost events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import pytest
from pipeline_support import Stack

from byok_pipeline.audit.events import MemoryAuditSink
from byok_pipeline.core.errors import TransientError
from byok_pipeline.processing.reconcile import reconcile

pytestmark = pytest.mark.azurite


class FailingOn(MemoryAuditSink):
    """Refuses events named in ``failing`` (an audit store outage), accepts the rest."""

    def __init__(self, failing: set[str]) -> None:
        super().__init__()
        self.failing = failing

    def emit(self, event: Mapping[str, Any]) -> None:
        if event["event"] in self.failing:
            raise ConnectionError("audit store unavailable")
        super().emit(event)


def test_missing_audit_record_is_completed_after_the_platform_gave_up(stack: Stack) -> None:
    sink = FailingOn({"byok.imported"})
    stack.deps.audit = sink
    pkg = stack.package("oct-256", "audit-outage")
    stack.drop_package(pkg)
    for _ in range(3):  # the platform retries, then gives up
        with pytest.raises(TransientError, match="audit"):
            stack.deliver(pkg.name)
    (doc,) = stack.status_docs()
    assert doc["state"] == "imported"
    assert "audit append failed" in doc["last_error"]
    status = stack.deps.store.status_by_name(pkg.name)
    assert status is not None
    assert status.summary()["audit_pending"] is True
    assert stack.blobs(stack.settings.incoming_container) == [pkg.name]  # not disposed yet

    sink.failing = set()  # the audit store is back
    report = reconcile(stack.deps, now=stack.deps.clock() + timedelta(minutes=5))
    assert report.audits_completed == 1
    assert report.redelivered == {pkg.name: "imported"}  # and the package is finally moved
    events = [e["event"] for e in sink.events]
    assert events.count("byok.imported") == 1
    assert events[-2:] == ["byok.imported", "byok.verified"]
    assert stack.blobs(stack.settings.incoming_container) == []
    status = stack.deps.store.status_by_name(pkg.name)
    assert status is not None
    assert status.summary()["audit_pending"] is False


class LandsThenFails(MemoryAuditSink):
    """Keeps every batch, but answers the one holding an event named in ``lost`` with an error
    (the append landed; its answer was lost, or the worker died before its audited mark)."""

    def __init__(self, lost: set[str]) -> None:
        super().__init__()
        self.lost = lost

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        super().emit_many(events)
        if hit := self.lost & {str(e["event"]) for e in events}:
            self.lost -= hit
            raise ConnectionError("the append's answer was lost")


def test_events_emitted_again_after_a_lost_mark_are_identical_copies(stack: Stack) -> None:
    # at least once, never different: `byok audit export` skips a copy only if it is identical
    sink = LandsThenFails({"byok.imported"})
    stack.deps.audit = sink
    pkg = stack.package("oct-256", "audit-copy")
    stack.drop_package(pkg)
    with pytest.raises(TransientError, match="audit"):
        stack.deliver(pkg.name)
    later = stack.deps.clock() + timedelta(minutes=7)
    stack.deps.clock = lambda: later  # the redelivery comes minutes later
    assert stack.deliver(pkg.name).state == "imported"
    outcome = [e for e in sink.events if e["event"] in ("byok.imported", "byok.verified")]
    assert [e["event"] for e in outcome] == ["byok.imported", "byok.verified"] * 2
    assert outcome[2:] == outcome[:2]


def test_redrop_of_same_bytes_first_completes_the_first_records_audit(stack: Stack) -> None:
    sink = FailingOn({"byok.imported"})
    stack.deps.audit = sink
    pkg = stack.package("ec-p256", "audit-redrop")
    stack.drop_package(pkg)
    with pytest.raises(TransientError):
        stack.deliver(pkg.name)
    sink.failing = set()
    stack.service.get_blob_client(stack.settings.incoming_container, pkg.name).upload_blob(
        pkg.data, overwrite=True, metadata=pkg.options.to_metadata()
    )
    assert stack.deliver(pkg.name).state == "duplicate"
    assert [e["event"] for e in sink.events].count("byok.imported") == 1


def test_package_whose_event_was_lost_is_delivered_by_the_reconciler(stack: Stack) -> None:
    pkg = stack.package("ec-p384", "lost-event")
    stack.drop_package(pkg)  # no delivery at all: its Event Grid event was dead-lettered
    assert reconcile(stack.deps).redelivered == {}  # too fresh: its own event may be on the way
    report = reconcile(stack.deps, now=stack.deps.clock() + timedelta(minutes=5))
    assert report.redelivered == {pkg.name: "imported"}
    assert report.errors == 0
    assert stack.blobs(stack.settings.incoming_container) == []
