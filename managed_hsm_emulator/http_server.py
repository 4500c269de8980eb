"""HTTPS transport: authentication, fault injection, request log, admin endpoints, routing.

Order for every Key Vault request, as the real service does it: a request without a bearer
token gets the ``401`` challenge before anything else is looked at; then the token is checked;
then faults apply; then api-version, Host and body are validated and the operation runs.

Admin endpoints (``/_admin/...``, loopback clients only, no token, never faulted or logged):

- ``GET /_admin/health``
- ``GET /_admin/requests?since=SEQ``: request log entries after ``SEQ``
- ``GET /_admin/faults``, ``POST /_admin/faults`` (a rule, see :mod:`.faults`),
  ``DELETE /_admin/faults`` (all), ``DELETE /_admin/faults/{id}``
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
_HOST_RE = re.compile(r"^([a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\])(:[0-9]{1,5})?$")
_JSON = "application/json; charset=utf-8"


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
        super().__init__(address, KeyVaultHandler)

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
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KeyVaultHandler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = "managed-hsm-emulator"
    sys_version = ""
    timeout = 120
    server: EmulatorHTTPServer

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

    def _read_body(self) -> bytes:
        length_text = self.headers.get("Content-Length") or "0"
        try:
            length = int(length_text)
        except ValueError:
            self.close_connection = True
            raise BadParameterError("Content-Length is not a number", reason="bad_body") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise PayloadTooLargeError(f"request bodies are limited to {MAX_BODY} bytes")
        return self.rfile.read(length) if length > 0 else b""

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
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            LOG.debug("socket already closed while dropping a connection")

    # --- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
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
            "reason": None,
        }
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        entry["api_version"] = clean_header(query.get("api-version"))
        status: int | None = 500
        try:
            status = self._keyvault(parts.path, query, entry, request_id)
        except EmulatorError as exc:
            status = exc.status
            entry["reason"] = exc.reason
            extra = {"WWW-Authenticate": CHALLENGE} if exc.status == 401 else None  # HTTP status
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
        body_bytes = self._read_body()
        auth = self.headers.get("Authorization")
        if not auth or not auth.startswith("Bearer "):
            raise UnauthorizedError(
                "AKV10000: Request is missing a Bearer or PoP token.", reason="no_token"
            )
        verify_token(self.server.token_key, auth[len("Bearer ") :].strip(), now=self.server.clock())
        fault = self.server.faults.pick(self.command, path)
        if fault is not None:
            entry["fault"] = fault.kind
            if fault.kind == "delay":
                time.sleep(fault.delay)
            else:
                return self._fault(fault, request_id)
        r: Route = route(self.command, path)
        entry["operation"] = r.operation
        api_version = check_api_version(query.get("api-version"))
        host = (self.headers.get("Host") or "").strip().lower()
        if not _HOST_RE.match(host):
            raise BadParameterError("the Host header is missing or invalid", reason="bad_host")
        body: Any = None
        if body_bytes:
            try:
                body = json.loads(body_bytes, parse_constant=_reject_constant)
            except (ValueError, RecursionError):
                raise BadParameterError(
                    "the request body is not valid JSON", reason="bad_body"
                ) from None
        response: ServiceResponse = self.server.service.handle(
            ServiceRequest(route=r, host=host, api_version=api_version, query=query, body=body)
        )
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
            body_bytes = self._read_body()
            if not _is_loopback(self.client_address[0]):
                raise PathNotFoundError(f"{path} is not part of the Key Vault keys API")
            status, body = self._admin_op(path, query, body_bytes)
            self._send(status, body, request_id=request_id)
        except EmulatorError as exc:
            self._send(exc.status, exc.to_body(), request_id=request_id)

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
        if path.startswith("/_admin/faults/") and method == "DELETE":
            try:
                rule_id = int(path.rsplit("/", 1)[1])
            except ValueError:
                raise PathNotFoundError("no such fault rule") from None
            if not faults.remove(rule_id):
                raise PathNotFoundError("no such fault rule")
            return 204, None
        raise PathNotFoundError(f"no admin operation {method} {path}")


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid JSON constant {name}")
