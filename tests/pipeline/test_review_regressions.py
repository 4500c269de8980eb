"""Regressions found by the independent review of the throttle-aware pipeline (issue 12): each
test failed on the commit under review and passes on its parent and after the fixes."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from pipeline_support import Stack
from pipeline_support import deliver_soon as _deliver
from pipeline_support import key_versions as _versions

from byok_pipeline.core.errors import TransientError


@contextlib.contextmanager
def _rejected_writes_fail(store: Any, *, times: int | None) -> Iterator[None]:
    """Status writes of a ``rejected`` record fail (``times`` times, or always) as storage
    would with a 503."""
    real_save = store.save_status
    failures: list[bool] = []

    def flaky_save(path: str, doc: Any, lease: Any, **kw: Any) -> None:
        if doc.state == "rejected" and (times is None or len(failures) < times):
            failures.append(True)
            raise TransientError("writing status: service answered 503")
        real_save(path, doc, lease, **kw)

    store.save_status = flaky_save
    try:
        yield
    finally:
        store.save_status = real_save


def test_429_after_commit_makes_a_second_version(stack: Stack) -> None:
    """The emulator's own fault model: the HSM imports, then answers 429 (phase=after).
    After a 429 import_once PUTs again without looking: two versions of one package."""
    pkg = stack.package("ec-p256", "rv-429-after")
    stack.drop_package(pkg)
    stack.hsm.inject_fault(
        "429", method="PUT", path="/keys/rv-429-after", count=1, retry_after=0, phase="after"
    )
    try:
        outcome = _deliver(stack, pkg.name)
    finally:
        stack.hsm.clear_faults()
    assert outcome.state == "imported"
    versions = _versions(stack, "rv-429-after")
    tagged = [v for v in versions if (v.tags or {}).get("byok-package-sha256")]
    assert len(tagged) == 1, f"{len(tagged)} versions tagged with the same package"


def test_same_bytes_redrop_after_unknown_failure_imports_again(stack: Stack) -> None:
    """A record ends `failed` while its import may have landed (the look failed). The same
    bytes are uploaded again: the retired record is replaced by a fresh doc, whose import PUT
    skips the look-first (look_first=False): a second version tagged with the same digest."""
    stack.deps.settings = replace(stack.settings, max_attempts=1, retry_total=1)
    stack.deps.hsm.settings = stack.deps.settings
    pkg = stack.package("ec-p256", "rv-redrop")
    stack.drop_package(pkg)
    # the import commits but its answer is a 503; every look (version listing) fails
    stack.hsm.inject_fault("503", method="PUT", path="/keys/rv-redrop", count=1, phase="after")
    armed: list[bool] = []

    def at(stage: str) -> None:  # from the first PUT on, every look fails
        if stage == "before_put" and not armed:
            armed.append(True)
            stack.hsm.inject_fault("503", method="GET", path="/keys/rv-redrop/versions")

    stack.deps.fault = at
    try:
        outcome = stack.deliver(pkg.name)
    finally:
        stack.hsm.clear_faults()
        stack.deps.fault = lambda stage: None
    assert outcome.state == "failed", outcome
    assert outcome.doc is not None
    assert len(_versions(stack, "rv-redrop")) == 1  # the import landed
    # the custodian uploads the same file again (a new etag): it is retried
    stack.drop_package(pkg)
    outcome2 = _deliver(stack, pkg.name)
    assert outcome2.state == "imported"
    versions = _versions(stack, "rv-redrop")
    shas = [(v.tags or {}).get("byok-package-sha256") for v in versions]
    assert len(versions) == 1, f"{len(versions)} versions, tags {shas}"


def test_terminal_event_emitted_for_a_state_never_written(stack: Stack) -> None:
    """finish() now appends the outcome to the audit trail *before* writing the status. When
    that write fails the trail holds a terminal `rejected` that the record never reached, and
    the redelivery then imports the package: the trail says rejected AND imported."""
    held = sum(1 for _ in stack.hsm.key_client().list_properties_of_keys())
    stack.deps.settings = replace(stack.settings, hsm_max_keys=held)
    stack.deps.hsm.settings = stack.deps.settings
    pkg = stack.package("ec-p256", "rv-audit-order")
    stack.drop_package(pkg)
    store = stack.deps.store
    with _rejected_writes_fail(store, times=1), pytest.raises(TransientError):
        stack.deliver(pkg.name)
    durable = store.status_by_name(pkg.name)
    assert durable is not None
    assert durable.state == "received"  # the outcome's write failed: nothing after it ran
    assert "rejected" not in [e.get("state") for e in stack.audit.events]  # not yet audited
    # the limit is lifted (keys purged) and the package is delivered again
    stack.deps.settings = replace(stack.settings, hsm_max_keys=100000)
    stack.deps.hsm.settings = stack.deps.settings
    stack.deps.hsm._key_count = None  # forget the cached count, as 60 s would
    outcome = _deliver(stack, pkg.name)
    assert outcome.state == "imported"
    states = [e.get("state") for e in stack.audit.events]
    assert "rejected" not in states, "the trail records a refusal the status never held"
    assert "imported" in states


def test_audit_throttling_loses_the_throttled_flag() -> None:
    """A 429 from the trail (its HSM signature or its storage append) is counted as an attempt:
    emit_or_retry rebuilds the error without ``throttled``."""
    from byok_pipeline.processing.processor import emit_or_retry

    class Sink:
        def emit_many(self, events: Any) -> None:  # noqa: ARG002  # a sink that is throttled
            raise TransientError("429", retry_after=2.0, reason="throttled", throttled=True)

    with pytest.raises(TransientError) as caught:
        emit_or_retry(Sink(), {"event": "x"})  # type: ignore[arg-type]
    assert caught.value.throttled, "throttled flag dropped"


def test_rejected_event_before_the_status_holds_it(stack: Stack, kek_name: str) -> None:
    """Parent-comparable: the outcome's event is appended while the status write that records
    it fails (docs/audit.md: emitted after the status document recording it was written)."""
    pkg = stack.package("rsa-2048", kek_name)  # a KEK's name: refused existing_key_protected
    stack.drop_package(pkg)
    store = stack.deps.store
    with _rejected_writes_fail(store, times=None), pytest.raises(TransientError):
        stack.deliver(pkg.name)
    durable = store.load_status(f"packages/{hashlib.sha256(pkg.data).hexdigest()}.json")
    assert durable is not None
    states = [e.get("state") for e in stack.audit.events]
    assert "rejected" not in states  # its status write failed: no event names it


def test_azurite_honours_etag_on_lease(stack: Stack) -> None:
    from azure.core import MatchConditions
    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob import BlobLeaseClient

    blob = stack.service.get_blob_client(stack.settings.status_container, "x/etag-lease.json")
    first = blob.upload_blob(b"1", overwrite=True)
    blob.upload_blob(b"2", overwrite=True)
    lease = BlobLeaseClient(blob)
    with pytest.raises(HttpResponseError):
        lease.acquire(
            lease_duration=15, etag=first["etag"], match_condition=MatchConditions.IfNotModified
        )
