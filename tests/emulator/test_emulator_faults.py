"""Fault injection, as documented in managed_hsm_emulator/faults.py and README.md."""

from __future__ import annotations

import http.client
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.keyvault.keys import KeyClient

from managed_hsm_emulator.testing import EmulatorHandle, EmulatorStartError, running_emulator


@pytest.fixture(autouse=True)
def _no_leftover_faults(hsm: EmulatorHandle) -> Iterator[None]:
    hsm.clear_faults()
    yield
    hsm.clear_faults()


@pytest.fixture(scope="module")
def key_name(client: KeyClient) -> str:
    client.create_oct_key("faulty", size=128)
    return "faulty"


def test_429_with_retry_after_by_count(hsm: EmulatorHandle, key_name: str) -> None:
    rule = hsm.inject_fault("429", method="GET", path=f"/keys/{key_name}*", count=2, retry_after=3)
    statuses = []
    for _ in range(3):
        resp = hsm.request("GET", f"/keys/{key_name}/?api-version=7.6")
        statuses.append(resp.status)
        if resp.status == 429:
            assert resp.headers["retry-after"] == "3"
            assert resp.body["error"]["code"] == "Throttled"
    assert statuses == [429, 429, 200]
    (state,) = hsm.faults()
    assert (state["id"], state["fired"], state["matched"]) == (rule["id"], 2, 2)


def test_sdk_retry_policy_recovers_from_a_429(hsm: EmulatorHandle, key_name: str) -> None:
    client = hsm.key_client(retry_backoff_factor=0.01)
    client.get_key(key_name)  # challenge done before the fault is armed
    hsm.inject_fault("429", method="GET", path=f"/keys/{key_name}/", count=1, retry_after=1)
    since = hsm.last_request_seq()
    started = time.monotonic()
    key = client.get_key(key_name)
    assert key.name == key_name
    seen = hsm.requests_seen(since)
    assert [(e["status"], e["fault"]) for e in seen] == [(429, "429"), (200, None)]
    assert seen[0]["client_request_id"] == seen[1]["client_request_id"]
    assert time.monotonic() - started >= 0.9  # the SDK honoured Retry-After


def test_503_and_method_matching(hsm: EmulatorHandle, key_name: str) -> None:
    hsm.inject_fault("503", method="POST", path="*", count=1)
    assert hsm.request("GET", f"/keys/{key_name}/?api-version=7.6").status == 200
    resp = hsm.request("POST", "/rng?api-version=7.6", {"count": 4})
    assert resp.status == 503
    assert "retry-after" not in resp.headers
    assert hsm.request("POST", "/rng?api-version=7.6", {"count": 4}).status == 200


def test_dropped_connection(hsm: EmulatorHandle, key_name: str) -> None:
    hsm.inject_fault("drop", method="GET", path=f"/keys/{key_name}/", count=1)
    since = hsm.last_request_seq()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        hsm.request("GET", f"/keys/{key_name}/?api-version=7.6")
    seen = hsm.requests_seen(since)
    assert [(e["status"], e["fault"]) for e in seen] == [(None, "drop")]
    # and the SDK recovers from one
    client = hsm.key_client(retry_backoff_factor=0.01)
    client.get_key(key_name)
    hsm.inject_fault("drop", method="GET", path=f"/keys/{key_name}/", count=1)
    assert client.get_key(key_name).name == key_name


def test_delay(hsm: EmulatorHandle, key_name: str) -> None:
    hsm.inject_fault("delay", path=f"/keys/{key_name}/", delay=0.4, count=1)
    started = time.monotonic()
    assert hsm.request("GET", f"/keys/{key_name}/?api-version=7.6").status == 200
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    assert hsm.request("GET", f"/keys/{key_name}/?api-version=7.6").status == 200
    assert time.monotonic() - started < 0.4


def test_rate(hsm: EmulatorHandle) -> None:
    hsm.inject_fault("503", path="/rng", rate=0.5)
    statuses = [hsm.request("POST", "/rng?api-version=7.6", {"count": 1}).status for _ in range(40)]
    (state,) = hsm.faults()
    assert state["matched"] == 40
    assert state["fired"] == statuses.count(503)
    assert 5 <= state["fired"] <= 35
    assert set(statuses) == {200, 503}


def test_unauthenticated_challenge_is_never_faulted(hsm: EmulatorHandle, key_name: str) -> None:
    hsm.inject_fault("503", count=1)
    assert hsm.request("GET", f"/keys/{key_name}/", authenticated=False).status == 401
    assert hsm.request("GET", f"/keys/{key_name}/?api-version=7.6").status == 503


def test_rule_management_and_bad_rules(hsm: EmulatorHandle) -> None:
    a = hsm.inject_fault("503", path="/a")
    b = hsm.inject_fault("429", path="/b")
    assert [r["id"] for r in hsm.faults()] == [a["id"], b["id"]]
    hsm.remove_fault(a["id"])
    assert [r["id"] for r in hsm.faults()] == [b["id"]]
    for bad in (
        {"kind": "500"},
        {"kind": "delay"},
        {"kind": "429", "rate": 2},
        {"kind": "429", "count": 0},
        {"kind": "429", "colour": "red"},
    ):
        resp = hsm.request("POST", "/_admin/faults", bad, authenticated=False)
        assert resp.status == 400, bad
        assert resp.body["error"]["innererror"]["code"] == "bad_fault_rule"


def test_faults_given_at_startup(tmp_path: Path) -> None:
    rules = [{"kind": "503", "method": "GET", "path": "/keys", "count": 1}]
    with running_emulator(tmp_path / "hsm", faults=rules) as hsm:
        assert hsm.request("GET", "/keys?api-version=7.6").status == 503
        assert hsm.request("GET", "/keys?api-version=7.6").status == 200
    with (
        pytest.raises(EmulatorStartError, match="bad_fault_rule"),
        running_emulator(tmp_path / "hsm", faults=[{"kind": "nope"}]),
    ):
        pass


def test_admin_is_loopback_only() -> None:
    from managed_hsm_emulator.http_server import _is_loopback

    assert _is_loopback("127.0.0.1")
    assert _is_loopback("::1")
    assert not _is_loopback("10.1.2.3")
    assert not _is_loopback("192.168.0.10")
    assert not _is_loopback("not-an-ip")
