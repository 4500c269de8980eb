"""The service-limits mode (managed_hsm_emulator/limits.py, README "Service limits mode").

Timing: every assertion is on counts, headers and bodies. Where a test needs "the next request
is too early", the emulator runs so slowly (scale 0.01: one create per 100 s per partition)
that no pause of a loaded machine lets a token back in; where it needs "after waiting, admitted",
waiting longer than asked only helps. Rate bounds are upper bounds (the emulator can never admit
more than the bucket allows in the time the client measured) with loose lower bounds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import JsonWebKey
from emulator_support import error_of
from testsupport import FakeClock

from managed_hsm_emulator.errors import (
    HSM_KEY_LIMIT_CODE,
    HSM_KEY_LIMIT_REASON,
    KEY_VERSION_LIMIT_CODE,
    KEY_VERSION_LIMIT_REASON,
    THROTTLED_CODE,
    THROTTLED_MESSAGE,
    HsmKeyLimitError,
    KeyVersionLimitError,
    StartupError,
    ThrottledError,
)
from managed_hsm_emulator.limits import (
    LimitsConfig,
    ServiceLimits,
    TokenBucket,
    limit_class,
    partition_of,
)
from managed_hsm_emulator.testing import EmulatorHandle, EmulatorStartError, running_emulator
from offline_packager.package_format import b64url_encode

SLOW = 0.01  # one create/import per 100 s per partition
API = "api-version=7.6"
OCT_128 = {"kty": "oct-HSM", "key_size": 128}


def name_in(partition: int, prefix: str) -> str:
    """A key name of the given partition."""
    return next(f"{prefix}-{i}" for i in range(1000) if partition_of(f"{prefix}-{i}") == partition)


def oct_jwk() -> JsonWebKey:
    return JsonWebKey(kty="oct", k=os.urandom(16), key_ops=["wrapKey", "unwrapKey"])


def response_of(exc: pytest.ExceptionInfo[HttpResponseError]) -> Any:
    """The azure-core HTTP response of a refused SDK call (headers, ``json()``)."""
    return exc.value.response


def create(hsm: EmulatorHandle, name: str) -> Any:
    """A raw create of an AES-128 key (the cheapest create)."""
    return hsm.request("POST", f"/keys/{name}/create?{API}", OCT_128)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    with running_emulator(
        tmp_path_factory.mktemp("slow"), limits="managed-hsm", limits_scale=SLOW
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def paced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    """Managed HSM's own rates (scale 1): one create/import per second per partition."""
    with running_emulator(tmp_path_factory.mktemp("paced"), limits="managed-hsm") as handle:
        yield handle


@pytest.fixture
def small(tmp_path: Path) -> Iterator[EmulatorHandle]:
    """Fast (scale 1000) with small object limits: 4 keys, 3 versions per key."""
    with running_emulator(
        tmp_path / "hsm",
        limits="managed-hsm",
        limits_scale=1000,
        max_keys=4,
        max_versions_per_key=3,
    ) as handle:
        yield handle


# --- the model, with a fixed clock ------------------------------------------------------------


def test_partition_is_sha256_of_the_lower_cased_name_mod_3() -> None:
    for name in ("kek", "Tenant-A-Key-17", "x"):
        expected = int(hashlib.sha256(name.lower().encode()).hexdigest()[:16], 16) % 3
        assert partition_of(name) == partition_of(name.upper()) == expected
    assert {partition_of(f"key-{i}") for i in range(30)} == {0, 1, 2}


def test_token_bucket_waits_are_exact_and_refusals_take_nothing() -> None:
    bucket = TokenBucket(rate=2.0, capacity=1.0, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.1) == pytest.approx(0.4)
    assert bucket.take(0.3) == pytest.approx(0.2)  # the refusal at 0.1 took nothing
    assert bucket.take(0.5) == 0.0  # exactly the advertised wait
    assert bucket.take(10.0) == 0.0  # full again, but never more than capacity
    assert bucket.take(10.0) > 0


def test_buckets_per_partition_and_class_and_scaled_burst() -> None:
    clock = FakeClock()
    limits = ServiceLimits(LimitsConfig(scale=100), clock=clock)  # 100 creates/s, burst 10
    a, b = name_in(0, "a"), name_in(1, "b")
    for _ in range(10):
        limits.admit("import_key", a)
    with pytest.raises(ThrottledError) as exc:
        limits.admit("create_key", name_in(0, "other"))  # creates and imports share a bucket
    assert exc.value.retry_after == pytest.approx(0.01)
    limits.admit("create_key", b)  # another partition
    limits.admit("get_key", a)  # another class
    clock.now += 0.01
    limits.admit("create_key", a)
    snap = limits.snapshot()
    assert snap["admitted"] == {"import_key": 10, "create_key": 2, "get_key": 1}
    assert snap["throttled"] == {"create_key": 1}
    assert snap["throttled_by_partition"] == [1, 0, 0]
    assert snap["rates"]["create"] == 100.0
    assert snap["rates"]["get"] == 110_000.0


def test_crypto_limits_follow_the_published_table_per_key_type() -> None:
    assert limit_class("sign", "RSA-2048") == "sign RSA-2048"
    assert limit_class("encrypt", "oct-256") is None  # no published AES encrypt figure
    assert limit_class("list_keys") is None
    rates = ServiceLimits(LimitsConfig()).snapshot()["rates"]
    assert (rates["sign RSA-2048"], rates["sign RSA-4096"], rates["verify EC P-521"]) == (
        900.0,
        150.0,
        28.0,
    )
    assert (rates["wrapKey oct-256"], rates["unwrapKey oct-128"]) == (2100.0, 1800.0)
    clock = FakeClock()
    limits = ServiceLimits(LimitsConfig(scale=0.01), clock=clock)
    name = name_in(2, "k")
    limits.admit("verify", name, key_type="EC P-521")
    with pytest.raises(ThrottledError) as exc:
        limits.admit("verify", name, key_type="EC P-521")
    assert exc.value.retry_after == pytest.approx(1 / 0.28)
    limits.admit("verify", name, key_type="RSA-2048")
    for _ in range(50):
        limits.admit("encrypt", name, key_type="oct-256")


@pytest.mark.parametrize(
    ("wait", "seconds", "millis"),
    [(0.0004, "1", "1"), (0.25, "1", "250"), (2.0, "2", "2000"), (2.0004, "3", "2001")],
)
def test_retry_after_headers_round_up(wait: float, seconds: str, millis: str) -> None:
    headers = ThrottledError("x", retry_after=wait).headers()
    assert headers == {"Retry-After": seconds, "x-ms-retry-after-ms": millis}


def test_object_limits_and_option_checks() -> None:
    limits = ServiceLimits(LimitsConfig(max_keys=2, max_versions_per_key=1))
    limits.check_new_version("k", versions=None, keys_held=lambda: 1)
    limits.check_new_version("k", versions=0, keys_held=lambda: 9)  # a held key: not counted
    with pytest.raises(HsmKeyLimitError):
        limits.check_new_version("k", versions=None, keys_held=lambda: 2)
    with pytest.raises(KeyVersionLimitError):
        limits.check_new_version("k", versions=1, keys_held=lambda: 0)
    assert limits.snapshot()["refused"] == {HSM_KEY_LIMIT_REASON: 1, KEY_VERSION_LIMIT_REASON: 1}
    with pytest.raises(StartupError, match="need --limits"):
        LimitsConfig.from_options(None, max_keys=3)
    with pytest.raises(StartupError, match="> 0"):
        LimitsConfig.from_options("managed-hsm", scale=0)
    with pytest.raises(StartupError, match="at least 1"):
        LimitsConfig.from_options("managed-hsm", max_versions_per_key=0)
    assert LimitsConfig.from_options(None) is None
    assert LimitsConfig.from_options("managed-hsm") == LimitsConfig()


# --- through the SDK and raw HTTPS ----------------------------------------------------------


def test_limits_are_off_by_default(hsm: EmulatorHandle) -> None:
    assert hsm.limits() == {"enabled": False}
    client = hsm.key_client(retry_total=0)
    client.create_oct_key("burst", size=128)
    since = hsm.last_request_seq()

    def burst(_: int) -> None:
        for _ in range(10):
            client.import_key("burst", oct_jwk())
            client.get_key("burst")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(burst, range(4)))
    statuses = [e["status"] for e in hsm.requests_seen(since)]
    assert statuses == [200] * 80


def test_an_import_over_the_rate_gets_429_with_retry_after(slow: EmulatorHandle) -> None:
    slow.reset_limits()
    client = slow.key_client(retry_total=0)
    name = name_in(0, "imp")
    client.import_key(name, oct_jwk())
    since = slow.last_request_seq()
    with pytest.raises(HttpResponseError) as exc:
        client.import_key(name, oct_jwk())
    assert exc.value.status_code == 429
    headers = response_of(exc).headers
    millis = int(headers["x-ms-retry-after-ms"])
    assert 0 < millis <= 100_000
    assert int(headers["Retry-After"]) == math.ceil(millis / 1000)
    body = response_of(exc).json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == THROTTLED_CODE
    assert body["error"]["message"].startswith(THROTTLED_MESSAGE)
    # the same through raw HTTPS; the wait only shrinks
    raw = slow.request(
        "PUT", f"/keys/{name}?{API}", {"key": {"kty": "oct", "k": b64url_encode(bytes(16))}}
    )
    assert raw.status == 429
    assert 0 < int(raw.headers["x-ms-retry-after-ms"]) <= millis
    assert raw.headers["retry-after"].isdigit()
    assert raw.body["error"]["code"] == THROTTLED_CODE
    # nothing was done: still one version
    assert len(list(client.list_properties_of_key_versions(name))) == 1
    seen = [e for e in slow.requests_seen(since) if e["status"] == 429]
    assert [(e["operation"], e["reason"], e["fault"]) for e in seen] == [
        ("import_key", "throttled", None)
    ] * 2
    state = slow.limits()
    assert state["throttled"]["import_key"] == 2
    assert state["throttled_by_partition"][0] == 2


def test_partitions_do_not_share_a_bucket(slow: EmulatorHandle) -> None:
    slow.reset_limits()
    names = [name_in(p, "part") for p in range(3)]
    assert [create(slow, n).status for n in names] == [200, 200, 200]
    # each partition's single token is spent, whatever the name in it
    assert [create(slow, name_in(p, "again")).status for p in range(3)] == [429, 429, 429]
    assert slow.limits()["throttled_by_partition"] == [1, 1, 1]


def test_crypto_limits_depend_on_the_key_type(slow: EmulatorHandle) -> None:
    slow.reset_limits()
    client = slow.key_client(retry_total=0)
    ec_key = client.create_ec_key(name_in(1, "p521"), curve="P-521")
    slow.reset_limits()
    rsa_key = client.create_rsa_key(name_in(1, "rsa"), size=2048)

    def verify(key: Any, alg: str, digest_len: int, sig_len: int) -> int:
        path = f"/keys/{key.name}/{key.properties.version}/verify?{API}"
        body = {
            "alg": alg,
            "digest": b64url_encode(bytes(digest_len)),
            "value": b64url_encode(bytes(sig_len)),
        }
        return int(slow.request("POST", path, body).status)

    # EC P-521 verify: 28/s x 0.01 = one per 3.6 s; RSA-2048 verify: 34/s, its own bucket
    assert verify(ec_key, "ES512", 64, 132) == 200
    assert verify(ec_key, "ES512", 64, 132) == 429
    assert verify(rsa_key, "RS256", 32, 256) == 200
    assert slow.limits()["throttled"] == {"verify": 1}


def test_a_client_waiting_the_advertised_time_is_admitted(paced: EmulatorHandle) -> None:
    for header, unit in (("x-ms-retry-after-ms", 0.001), ("retry-after", 1.0)):
        paced.reset_limits()
        name = name_in(2, "wait")
        reply = next((r for r in (create(paced, name) for _ in range(30)) if r.status == 429), None)
        assert reply is not None, "creates in a row should meet the 1/s limit"
        wait = int(reply.headers[header]) * unit
        assert 0 < wait <= 1.0
        time.sleep(wait)
        assert create(paced, name).status == 200


def test_the_sdk_retries_a_429_after_retry_after(paced: EmulatorHandle) -> None:
    paced.reset_limits()
    client = paced.key_client(retry_backoff_factor=0.01)
    name = name_in(0, "sdk")
    client.create_oct_key(name, size=128)
    since = paced.last_request_seq()
    client.create_oct_key(name, size=128)
    client.create_oct_key(name, size=128)
    seen = paced.requests_seen(since)
    assert [e["status"] for e in seen if e["status"] != 429] == [200, 200]
    assert [e["status"] for e in seen].count(429) >= 1
    # azure-core reads Retry-After before x-ms-retry-after-ms: it waits whole seconds
    for first, then in itertools.pairwise(seen):
        if first["status"] == 429:
            assert then["client_request_id"] == first["client_request_id"]
            gap = _seconds(then["time"]) - _seconds(first["time"])
            assert gap >= 0.9


def _seconds(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def test_the_scale_changes_the_admitted_rate(
    slow: EmulatorHandle, paced: EmulatorHandle, small: EmulatorHandle
) -> None:
    # scale 0.01: one create per partition per 100 s
    slow.reset_limits()
    name = name_in(1, "scale")
    assert [create(slow, name).status for _ in range(5)].count(200) == 1
    # scale 1000: 1000 per second, burst 100: a quick run is never refused (at scale 1 it is)
    assert [create(small, "scale").status for _ in range(3)] == [200] * 3
    assert small.limits()["throttled"] == {}
    # scale 1: at most burst + rate x elapsed
    paced.reset_limits()
    started = time.monotonic()
    admitted = 0
    while time.monotonic() - started < 2.5:
        admitted += create(paced, name_in(1, "scale")).status == 200
    elapsed = time.monotonic() - started
    assert 2 <= admitted <= 1 + elapsed
    assert [h.limits()["rates"]["create"] for h in (slow, paced, small)] == [SLOW, 1.0, 1000.0]


def test_versions_per_key_are_limited(small: EmulatorHandle) -> None:
    client = small.key_client(retry_total=0)
    for _ in range(3):
        client.create_oct_key("versions", size=128)
    since = small.last_request_seq()
    attempts: list[Callable[[], object]] = [
        lambda: client.create_oct_key("versions", size=128),
        lambda: client.import_key("versions", oct_jwk()),
    ]
    for attempt in attempts:
        with pytest.raises(HttpResponseError) as exc:
            attempt()
        status, code, message = error_of(exc)
        assert (status, code) == (403, KEY_VERSION_LIMIT_CODE)
        assert response_of(exc).json()["error"]["innererror"]["code"] == KEY_VERSION_LIMIT_REASON
        assert "3 versions" in message
    reasons = [e["reason"] for e in small.requests_seen(since)]
    assert reasons == [KEY_VERSION_LIMIT_REASON] * 2
    assert len(list(client.list_properties_of_key_versions("versions"))) == 3
    assert small.limits()["refused"] == {HSM_KEY_LIMIT_REASON: 0, KEY_VERSION_LIMIT_REASON: 2}


def test_keys_per_hsm_are_limited_and_soft_deleted_keys_count(small: EmulatorHandle) -> None:
    client = small.key_client(retry_total=0)
    for i in range(4):
        client.create_oct_key(f"key-{i}", size=128)
    assert small.limits()["keys"] == 4

    def refused_with_key_limit(name: str) -> None:
        with pytest.raises(HttpResponseError) as exc:
            client.import_key(name, oct_jwk())
        status, code, _ = error_of(exc)
        assert (status, code) == (403, HSM_KEY_LIMIT_CODE)
        assert response_of(exc).json()["error"]["innererror"]["code"] == HSM_KEY_LIMIT_REASON

    refused_with_key_limit("key-4")
    client.create_oct_key("key-0", size=128)  # a new version of a held key is not a new key
    client.begin_delete_key("key-1").wait()
    assert small.limits()["keys"] == 4
    refused_with_key_limit("key-5")  # soft-deleted keys still count
    client.purge_deleted_key("key-1")
    client.import_key("key-5", oct_jwk())
    assert small.limits()["refused"][HSM_KEY_LIMIT_REASON] == 2


def test_limit_options_need_the_mode(tmp_path: Path) -> None:
    with (
        pytest.raises(EmulatorStartError, match="bad_limits"),
        running_emulator(tmp_path / "a", max_keys=3),
    ):
        pass
    with (
        pytest.raises(EmulatorStartError, match="bad_limits"),
        running_emulator(tmp_path / "b", limits="managed-hsm", limits_scale=-1),
    ):
        pass
    with (
        pytest.raises(EmulatorStartError, match="invalid choice"),
        running_emulator(tmp_path / "c", limits="vault"),
    ):
        pass
