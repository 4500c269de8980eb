"""Fault injection, as documented in managed_hsm_emulator/faults.py and README.md."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import KeyClient
from emulator_support import (
    Kek,
    assert_is_packaged_key,
    bearer,
    create_kek,
    exchange,
    http_request,
    jwk_for,
    non_loopback_ipv4,
    package_in_process,
)

from managed_hsm_emulator.testing import EmulatorHandle, EmulatorStartError, running_emulator
from offline_packager.package_format import b64url_encode
from offline_packager.target_keys import TargetKey


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


def test_loopback_classification() -> None:
    from managed_hsm_emulator.http_server import _is_loopback

    assert _is_loopback("127.0.0.1")
    assert _is_loopback("127.1.2.3")
    assert _is_loopback("::1")
    assert _is_loopback("::ffff:127.0.0.1")  # IPv4 on a dual-stack socket
    assert not _is_loopback("::ffff:10.1.2.3")
    assert not _is_loopback("10.1.2.3")
    assert not _is_loopback("192.168.0.10")
    assert not _is_loopback("not-an-ip")


def test_admin_is_not_served_to_a_non_loopback_client(tmp_path: Path) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    with running_emulator(tmp_path / "hsm", host="0.0.0.0") as hsm:  # noqa: S104  # the point
        assert hsm.url == f"https://127.0.0.1:{hsm.port}"
        host = {"Host": f"127.0.0.1:{hsm.port}"}
        requests = [
            http_request("GET", "/_admin/health", host),
            http_request("GET", "/_admin/requests?since=0", host),
            http_request("DELETE", "/_admin/faults", host),
            http_request(
                "POST",
                "/_admin/faults",
                {**host, "Content-Length": "15"},
                b'{"kind": "503"}',
            ),
        ]
        # from the machine's own non-loopback address: the client is not loopback
        replies, _ = exchange(hsm, b"".join(requests), replies=4, address=address, close_wait=None)
        assert [r.status for r in replies] == [404, 404, 404, 404]
        assert all(r.body["error"]["code"] == "NotFound" for r in replies)
        assert "last_request_seq" not in json.dumps([r.body for r in replies])
        assert hsm.faults() == []  # the POST did nothing
        # the same requests over loopback are served (the control)
        replies, _ = exchange(hsm, requests[0], replies=1, close_wait=None)
        assert replies[0].status == 200
        # Key Vault requests from afar still work, with the emulator's own name as Host
        token = {"Authorization": bearer(hsm)}
        get = http_request("GET", "/keys?api-version=7.6", {**host, **token})
        foreign = http_request(
            "GET", "/keys?api-version=7.6", {"Host": f"{address}:{hsm.port}", **token}
        )
        replies, _ = exchange(hsm, get + foreign, replies=2, address=address, close_wait=None)
        assert replies[0].status == 200
        assert (replies[1].status, replies[1].body["error"]["innererror"]["code"]) == (
            400,
            "bad_host",
        )


# --- phase "after": done, but the reply was lost ---------------------------------------------


@pytest.fixture(scope="module")
def kek(hsm: EmulatorHandle, client: KeyClient, tmp_path_factory: pytest.TempPathFactory) -> Kek:
    return create_kek(hsm, client, "faults-kek", tmp_path_factory.mktemp("kek"))


def _versions(client: KeyClient, name: str) -> list[str]:
    try:
        return [str(p.version) for p in client.list_properties_of_key_versions(name)]
    except ResourceNotFoundError:
        return []


@pytest.mark.parametrize("kind", ["drop", "503", "429"])
def test_byok_put_with_a_fault_after_creates_the_version_but_the_client_sees_a_failure(
    hsm: EmulatorHandle, client: KeyClient, kek: Kek, targets: dict[str, TargetKey], kind: str
) -> None:
    name = f"after-{kind}"
    target = targets["oct-256"]
    package = package_in_process(kek.public_key, kek.kid, target.plaintext.reveal())
    body = {
        "key": {"kty": "oct-HSM", "key_hsm": b64url_encode(package)},
        "Hsm": True,
    }
    hsm.inject_fault(kind, method="PUT", path=f"/keys/{name}", count=1, phase="after")
    since = hsm.last_request_seq()
    if kind == "drop":
        with pytest.raises(
            (http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)
        ):
            hsm.request("PUT", f"/keys/{name}?api-version=7.6", body)
    else:
        resp = hsm.request("PUT", f"/keys/{name}?api-version=7.6", body)
        assert resp.status == int(kind)
        assert "key" not in resp.body
    (entry,) = hsm.requests_seen(since)
    # ...and yet the import happened: the version exists and is the packaged key
    (version,) = _versions(client, name)
    assert_is_packaged_key(hsm, client.get_key(name, version), target)
    assert entry["fault"] == kind
    assert entry["fault_phase"] == "after"
    assert entry["operation_status"] == 200
    assert entry["status"] == (None if kind == "drop" else int(kind))
    assert entry["operation"] == "import_key"


def test_sdk_sees_the_lost_reply_and_its_retry_makes_a_second_version(
    hsm: EmulatorHandle, client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    target = targets["ec-p256"]
    package = package_in_process(kek.public_key, kek.kid, target.plaintext.reveal())
    jwk = jwk_for(target.type, package)
    no_retry = hsm.key_client(retry_total=0)
    no_retry.get_key("faults-kek")  # challenge done before the fault is armed
    hsm.inject_fault("503", method="PUT", path="/keys/after-sdk", count=1, phase="after")
    with pytest.raises(HttpResponseError) as exc:
        no_retry.import_key("after-sdk", jwk, hardware_protected=True)
    assert exc.value.status_code == 503
    assert len(_versions(client, "after-sdk")) == 1  # the failed import did import
    # With retries, the SDK resends the PUT: Key Vault has no idempotency, so a reply lost
    # after the import leaves two versions. This is what the pipeline must cope with.
    hsm.inject_fault("503", method="PUT", path="/keys/after-sdk", count=1, phase="after")
    client.import_key("after-sdk", jwk, hardware_protected=True)
    assert len(_versions(client, "after-sdk")) == 3


def test_delay_after_commits_before_the_late_reply(hsm: EmulatorHandle, client: KeyClient) -> None:
    hsm.inject_fault("delay", method="POST", path="/keys/late/create", delay=2, phase="after")
    result: dict[str, Any] = {}

    def create() -> None:
        result["resp"] = hsm.request("POST", "/keys/late/create?api-version=7.6", {"kty": "oct"})

    worker = threading.Thread(target=create)
    started = time.monotonic()
    worker.start()
    while not _versions(client, "late"):
        assert time.monotonic() - started < 10, "the key never appeared"
        time.sleep(0.05)
    assert worker.is_alive()  # the key exists while its creator still waits for the reply
    worker.join(10)
    assert result["resp"].status == 200
    assert time.monotonic() - started >= 2
    assert result["resp"].body["key"]["kid"].rsplit("/", 1)[1] == _versions(client, "late")[0]


def test_fault_after_a_refusal_replaces_the_refusal(hsm: EmulatorHandle) -> None:
    hsm.inject_fault("503", method="GET", path="/keys/missing/", count=1, phase="after")
    since = hsm.last_request_seq()
    assert hsm.request("GET", "/keys/missing/?api-version=7.6").status == 503
    (entry,) = hsm.requests_seen(since)
    assert (entry["status"], entry["operation_status"], entry["reason"]) == (
        503,
        404,
        "key_not_found",
    )


def test_phase_is_validated_and_reported(hsm: EmulatorHandle) -> None:
    rule = hsm.inject_fault("drop", path="/nowhere", phase="after")
    assert rule["phase"] == "after"
    assert hsm.inject_fault("drop", path="/nowhere")["phase"] == "before"
    resp = hsm.request(
        "POST", "/_admin/faults", {"kind": "drop", "phase": "during"}, authenticated=False
    )
    assert resp.status == 400
    assert resp.body["error"]["innererror"]["code"] == "bad_fault_rule"
