"""HTTPS transport: authentication, fault injection, request log, admin endpoints, routing.

Order for every Key Vault request, as the real service does it: a request without a bearer
token gets the ``401`` challenge before anything else is looked at (its body, if well framed and
within the limit, is read and discarded so the connection stays usable; otherwise the connection
is closed after the reply); then the body framing is checked (``Transfer-Encoding``, a negative,
repeated or non-numeric ``Content-Length``: ``400`` and the connection is closed; over 1 MiB:
``413`` and closed) and the body read; then the token is checked; then ``Host`` (only the
names in :mod:`.identity`: anything else is ``400 bad_host``); then faults apply (phase
``before``); then the route and api-version are validated, the service-limits mode (if on,
:mod:`.limits`) admits the request or answers ``429``, and the operation runs; then
phase-``after`` faults replace or delay the reply.

Admin endpoints (``/_admin/...``, loopback clients only, no token, never faulted or logged):

- ``GET /_admin/health``
- ``GET /_admin/requests?since=SEQ``: request log entries after ``SEQ``
- ``GET /_admin/faults``, ``POST /_admin/faults`` (a rule, see :mod:`.faults`),
  ``DELETE /_admin/faults`` (all), ``DELETE /_admin/faults/{id}``
- ``GET /_admin/limits``: the service-limits mode's configuration and counters (see
  :mod:`.limits`), ``POST /_admin/limits/reset``: refill its buckets, zero its counters
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from offline_packager.secret import SecretBytes

from .errors import (
    BadParameterError,
    EmulatorError,
    PathNotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from .faults import FaultInjector, FaultRule
from .identity import Identity
from .requestlog import RequestLog, clean_header
from .routes import Route, route
from .service import KeyVaultService, ServiceRequest, ServiceResponse, check_api_version
from .tokens import AUDIENCE, TENANT_ID, verify_token

LOG = logging.getLogger("managed_hsm_emulator")
MAX_BODY = 1024 * 1024
SERVICE_VERSION = "1.9.0.0-emulator"
CHALLENGE = (
    f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", resource="{AUDIENCE}"'
)
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")
_JSON = "application/json; charset=utf-8"
# After a reply on a connection whose request body was not (fully) read: how long, and how much,
# to keep reading and discarding before closing, so the close does not reset the connection
# before the client has read the reply.
_LINGER_SECONDS = 1.0
_LINGER_MAX_BYTES = 4 * MAX_BODY


class EmulatorHTTPServer(ThreadingHTTPServer):
    """Threaded HTTPS server; TLS handshakes happen in the request threads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        service: KeyVaultService,
        token_key: SecretBytes,
        faults: FaultInjector,
        request_log: RequestLog,
        ssl_context: ssl.SSLContext,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.token_key = token_key
        self.faults = faults
        self.request_log = request_log
        self.ssl_context = ssl_context
        self.clock = clock
        if ":" in address[0]:  # an IPv6 literal such as ::1 (or :: for both families)
            self.address_family = socket.AF_INET6
        super().__init__(address, KeyVaultHandler)
        self.identity = Identity(bound_host=address[0], port=int(self.server_address[1]))

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # Headers and body are separate writes: without NODELAY, Nagle + delayed ACK add ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.ssl_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), addr

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: ARG002  # socketserver signature
        """Connection-level failures (bad TLS handshakes, resets) are routine: log briefly."""
        LOG.debug("connection from %s ended with an error", client_address[0])


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 on a dual-stack socket
    return addr.is_loopback


class KeyVaultHandler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = "managed-hsm-emulator"
    sys_version = ""
    timeout = 120
    server: EmulatorHTTPServer
    _linger: bool = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  # stdlib signature
        """Silence the stdlib access log; requests are logged by :meth:`_finish`."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # --- plumbing ---------------------------------------------------------------------------

    def _close_after_reply(self) -> None:
        """The request's body is not (fully) read: close the connection after the reply."""
        self.close_connection = True
        self._linger = True

    def _framing_error(self, message: str) -> BadParameterError:
        self._close_after_reply()
        return BadParameterError(message, reason="bad_framing")

    def _content_length(self) -> int:
        """The body length the request declares.

        Raises:
            BadParameterError: reason ``bad_framing`` (Transfer-Encoding; Content-Length
                negative, repeated or not a number); the connection will be closed.
            PayloadTooLargeError: over :data:`MAX_BODY`; the connection will be closed.
        """
        if self.headers.get_all("Transfer-Encoding"):
            raise self._framing_error(
                "Transfer-Encoding is not supported; send the body with a Content-Length"
            )
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        if len(values) > 1 or not _CONTENT_LENGTH_RE.fullmatch(values[0].strip()):
            raise self._framing_error("Content-Length must be one non-negative decimal number")
        length = int(values[0])
        if length > MAX_BODY:
            self._close_after_reply()
            raise PayloadTooLargeError(f"request bodies are limited to {MAX_BODY} bytes")
        return length

    def _read_exactly(self, length: int) -> bytes:
        data = self.rfile.read(length) if length > 0 else b""
        if len(data) != length:
            self.close_connection = True
            raise ConnectionError("the client closed the connection in the middle of the body")
        return data

    def _read_body(self) -> bytes:
        """The request body (see :meth:`_content_length` for what is refused)."""
        return self._read_exactly(self._content_length())

    def _skip_body(self) -> int | None:
        """Read and discard the body of a request that is refused before it is looked at (no
        token, admin from afar), so a keep-alive connection stays in step. Returns its length,
        or None if it cannot be read safely (the connection is then closed after the reply)."""
        try:
            length = self._content_length()
        except EmulatorError:
            return None
        self._read_exactly(length)
        return length

    def _send(
        self,
        status: int,
        body: dict[str, Any] | None,
        *,
        request_id: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", _JSON)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-ms-request-id", request_id)
        self.send_header("x-ms-keyvault-service-version", SERVICE_VERSION)
        client_id = clean_header(self.headers.get("x-ms-client-request-id"))
        if client_id:
            self.send_header("x-ms-client-request-id", client_id)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        self._linger = False
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            LOG.debug("socket already closed while dropping a connection")

    def _lingering_close(self) -> None:
        """Stop writing, then read and discard what the client still sends (at most
        ``_LINGER_MAX_BYTES`` for ``_LINGER_SECONDS``): closing a socket with unread data resets
        the connection, and the client could lose the reply it has not read yet."""
        try:
            self.connection.settimeout(_LINGER_SECONDS)
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained < _LINGER_MAX_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except (OSError, ValueError):  # ssl.SSLError is an OSError; ValueError: closed socket
            LOG.debug("connection ended while lingering before close")

    def _end_request(self) -> None:
        if self._linger:
            self._linger = False
            self._lingering_close()

    # --- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._linger = False
        try:
            self._dispatch_one()
        finally:
            self._end_request()

    def _dispatch_one(self) -> None:
        parts = urlsplit(self.path)
        if parts.path.startswith("/_admin"):
            self._admin(parts.path, dict(parse_qsl(parts.query)))
            return
        started = time.monotonic()
        request_id = str(uuid.uuid4())
        entry: dict[str, Any] = {
            "method": self.command,
            "path": parts.path,
            "api_version": None,
            "operation": None,
            "client_request_id": clean_header(self.headers.get("x-ms-client-request-id")),
            "request_id": request_id,
            "fault": None,
            "fault_phase": None,
            "operation_status": None,
            "reason": None,
            "body_bytes": None,
        }
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        entry["api_version"] = clean_header(query.get("api-version"))
        status: int | None = 500
        try:
            status = self._keyvault(parts.path, query, entry, request_id)
        except EmulatorError as exc:
            status = exc.status
            entry["reason"] = exc.reason
            extra = exc.headers()
            if exc.status == 401:  # HTTP status
                extra["WWW-Authenticate"] = CHALLENGE
            self._send(exc.status, exc.to_body(), request_id=request_id, extra=extra)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            status = 499
            entry["reason"] = "client_disconnected"
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001  # any bug becomes a 500, never a dead thread
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
            # Only the type and place: an exception message could carry request data.
            LOG.error(  # noqa: TRY400  # a traceback could show request data
                "internal error %s at %s", type(exc).__name__, where
            )
            status = 500
            entry["reason"] = "internal"
            err = EmulatorError("internal error in the emulator (see its log)")
            self._send(500, err.to_body(), request_id=request_id)
        entry["status"] = status
        entry["duration_ms"] = round((time.monotonic() - started) * 1000, 2)
        self.server.request_log.record(**entry)
        LOG.info(
            "%s %s -> %s%s cid=%s",
            self.command,
            parts.path,
            status,
            f" ({entry['reason']})" if entry["reason"] else "",
            entry["client_request_id"],
        )

    def _keyvault(
        self, path: str, query: dict[str, str], entry: dict[str, Any], request_id: str
    ) -> int | None:
        auth = self.headers.get("Authorization")
        if not auth or not auth.startswith("Bearer "):
            entry["body_bytes"] = self._skip_body()
            raise UnauthorizedError(
                "AKV10000: Request is missing a Bearer or PoP token.", reason="no_token"
            )
        body_bytes = self._read_body()
        entry["body_bytes"] = len(body_bytes)
        verify_token(self.server.token_key, auth[len("Bearer ") :].strip(), now=self.server.clock())
        host = self._checked_host()
        fault = self.server.faults.pick(self.command, path)
        if fault is not None:
            entry["fault"] = fault.kind
            entry["fault_phase"] = fault.phase
        if fault is None or fault.phase == "before":
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay)
            elif fault is not None:
                return self._fault(fault, request_id)
            return self._reply(self._operation(path, host, query, entry, body_bytes), request_id)
        # phase "after": the operation runs (and any change is committed) first; then its reply
        # is delayed, replaced by a 429/503, or lost with the connection.
        outcome: ServiceResponse | EmulatorError
        try:
            outcome = self._operation(path, host, query, entry, body_bytes)
        except EmulatorError as exc:
            entry["reason"] = exc.reason
            outcome = exc
        entry["operation_status"] = outcome.status
        if fault.kind != "delay":
            return self._fault(fault, request_id)
        time.sleep(fault.delay)
        if isinstance(outcome, EmulatorError):
            raise outcome
        return self._reply(outcome, request_id)

    def _operation(
        self,
        path: str,
        host: str,
        query: dict[str, str],
        entry: dict[str, Any],
        body_bytes: bytes,
    ) -> ServiceResponse:
        r: Route = route(self.command, path)
        entry["operation"] = r.operation
        api_version = check_api_version(query.get("api-version"))
        body = parse_request_body(body_bytes)
        return self.server.service.handle(
            ServiceRequest(
                route=r,
                host=host,
                api_version=api_version,
                query=query,
                body=body,
                authorities=self.server.identity.authorities,
            )
        )

    def _checked_host(self) -> str:
        """The request's Host, if it names this emulator (kids are built from it).

        Raises:
            BadParameterError: reason ``bad_host``.
        """
        values = self.headers.get_all("Host") or []
        host = values[0].strip().lower() if len(values) == 1 else ""
        identity = self.server.identity
        if host not in identity.authorities:
            raise BadParameterError(
                "the Host header must name this emulator: one of " + identity.describe(),
                reason="bad_host",
            )
        return host

    def _reply(self, response: ServiceResponse, request_id: str) -> int:
        self._send(response.status, response.body, request_id=request_id)
        return response.status

    def _fault(self, fault: FaultRule, request_id: str) -> int | None:
        """Apply a fault; the status sent, or None for a dropped connection."""
        if fault.kind == "drop":
            self._drop()
            return None
        extra = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        if fault.kind == "429":
            body = {
                "error": {
                    "code": "Throttled",
                    "message": "Request was not processed "
                    "because too many requests were received (injected fault).",
                }
            }
            self._send(429, body, request_id=request_id, extra=extra)
            return 429
        body = {
            "error": {
                "code": "ServiceUnavailable",
                "message": "The service is unavailable (injected fault).",
            }
        }
        self._send(503, body, request_id=request_id, extra=extra)
        return 503

    # --- admin ---------------------------------------------------------------------------------

    def _admin(self, path: str, query: dict[str, str]) -> None:
        request_id = str(uuid.uuid4())
        try:
            if not _is_loopback(self.client_address[0]):
                self._skip_body()
                raise PathNotFoundError(f"{path} is not part of the Key Vault keys API")
            body_bytes = self._read_body()
            status, body = self._admin_op(path, query, body_bytes)
            self._send(status, body, request_id=request_id)
        except EmulatorError as exc:
            self._send(exc.status, exc.to_body(), request_id=request_id)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True

    def _admin_op(
        self, path: str, query: dict[str, str], body_bytes: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        faults = self.server.faults
        method = self.command
        if path == "/_admin/health" and method == "GET":
            return 200, {"status": "ok", "last_request_seq": self.server.request_log.last_seq}
        if path == "/_admin/requests" and method == "GET":
            try:
                since = int(query.get("since", "0"))
            except ValueError:
                raise BadParameterError("since must be an integer", reason="bad_input") from None
            return 200, {"value": self.server.request_log.since(since)}
        if path == "/_admin/faults":
            if method == "GET":
                return 200, {"value": faults.rules()}
            if method == "POST":
                try:
                    doc = json.loads(body_bytes or b"null")
                except ValueError:
                    raise BadParameterError(
                        "the fault rule is not JSON", reason="bad_fault_rule"
                    ) from None
                rule = faults.add(doc)
                LOG.info("fault rule added: %s", rule.to_json())
                return 201, rule.to_json()
            if method == "DELETE":
                faults.clear()
                return 204, None
        if path == "/_admin/limits" and method == "GET":
            return 200, self.server.service.limits_status()
        if path == "/_admin/limits/reset" and method == "POST":
            if self.server.service.limits is not None:
                self.server.service.limits.reset()
            return 204, None
        if path.startswith("/_admin/faults/") and method == "DELETE":
            try:
                rule_id = int(path.rsplit("/", 1)[1])
            except ValueError:
                raise PathNotFoundError("no such fault rule") from None
            if not faults.remove(rule_id):
                raise PathNotFoundError("no such fault rule")
            return 204, None
        raise PathNotFoundError(f"no admin operation {method} {path}")


def parse_request_body(body_bytes: bytes) -> Any:
    """A request body as JSON (None when empty).

    Raises:
        BadParameterError: reason ``bad_body``: not JSON (or nested too deeply, or a number
            too long for Python's int-string limit).
    """
    if not body_bytes:
        return None
    try:
        return json.loads(body_bytes, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadParameterError("the request body is not valid JSON", reason="bad_body") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid JSON constant {name}")
