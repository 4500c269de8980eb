"""Name the endpoint that cannot be reached, and what to do about it (the CLI's clients).

A person at a terminal who gets "connection failed (ServiceRequestError)" after a minute of
retries cannot tell which of two services is down, nor what to set. The ``byok`` commands
build their SDK clients with :class:`NamingTransport`: a connection that cannot be made raises
:class:`EndpointUnreachable` (still a ``ServiceRequestError``, so the SDK's retries and every
``except AzureError`` behave as before) whose message names the endpoint, why it failed and the
fix. The Function's clients keep the SDK's own transport.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import ServiceRequestError, ServiceRequestTimeoutError
from azure.core.pipeline.transport import RequestsTransport

HSM_UNREACHABLE = "hsm_unreachable"
STORAGE_UNREACHABLE = "storage_unreachable"


@dataclass(frozen=True)
class EndpointHelp:
    """What to tell a person when one service's endpoint cannot be reached."""

    service: str  # "the HSM", "storage"
    reason: str  # the failure's reason code, e.g. "hsm_unreachable"
    local_fix: str  # the endpoint is on this machine (a local stack)
    remote_fix: str
    tls_fix: str  # the TLS handshake failed (an untrusted certificate)


class EndpointUnreachable(ServiceRequestError):
    """No connection to an endpoint; the message says which, why, and what to do."""

    def __init__(self, help_: EndpointHelp, endpoint: str, why: str, fix: str) -> None:
        super().__init__(f"{help_.service} at {endpoint} is unreachable ({why}): {fix}")
        self.reason = help_.reason
        self.endpoint = endpoint


def is_loopback(url: str) -> bool:
    """True for a URL on this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _why(exc: ServiceRequestError, timeout: float | None) -> tuple[str, bool]:
    """Why the connection failed, in a few words, and whether it was TLS."""
    text = f"{exc} {getattr(exc, 'inner_exception', '')}".lower()
    if isinstance(exc, ServiceRequestTimeoutError) or "timed out" in text:
        return (f"no connection within {timeout:g} s" if timeout else "connect timed out"), False
    if "refused" in text:
        return "connection refused", False
    if "ssl" in text or "certificate" in text:
        return "TLS handshake failed: certificate not trusted", True
    if any(m in text for m in ("resolve", "name or service", "nodename", "getaddrinfo")):
        return "host name not found", False
    return "connection failed", False


class NamingTransport(RequestsTransport):  # type: ignore[misc]  # exported lazily: Any to mypy
    """``RequestsTransport`` that turns a failed connection into :class:`EndpointUnreachable`."""

    def __init__(self, *, help_: EndpointHelp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._help = help_
        self._timeout: float | None = kwargs.get("connection_timeout")

    def send(self, request: Any, **kwargs: Any) -> Any:
        """As ``RequestsTransport.send``.

        Raises:
            EndpointUnreachable: the connection could not be made.
        """
        try:
            return super().send(request, **kwargs)
        except EndpointUnreachable:
            raise
        except ServiceRequestError as exc:
            parts = urlsplit(str(request.url))
            endpoint = f"{parts.scheme}://{parts.netloc}"
            why, tls = _why(exc, kwargs.get("connection_timeout", self._timeout))
            h = self._help
            fix = h.tls_fix if tls else (h.local_fix if is_loopback(endpoint) else h.remote_fix)
            raise EndpointUnreachable(h, endpoint, why, fix) from exc
