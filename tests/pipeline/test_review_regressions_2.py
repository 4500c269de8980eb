"""Regressions found by the second independent review of the throttle-aware pipeline (issue 12):
each test failed on the reviewed commit (3652e01)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pipeline_support import Stack
from pipeline_support import deliver_soon as _deliver
from pipeline_support import key_versions as _versions

from byok_pipeline.audit.events import utc_now
from byok_pipeline.core.errors import InProgress, TransientError


def _later(stack: Stack, seconds: float) -> None:
    """The pipeline's clock moves on (past an import PUT's grace), the HSM's does not."""
    stack.deps.clock = lambda: utc_now() + timedelta(seconds=seconds)


def test_a_disabled_version_is_never_taken_over(stack: Stack) -> None:
    pkg = stack.package("ec-p256", "rv2-takeover")
    meta = pkg.options.to_metadata()
    meta["byok_fingerprint"] = "spki-sha256:" + "00" * 32  # the wrong fingerprint
    stack.drop(pkg.name, pkg.data, meta)
    assert _deliver(stack, pkg.name).state == "verification_failed"
    assert [v.enabled for v in _versions(stack, "rv2-takeover")] == [False]
    stack.drop(pkg.name, pkg.data, {})  # the same bytes again, without the fingerprint
    _later(stack, 120)
    second = _deliver(stack, pkg.name)
    assert (second.state, second.reason_code) == ("rejected", "earlier_version_disabled")
    assert [v.enabled for v in _versions(stack, "rv2-takeover")] == [False]


@pytest.mark.slow
def test_an_unknown_outcome_is_settled_before_failing_and_a_copy_waits(stack: Stack) -> None:
    stack.deps.settings = replace(stack.settings, max_attempts=1)
    stack.deps.hsm.settings = stack.deps.settings
    pkg = stack.package("ec-p256", "rv2-inflight")
    stack.drop_package(pkg)
    read = stack.deps.hsm.put_timeout_seconds() - min(10.0, stack.settings.lease_seconds / 4)
    stack.hsm.inject_fault("delay", method="PUT", path="/keys/rv2-inflight", count=1,
                           delay=read + 2.0)  # fmt: skip  # the PUT lands after the client gave up
    try:
        with pytest.raises(TransientError) as unknown:
            stack.deliver(pkg.name)
        assert unknown.value.outcome_unknown  # never `failed` while the PUT may land
        copy_name = "rv2-inflight-copy.byok"
        stack.drop(copy_name, b"\xef\xbb\xbf" + pkg.data, {})  # a reformatted copy, at once
        with pytest.raises(InProgress):
            stack.deliver(copy_name)  # waits for the first record's outcome
        time.sleep(3.0)  # the delayed PUT lands
    finally:
        stack.hsm.clear_faults()
    _later(stack, 120)
    settled = _deliver(stack, pkg.name)
    assert settled.state == "imported"  # the landed version, found and verified
    assert _deliver(stack, copy_name).state == "duplicate"
    assert [v.enabled for v in _versions(stack, "rv2-inflight")] == [True]


def test_concurrent_deliveries_of_a_duplicate_share_one_record(stack: Stack) -> None:
    pkg = stack.package("ec-p256", "rv2-dup")
    stack.drop_package(pkg)
    assert _deliver(stack, pkg.name).state == "imported"  # settled: its lease is kept
    other = "rv2-dup-copy.byok"
    stack.drop(other, pkg.data, {})
    store = stack.deps.store
    real_load = store.load_status
    barrier = threading.Barrier(2, timeout=10)

    def racing_load(path: str) -> Any:
        doc = real_load(path)
        if path.startswith("duplicates/") and doc is None:
            barrier.wait()  # both deliveries looked before either wrote
        return doc

    store.load_status = racing_load  # type: ignore[method-assign]
    results: list[Any] = []

    def one() -> None:
        try:
            results.append(stack.deliver(other))
        except Exception as exc:  # noqa: BLE001  # recorded and asserted on below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.load_status = real_load  # type: ignore[method-assign]
    assert [getattr(r, "state", r) for r in results] == ["duplicate", "duplicate"]
    cids = {e["correlation_id"] for e in stack.audit.events if e.get("blob_name") == other}
    assert len(cids) == 1, cids  # one drop, one record, one correlation id


def test_a_byok_import_then_the_same_drop_is_taken_over_not_imported_again(stack: Stack) -> None:
    import hashlib

    from byok_pipeline.processing.importer import import_validated, validate

    pkg = stack.package("ec-p256", "rv2-cli")
    hsm = stack.deps.hsm
    sha = hashlib.sha256(pkg.data).hexdigest()
    validated = validate(pkg.data, pkg.options, settings=stack.settings, hsm=hsm,
                         clock=lambda: datetime.now(UTC), request_id="cli")  # fmt: skip
    import_validated(hsm, "rv2-cli", data=pkg.data, package_sha256=sha, validated=validated,
                     options=pkg.options, request_id="cli")  # fmt: skip  # as `byok import`
    stack.drop_package(pkg)
    outcome = _deliver(stack, pkg.name)
    assert outcome.state == "imported"
    assert len(_versions(stack, "rv2-cli")) == 1


def test_a_copy_waits_for_an_unfinished_first_record_and_is_imported_when_it_fails(
    stack: Stack,
) -> None:
    stack.deps.settings = replace(stack.settings, max_attempts=2, retry_total=0)
    stack.deps.hsm.settings = stack.deps.settings
    pkg = stack.package("ec-p256", "rv2-lostcopy")
    copy_name = "rv2-lostcopy-b.byok"
    copy = b"\xef\xbb\xbf" + pkg.data
    stack.hsm.inject_fault("503", method="GET", path=f"/keys/{stack.kek_name}/*")
    stack.deps.hsm._kek_cache.clear()  # the KEK is read, and fails
    try:
        stack.drop_package(pkg)
        with pytest.raises(TransientError):
            stack.deliver(pkg.name)  # attempt 1 of A fails: A holds the identity
        stack.drop(copy_name, copy, {})
        with pytest.raises(InProgress):
            stack.deliver(copy_name)  # B waits for A's outcome instead of a duplicate
        assert stack.deliver(pkg.name).state == "failed"  # attempt 2 of A
    finally:
        stack.hsm.clear_faults()
    assert _deliver(stack, copy_name).state == "imported"  # B takes the identity over
    assert len(_versions(stack, "rv2-lostcopy-b")) == 1  # its own name: nothing was lost
