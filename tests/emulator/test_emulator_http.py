"""HTTP framing: the 401 challenge comes before the body is looked at, bodies the emulator will
not read close the connection, and keep-alive never gets out of step (no request smuggling)."""

from __future__ import annotations

import pytest
from emulator_support import bearer, exchange, http_request

from managed_hsm_emulator.http_server import MAX_BODY
from managed_hsm_emulator.testing import EmulatorHandle
from managed_hsm_emulator.tokens import AUDIENCE, TENANT_ID

CHALLENGE = (
    f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", resource="{AUDIENCE}"'
)


def _host(hsm: EmulatorHandle) -> str:
    return f"127.0.0.1:{hsm.port}"


def _smuggled(hsm: EmulatorHandle) -> bytes:
    """A whole second request, for hiding inside a body the server must not misread."""
    return http_request(
        "POST",
        "/keys/smuggled/create?api-version=7.6",
        {"Host": _host(hsm), "Authorization": bearer(hsm), "Content-Length": "2"},
        b"{}",
    )


@pytest.mark.parametrize(
    "framing",
    [
        {"Content-Length": str(MAX_BODY + 1)},  # over the limit (and never sent)
        {"Content-Length": "abc"},
        {"Content-Length": "-5"},
        {"Transfer-Encoding": "chunked"},
    ],
    ids=["too-large", "non-numeric", "negative", "chunked"],
)
def test_unauthenticated_request_gets_the_challenge_whatever_its_body(
    hsm: EmulatorHandle, framing: dict[str, str]
) -> None:
    since = hsm.last_request_seq()
    request = http_request(
        "PUT", "/keys/x?api-version=7.6", {"Host": _host(hsm), **framing}, b"0\r\n\r\n"
    )
    (reply,), closed = exchange(hsm, request, replies=1)
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == CHALLENGE
    assert reply.body["error"]["innererror"]["code"] == "no_token"
    assert reply.headers["connection"] == "close"
    assert closed  # the unread body cannot desynchronise the next request
    (entry,) = hsm.requests_seen(since)
    assert (entry["status"], entry["reason"], entry["body_bytes"]) == (401, "no_token", None)


def test_unauthenticated_request_with_a_body_keeps_the_connection_in_step(
    hsm: EmulatorHandle,
) -> None:
    body = b'{"kty": "oct-HSM"}'
    first = http_request(
        "POST",
        "/keys/never/create?api-version=7.6",
        {"Host": _host(hsm), "Content-Length": str(len(body))},
        body,
    )
    second = http_request(
        "GET", "/keys?api-version=7.6", {"Host": _host(hsm), "Authorization": bearer(hsm)}
    )
    replies, closed = exchange(hsm, first + second, replies=2, close_wait=0.5)
    assert [r.status for r in replies] == [401, 200]
    assert not closed  # keep-alive survives: the refused body was read and discarded


@pytest.mark.parametrize(
    ("framing", "status", "reason"),
    [
        ({"Content-Length": "-1"}, 400, "bad_framing"),
        ({"Content-Length": "abc"}, 400, "bad_framing"),
        ({"Content-Length": "1_0"}, 400, "bad_framing"),  # int() would accept it
        ({"Transfer-Encoding": "chunked"}, 400, "bad_framing"),
        ({"Transfer-Encoding": "gzip", "Content-Length": "4"}, 400, "bad_framing"),
        ({"Content-Length": str(MAX_BODY + 1)}, 413, "too_large"),
    ],
    ids=["negative", "non-numeric", "underscore", "chunked", "te-and-cl", "too-large"],
)
def test_bad_framing_is_refused_and_the_connection_closed(
    hsm: EmulatorHandle, framing: dict[str, str], status: int, reason: str
) -> None:
    since = hsm.last_request_seq()
    smuggled = _smuggled(hsm)
    # For chunked, the "body" is a chunk holding a whole second request; if the server read
    # the chunk header as the end of the request, it would run the smuggled one.
    chunk = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    request = http_request(
        "POST",
        "/rng?api-version=7.6",
        {"Host": _host(hsm), "Authorization": bearer(hsm), **framing},
        chunk,
    )
    (reply,), closed = exchange(hsm, request + smuggled, replies=1)
    assert reply.status == status
    assert reply.body["error"]["innererror"]["code"] == reason
    assert reply.headers["connection"] == "close"
    assert closed
    seen = hsm.requests_seen(since)
    assert [(e["path"], e["status"], e["body_bytes"]) for e in seen] == [("/rng", status, None)]
    assert hsm.request("GET", "/keys/smuggled/?api-version=7.6").status == 404


def test_repeated_content_length_is_refused(hsm: EmulatorHandle) -> None:
    request = http_request(
        "POST",
        "/rng?api-version=7.6",
        [
            ("Host", _host(hsm)),
            ("Authorization", bearer(hsm)),
            ("Content-Length", "13"),
            ("Content-Length", "0"),
        ],
        b'{"count": 4}\n',
    )
    (reply,), closed = exchange(hsm, request, replies=1)
    assert (reply.status, reply.body["error"]["innererror"]["code"]) == (400, "bad_framing")
    assert closed


def test_good_requests_share_one_connection(hsm: EmulatorHandle) -> None:
    body = b'{"count": 4}'
    one = http_request(
        "POST",
        "/rng?api-version=7.6",
        {"Host": _host(hsm), "Authorization": bearer(hsm), "Content-Length": str(len(body))},
        body,
    )
    replies, closed = exchange(hsm, one * 3, replies=3, close_wait=0.5)
    assert [r.status for r in replies] == [200, 200, 200]
    assert not closed


def test_admin_endpoints_refuse_bad_framing_too(hsm: EmulatorHandle) -> None:
    request = http_request(
        "POST", "/_admin/faults", {"Host": _host(hsm), "Transfer-Encoding": "chunked"}, b"0\r\n\r\n"
    )
    (reply,), closed = exchange(hsm, request, replies=1)
    assert (reply.status, reply.body["error"]["innererror"]["code"]) == (400, "bad_framing")
    assert closed
    assert hsm.faults() == []
