"""Throughput at Managed HSM's limits: throttling is never an attempt and never a failure,
Retry-After is honoured, the pacer learns from 429s, and the HSM's key and version limits are
refused before the import PUT with their own reason codes.

Through the real SDK against the emulator: with fault rules (429 on chosen requests) and with
its service-limits mode (``--limits managed-hsm``), where the HSM itself throttles.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from pipeline_support import Stack
from testsupport import FakeClock

from byok_pipeline.core.errors import InProgress, TransientError
from byok_pipeline.core.pacing import ImportPacer
from byok_pipeline.localdev.azurite import Azurite
from byok_pipeline.processing.processor import Outcome
from managed_hsm_emulator.testing import EmulatorHandle, running_emulator

_names = itertools.count()


def _name(stem: str) -> str:
    return f"{stem}-{next(_names)}-{int(time.time() * 1000) % 100000}"


def _deliver_until_done(stack: Stack, name: str, *, timeout: float = 60.0) -> tuple[Outcome, int]:
    """Redeliver as the platform does, sleeping what the pipeline asked; (outcome, handbacks)."""
    deadline = time.monotonic() + timeout
    handbacks = 0
    while True:
        try:
            return stack.deliver(name), handbacks
        except (InProgress, TransientError) as exc:
            handbacks += 1
            if time.monotonic() > deadline:
                raise
            wait = getattr(exc, "retry_after", None)
            time.sleep(min(2.0, wait if wait is not None else 0.2))


def _puts(stack: Stack, key_name: str, since: int) -> list[dict[str, Any]]:
    return [
        r
        for r in stack.hsm.requests_seen(since)
        if r["method"] == "PUT" and r["path"].rstrip("/") == f"/keys/{key_name}"
    ]


# -- the pacer (pure) ------------------------------------------------------------------------


def test_pacer_spaces_requests_at_its_rate() -> None:
    clock = FakeClock()
    pacer = ImportPacer(4.0, clock=clock)
    assert pacer.reserve() == 0  # the one banked token
    assert pacer.reserve() == pytest.approx(0.25)
    assert pacer.reserve() == pytest.approx(0.5)
    clock.now += 10
    assert pacer.reserve() == 0  # refilled, but never more than the burst
    assert pacer.reserve() == pytest.approx(0.25)


def test_pacer_slows_on_429_and_creeps_back() -> None:
    clock = FakeClock()
    pacer = ImportPacer(4.0, clock=clock)
    assert pacer.reserve() == 0
    pacer.throttled()
    assert pacer.state().rate == pytest.approx(3.8)
    assert pacer.reserve() == pytest.approx(1 / 3.8)  # the bucket was emptied, then slower
    for _ in range(200):
        pacer.throttled()
    assert pacer.state().rate == pytest.approx(0.2)  # the floor: 5% of the ceiling
    for _ in range(100):
        pacer.accepted()
    assert pacer.state().rate == pytest.approx(4.0)  # never above the ceiling
    assert pacer.state().throttled == 201


def test_pacer_cancel_gives_the_token_back() -> None:
    clock = FakeClock()
    pacer = ImportPacer(1.0, clock=clock)
    assert pacer.reserve() == 0
    assert pacer.reserve() == pytest.approx(1.0)
    pacer.cancel()
    assert pacer.reserve() == pytest.approx(1.0)


# -- 429 from the HSM (fault rules) ---------------------------------------------------------


def _throttled_package(
    stack: Stack, stem: str, type_name: str, *, rate: float, **rule: Any
) -> tuple[str, Any, int]:
    """A dropped package whose import PUTs the emulator answers 429 (``rule``), a pacer of its
    own for the stack; (key name, package, request-log position before the drop)."""
    stack.deps.hsm.pacer = ImportPacer(rate)
    name = _name(stem)
    pkg = stack.package(type_name, name)
    stack.drop_package(pkg)
    since = stack.hsm.last_request_seq()
    stack.hsm.inject_fault("429", method="PUT", path=f"/keys/{name}", **rule)
    return name, pkg, since


def test_429_on_import_is_never_an_attempt(stack: Stack) -> None:
    """One attempt allowed, the HSM throttles the PUT five times, the worker may not wait:
    every throttled delivery is handed back uncounted, and the package ends imported."""
    from dataclasses import replace

    stack.deps.settings = replace(stack.settings, max_attempts=1, throttle_wait_seconds=0.0)
    stack.deps.hsm.settings = stack.deps.settings
    name, pkg, since = _throttled_package(
        stack, "throttled", "ec-p256", rate=50.0, count=5, retry_after=1
    )
    try:
        seen_waiting = False
        deadline = time.monotonic() + 60
        while True:
            try:
                outcome = stack.deliver(pkg.name)
                break
            except TransientError as exc:
                assert exc.throttled, exc.message  # noqa: PT017  # each hand-back is inspected
                doc = stack.deps.store.status_by_name(pkg.name)
                assert doc is not None
                assert doc.attempts == 0  # a throttled try is not an attempt
                assert doc.throttled_until is not None
                assert doc.state == "importing"
                seen_waiting = True
                assert time.monotonic() < deadline
                time.sleep(exc.retry_after or 0.2)
    finally:
        stack.hsm.clear_faults()
    assert seen_waiting
    assert (outcome.state, outcome.reason_code) == ("imported", None)
    assert outcome.doc is not None
    assert (outcome.doc.attempts, outcome.doc.throttled_until) == (1, None)
    puts = _puts(stack, name, since)
    assert [p["status"] for p in puts] == [429] * 5 + [200]
    assert len(list(stack.hsm.key_client().list_properties_of_key_versions(name))) == 1


def test_retry_after_is_honoured_before_the_next_put(stack: Stack) -> None:
    name, pkg, since = _throttled_package(
        stack, "retry-after", "oct-256", rate=50.0, count=2, retry_after=1
    )
    try:
        outcome = stack.deliver(pkg.name)  # waits within BYOK_THROTTLE_WAIT_SECONDS
    finally:
        stack.hsm.clear_faults()
    assert outcome.state == "imported"
    assert outcome.doc is not None
    assert outcome.doc.attempts == 1
    puts = _puts(stack, name, since)
    assert [p["status"] for p in puts] == [429, 429, 200]
    times = [datetime.fromisoformat(p["time"]) for p in puts]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.99 for gap in gaps), gaps  # no PUT before the Retry-After had passed
    assert stack.deps.hsm.stats["throttled"] >= 2


def test_a_throttled_put_waits_the_service_not_the_pacer(stack: Stack) -> None:
    """Each retry of a throttled PUT goes when the HSM said (Retry-After 1 s), not behind this
    worker's pacer, in which other deliveries took four slots (2 s at 2/s) during each PUT: a
    retry queued behind other partitions' first tries would idle its own partition. The
    pacer learns from the 429 of the PUT it timed, not from the retry's, which went when the
    HSM said."""
    name, pkg, since = _throttled_package(
        stack, "not-the-pacer", "ec-p256", rate=2.0, count=2, retry_after=1
    )
    pacer = stack.deps.hsm.pacer

    def others_take_slots(stage: str) -> None:
        if stage == "before_put":
            for _ in range(4):
                pacer.reserve()

    stack.deps.fault = others_take_slots
    try:
        outcome = stack.deliver(pkg.name)
    finally:
        stack.hsm.clear_faults()
    assert outcome.state == "imported"
    puts = _puts(stack, name, since)
    assert [p["status"] for p in puts] == [429, 429, 200]
    times = [datetime.fromisoformat(p["time"]) for p in puts]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(0.99 <= gap < 1.9 for gap in gaps), gaps
    assert stack.deps.hsm.stats["throttled"] == 2
    assert pacer.state().throttled == 1


class _TinyHoldClient:
    """A KeyClient stand-in: no version of any key yet, and every import PUT answered 429 with
    ``retry-after-ms: 1`` (what a proxy might send)."""

    def __init__(self) -> None:
        self.puts = 0

    def list_properties_of_key_versions(self, name: str, **_: Any) -> Iterator[Any]:
        raise ResourceNotFoundError(f"no key {name}")

    def import_key(self, name: str, key: Any, **_: Any) -> Any:  # noqa: ARG002  # the SDK's signature
        self.puts += 1
        raise HttpResponseError(response=_Throttled())


class _Throttled:
    request = None
    status_code = 429
    reason = "Too Many Requests"
    content_type = "application/json"
    headers = {"retry-after-ms": "1", "Content-Type": "application/json"}  # noqa: RUF012  # read only

    def text(self, encoding: str | None = None) -> str:  # noqa: ARG002  # azure-core's signature
        return '{"error":{"code":"Throttled","message":"Request was not processed"}}'

    def body(self) -> bytes:
        return self.text().encode()


def test_a_tiny_retry_after_is_no_busy_loop() -> None:
    """A retry waits the HSM's Retry-After but at least one interval of the pacer's ceiling:
    1 ms waits would otherwise send a PUT every millisecond for BYOK_THROTTLE_WAIT_SECONDS."""
    from dataclasses import replace

    from byok_pipeline.adapters.keyvault import HsmAdapter
    from byok_pipeline.core.settings import Settings

    clock = FakeClock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    settings = replace(
        Settings.from_env({"BYOK_HSM_URL": "https://hsm.example.managedhsm.azure.net"}),
        throttle_wait_seconds=2.0,
    )
    client = _TinyHoldClient()
    hsm = HsmAdapter(
        client,  # type: ignore[arg-type]  # a stand-in with the two methods import_once calls
        settings,
        sleep=sleep,
        clock=clock,
        pacer=ImportPacer(10.0, clock=clock),
    )
    with pytest.raises(TransientError) as caught:
        hsm.import_once(
            "tiny-hold", package_bytes=b"x", package_sha256="0" * 64, kty="EC-HSM",
            crv="P-256", key_ops=("sign",), tags={}, request_id="r", look_first=False,
        )  # fmt: skip
    assert caught.value.throttled
    assert 2 <= client.puts <= 22, client.puts  # at most ~2 s at 10 PUTs/s, not ~2,000 at 1 ms
    assert min(slept) >= 0.1 - 1e-9, min(slept)
    assert sum(slept) <= 2.0 + 1e-9


def test_persistent_throttling_never_ends_failed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from byok_pipeline.cli.main import main

    stack.deps.settings = replace(stack.settings, max_attempts=2, throttle_wait_seconds=0.0)
    stack.deps.hsm.settings = stack.deps.settings
    _, pkg, _ = _throttled_package(stack, "always-throttled", "ec-p256", rate=1000.0, retry_after=0)
    try:
        for _ in range(6):  # three times the attempts allowed
            with pytest.raises(TransientError) as caught:
                stack.deliver(pkg.name)
            assert caught.value.throttled
            time.sleep(0.05)
    finally:
        stack.hsm.clear_faults()
    doc = stack.deps.store.status_by_name(pkg.name)
    assert doc is not None
    assert (doc.state, doc.attempts) == ("importing", 0)
    monkeypatch.setenv("BYOK_STORAGE", stack.azurite.connection_string)
    monkeypatch.setenv("BYOK_STATUS_CONTAINER", stack.settings.status_container)
    monkeypatch.setenv("BYOK_INCOMING_CONTAINER", stack.settings.incoming_container)
    capsys.readouterr()
    assert main(["status", pkg.name]) == 0
    assert f"waiting: throttled by the HSM, next try at {doc.throttled_until}" in (
        capsys.readouterr().out
    )
    durable: list[str | None] = []

    def at_put(stage: str) -> None:  # what a worker dying in this PUT would leave behind
        if stage == "before_put":
            stored = stack.deps.store.status_by_name(pkg.name)
            durable.append(stored.import_attempt_at if stored else None)

    stack.deps.fault = at_put
    outcome, _ = _deliver_until_done(stack, pkg.name)
    assert outcome.state == "imported"
    assert durable
    assert all(durable), durable  # every PUT after a hand-back was noted first


# -- Managed HSM's limits: pre-checks ---------------------------------------------------------


def test_version_limit_refused_before_the_put(
    azurite: Azurite, hsm: EmulatorHandle, kek_name: str, tmp_path: Path
) -> None:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    stack = Stack.create(
        azurite, hsm, kek_name, f"vl{next(_names)}", tmp_path, service, hsm_max_versions_per_key=2
    )
    try:
        name = _name("versions")
        for _ in range(2):  # two versions: the pipeline may add versions to keys it imported
            pkg = stack.package("ec-p256", name)
            stack.drop_package(pkg)
            assert stack.deliver(pkg.name).state == "imported"
        third = stack.package("ec-p256", name)
        stack.drop_package(third)
        since = hsm.last_request_seq()
        outcome = stack.deliver(third.name)
        assert (outcome.state, outcome.reason_code) == ("rejected", "key_version_limit")
        assert outcome.doc is not None
        assert "new key name" in (outcome.doc.message or "")
        assert _puts(stack, name, since) == []  # refused before any import PUT
    finally:
        stack.close()


def test_key_limit_refused_before_the_put(
    azurite: Azurite, hsm: EmulatorHandle, kek_name: str, tmp_path: Path
) -> None:
    held = sum(1 for _ in hsm.key_client().list_properties_of_keys())
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    stack = Stack.create(
        azurite, hsm, kek_name, f"kl{next(_names)}", tmp_path, service, hsm_max_keys=held
    )
    try:
        name = _name("one-too-many")
        pkg = stack.package("oct-256", name)
        stack.drop_package(pkg)
        since = hsm.last_request_seq()
        outcome = stack.deliver(pkg.name)
        assert (outcome.state, outcome.reason_code) == ("rejected", "hsm_key_limit")
        assert _puts(stack, name, since) == []
    finally:
        stack.close()


# -- the HSM's own limits (emulator service-limits mode) --------------------------------------


@pytest.fixture(scope="module")
def limited_hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    """An emulator that throttles like Managed HSM at 4 imports/s per partition (~12/s in all),
    holding at most 400 keys and 2 versions per key."""
    with running_emulator(
        tmp_path_factory.mktemp("limited") / "hsm",
        limits="managed-hsm",
        limits_scale=4,
        max_keys=400,
        max_versions_per_key=2,
    ) as handle:
        handle.key_client().create_rsa_key(
            "limited-kek", size=3072, key_operations=["import"], hardware_protected=True
        )
        yield handle


@pytest.mark.slow
def test_burst_drains_at_the_hsm_pace_with_nothing_lost(
    azurite: Azurite, limited_hsm: EmulatorHandle, tmp_path: Path
) -> None:
    """200 packages dropped at once, 4 workers whose pacers start at 5x what the HSM admits:
    every package ends imported exactly once, none used more than one attempt, and the HSM did
    throttle (so the test exercised what it claims)."""
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    stack = Stack.create(
        azurite,
        limited_hsm,
        "limited-kek",
        f"burst{next(_names)}",
        tmp_path,
        service,
        hsm_imports_per_second=60.0,
        max_attempts=1,
    )
    limited_hsm.reset_limits()
    try:
        packages = [stack.package("ec-p256", f"burst-{i}") for i in range(200)]
        for pkg in packages:
            stack.drop_package(pkg)
        lock = threading.Lock()
        states: Counter[str] = Counter()

        def work(pkg: Any) -> None:
            outcome, _ = _deliver_until_done(stack, pkg.name, timeout=240)
            with lock:
                states[f"{outcome.state}/{outcome.reason_code}"] += 1

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(work, packages))
        assert states == Counter({"imported/None": 200})
        docs = stack.status_docs()
        assert len(docs) == 200
        assert {d["attempts"] for d in docs} == {1}
        client = limited_hsm.key_client()
        for pkg in packages[::20]:
            assert len(list(client.list_properties_of_key_versions(pkg.name[:-5]))) == 1
        counts = limited_hsm.limits()
        throttled = sum(counts["throttled"].values())
        assert throttled > 0, counts  # the HSM pushed back: pacing was exercised
        assert stack.blobs(stack.settings.incoming_container) == []
    finally:
        stack.close()


def test_the_reconciler_leaves_a_paced_package_until_its_time(stack: Stack) -> None:
    from dataclasses import replace
    from datetime import timedelta

    from byok_pipeline.processing.reconcile import reconcile

    stack.deps.settings = replace(stack.settings, throttle_wait_seconds=0.0)
    stack.deps.hsm.settings = stack.deps.settings
    _, pkg, _ = _throttled_package(stack, "paced", "oct-256", rate=1000.0, retry_after=30)
    try:
        with pytest.raises(TransientError):
            stack.deliver(pkg.name)
        doc = stack.deps.store.status_by_name(pkg.name)
        assert doc is not None
        assert doc.throttled_until is not None
        later = stack.deps.clock() + timedelta(seconds=stack.settings.lease_seconds + 1)
        assert reconcile(stack.deps, now=later).redelivered == {}  # its time has not come
        much_later = later + timedelta(seconds=60)
        report = reconcile(stack.deps, now=much_later)
        assert report.redelivered == {pkg.name: "error: throttled"}  # tried, throttled again
    finally:
        stack.hsm.clear_faults()
