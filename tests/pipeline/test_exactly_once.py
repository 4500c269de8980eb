"""Exactly once: concurrent duplicate deliveries, crashed workers, redrops of the same bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import Stack

from byok_pipeline.core.errors import InProgress, TransientError
from byok_pipeline.processing.processor import Outcome

pytestmark = pytest.mark.azurite


def deliver_like_the_platform(stack: Stack, name: str, *, timeout: float = 60.0) -> Outcome:
    """Redeliver on InProgress/TransientError, as Event Grid and the Functions host do."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return stack.deliver(name)
        except (InProgress, TransientError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _versions(stack: Stack, name: str) -> int:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return len(list(stack.hsm.key_client().list_properties_of_key_versions(name)))
    except ResourceNotFoundError:
        return 0


def _imported_statuses(stack: Stack) -> list[dict[str, Any]]:
    return [d for d in stack.status_docs() if d["state"] == "imported"]


def test_five_concurrent_deliveries_import_once(stack: Stack) -> None:
    pkg = stack.package("rsa-2048", "concurrent")
    stack.drop_package(pkg)
    with ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(lambda _: deliver_like_the_platform(stack, pkg.name), range(5)))
    states = sorted(o.state for o in outcomes)
    assert states.count("imported") >= 1
    assert set(states) <= {"imported", "gone"}
    assert _versions(stack, "concurrent") == 1
    assert len(_imported_statuses(stack)) == 1
    received = [e for e in stack.audit.events if e["event"] == "byok.received"]
    imported = [e for e in stack.audit.events if e["event"] == "byok.imported"]
    assert (len(received), len(imported)) == (1, 1)


def _crash(stack: Stack, stage: str, blob_name: str) -> int:
    settings = {
        k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(stack.settings).items()
    }
    cfg = {
        "settings": settings,
        "hsm_dir": str(stack.hsm.data_dir),
        "ca": str(stack.hsm.ca),
        "storage": stack.azurite.connection_string,
        "audit": str(stack.tmp / "crash-audit.jsonl"),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("crash_worker.py")), stage, blob_name],
        input=json.dumps(cfg),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["after_import", "before_import", "before_put"])
def test_worker_killed_mid_import_then_rerun(stack: Stack, stage: str) -> None:
    pkg = stack.package("ec-p256", f"crash-{stage.replace('_', '-')}")
    stack.drop_package(pkg)
    assert _crash(stack, stage, pkg.name) == 137
    status = stack.status_docs()
    assert [d["state"] for d in status] == ["importing"]  # died with the import in flight
    assert _versions(stack, pkg.name[:-5]) == (1 if stage == "after_import" else 0)
    # the killed worker's lease (15 s) must expire before another worker may take over
    with pytest.raises(InProgress):
        stack.deliver(pkg.name)
    if stage != "after_import":
        # it died with a PUT possibly on the wire: after the lease, wait out that PUT's timeout
        time.sleep(stack.settings.lease_seconds + 1)
        with pytest.raises(InProgress, match="in flight"):
            stack.deliver(pkg.name)
        real_clock = stack.deps.clock
        stack.deps.clock = lambda: real_clock() + timedelta(minutes=2)
    outcome = deliver_like_the_platform(stack, pkg.name)
    assert outcome.state == "imported"
    assert outcome.doc is not None
    assert outcome.doc.fingerprint_result == "match"
    assert outcome.doc.attempts == 2
    assert _versions(stack, pkg.name[:-5]) == 1
    assert len(_imported_statuses(stack)) == 1


def test_same_bytes_dropped_again_is_a_duplicate(stack: Stack) -> None:
    pkg = stack.package("oct-128", "again")
    stack.drop_package(pkg)
    first = stack.deliver(pkg.name)
    assert first.state == "imported"
    stack.drop_package(pkg)  # the same bytes, a new drop (new etag)
    second = stack.deliver(pkg.name)
    assert second.state == "duplicate"
    assert second.doc is not None
    assert first.doc is not None
    assert second.doc.duplicate_of == first.status_path
    assert second.doc.imported_kid == first.doc.imported_kid
    assert _versions(stack, "again") == 1
    assert stack.blobs(stack.settings.incoming_container) == []
    assert [e["event"] for e in stack.audit.events][-2:] == ["byok.received", "byok.duplicate"]
    # redelivering the duplicate's event changes nothing
    assert stack.deliver(pkg.name).state == "gone"


def test_redrop_after_a_refusal_is_processed_again(stack: Stack) -> None:
    from dataclasses import replace

    pkg = stack.package("oct-256", "retry-me")
    stack.deps.settings = replace(stack.settings, allowed_target_types=frozenset({"rsa-2048"}))
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).reason_code == "target_type_not_allowed"
    stack.deps.settings = stack.settings  # the operator relaxes the policy; the custodian redrops
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).state == "imported"
    assert _versions(stack, "retry-me") == 1
    latest = stack.deps.store.status_by_name(pkg.name)
    assert latest is not None
    assert latest.state == "imported"
    retired = stack.blobs(stack.settings.status_container)
    assert [b for b in retired if b.startswith("history/")]  # the refusal's record is kept


def test_redelivery_after_completion_is_a_no_op(stack: Stack) -> None:
    pkg = stack.package("ec-p384", "done")
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).state == "imported"
    n = len(stack.audit.events)
    assert stack.deliver(pkg.name).state == "gone"
    assert len(stack.audit.events) == n


@pytest.mark.slow
def test_redrop_while_the_first_record_is_stuck_takes_it_over(stack: Stack) -> None:
    pkg = stack.package("oct-192", "stuck")
    stack.drop_package(pkg)
    assert _crash(stack, "after_import", pkg.name) == 137  # imported, status says importing
    stack.service.get_blob_client(stack.settings.incoming_container, pkg.name).upload_blob(
        pkg.data, overwrite=True, metadata=pkg.options.to_metadata()
    )  # the custodian uploads the same file again: a new etag
    outcome = deliver_like_the_platform(stack, pkg.name)
    assert outcome.state == "imported"
    assert _versions(stack, "stuck") == 1
    assert [d["state"] for d in stack.status_docs()] == ["imported"]
    assert stack.blobs(stack.settings.incoming_container) == []


def test_imported_bytes_under_a_non_ascii_name_are_refused_by_name(stack: Stack) -> None:
    """Name before duplicate (docs/reference.md, check order): the drop is refused for its own name and
    recorded, with the name escaped in the quarantined copy's metadata."""
    pkg = stack.package("ec-p256k", "ascii-first")
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).state == "imported"
    stack.drop("ключ.byok", pkg.data, pkg.options.to_metadata())
    outcome = stack.deliver("ключ.byok")
    assert (outcome.state, outcome.reason_code) == ("rejected", "bad_key_name")
    assert len(stack.blobs(stack.settings.archive_container)) == 1  # only the import
    (refused,) = stack.blobs(stack.settings.quarantine_container)
    meta = (
        stack.service.get_blob_client(stack.settings.quarantine_container, refused)
        .get_blob_properties()
        .metadata
    )
    assert meta["original_name"].startswith("\\u043a")
    doc = stack.deps.store.status_by_name("ключ.byok")
    assert doc is not None
    assert doc.state == "rejected"
