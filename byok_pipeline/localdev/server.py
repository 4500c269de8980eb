"""``byok serve``'s HTTP server: the Function app's HTTP routes and the dashboard on a local
port, answered by the same :mod:`byok_pipeline.processing.runtime` functions the Function calls.

Routes (GET only)::

    /, /api/dashboard        the dashboard (HTML, with its Content-Security-Policy)
    /api/packages[?state=S]  status summaries (JSON), as the Function's list_packages
    /api/packages/NAME       one package (NAME percent-encoded), as get_package
    /api/kek                 the configured KEK, as get_kek

Standard library only (:class:`~http.server.ThreadingHTTPServer`). Bound to the loopback
address by default; on a loopback address a request whose ``Host`` is not that address (a web
page trying DNS rebinding) is refused. Nothing is logged per request: request paths carry
names chosen by whoever uploads.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from byok_pipeline.core.dashboard import TrailStatus
from byok_pipeline.core.errors import ConfigError
from byok_pipeline.processing import runtime

_JSON_HEADERS = {
    "Content-Type": "application/json",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
_PACKAGE_PREFIX = "/api/packages/"


class ServeError(ConfigError):
    """The server could not start: the reason says why (``port_in_use``, ``bad_address``)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DashboardServer(ThreadingHTTPServer):
    """One server; ``trail_check`` (optional) verifies the audit trail for each dashboard view."""

    daemon_threads = True

    def __init__(
        self, host: str, port: int, *, trail_check: Callable[[], TrailStatus] | None = None
    ) -> None:
        """Bind ``host:port`` (port 0: any free port).

        Raises:
            ServeError: the port is in use, or the address cannot be bound.
        """
        self.trail_check = trail_check
        if ":" in host:  # an IPv6 address
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host.strip("[]"), port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"port {port} on {host} is already in use: stop what uses it or pick "
                    "another with --port N (0: any free port)",
                    reason="port_in_use",
                ) from None
            raise ServeError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}", reason="bad_address"
            ) from None
        self.host = host.strip("[]")
        self.allowed_hosts = _allowed_hosts(host, self.port) if is_loopback(host) else None

    def handle_error(self, request: object, client_address: object) -> None:  # noqa: ARG002  # socketserver's signature
        """One line on stderr, never a traceback (a browser that went away, a bug)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return  # the client closed the connection: nothing to report
        print(f"byok serve: a request failed: {type(exc).__name__}", file=sys.stderr)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def _allowed_hosts(host: str, port: int) -> frozenset[str]:
    names = {f"[{host}]" if ":" in host else host, "localhost", "127.0.0.1", "[::1]"}
    return frozenset(f"{n}:{port}" for n in names)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer

    def version_string(self) -> str:
        return "byok-serve"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  # the base class's name
        """Quiet: request paths carry uploader-chosen names (terminal escapes included)."""

    def do_GET(self) -> None:
        allowed = self.server.allowed_hosts
        if allowed is not None and (self.headers.get("Host") or "").lower() not in allowed:
            self._json(421, {"error": "wrong_host", "message": "use the URL byok serve printed"})
            return
        parts = urlsplit(self.path)
        path = parts.path
        if path in ("/", "/api/dashboard"):
            status, body, headers = runtime.dashboard(self.server.trail_check)
            self._send(status, body, headers)
        elif path in ("/api/packages", "/api/packages/"):
            states = parse_qs(parts.query).get("state")
            self._send(*runtime.list_packages(states[0] if states else None), _JSON_HEADERS)
        elif path.startswith(_PACKAGE_PREFIX):
            name = unquote(path[len(_PACKAGE_PREFIX) :])
            self._send(*runtime.get_package(name), _JSON_HEADERS)
        elif path == "/api/kek":
            self._send(*runtime.get_kek(), _JSON_HEADERS)
        else:
            self._json(404, {"error": "not_found", "message": "no such route"})

    def do_HEAD(self) -> None:
        self._json(405, {"error": "method_not_allowed", "message": "GET only"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD  # noqa: N815  # http.server's names

    def _json(self, status: int, body: dict[str, str]) -> None:
        self._send(status, json.dumps(body).encode(), _JSON_HEADERS)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
