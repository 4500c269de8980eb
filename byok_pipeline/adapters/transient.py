"""Classify Azure SDK errors as transient or permanent, at the boundary (architecture rule 4)."""

from __future__ import annotations

import math
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)

from byok_pipeline.adapters.endpoints import (
    HSM_UNREACHABLE,
    STORAGE_UNREACHABLE,
    EndpointUnreachable,
)
from byok_pipeline.core.errors import TransientError

#: A credential that cannot get a token (no ``az login``, no managed identity, an expired login).
LOGIN_REQUIRED = "login_required"
#: Failures a person fixes (a login, a stopped service): their reason is kept wherever they
#: surface, so that the message that says what to do reaches them.
PERSON_FIXES = frozenset({LOGIN_REQUIRED, HSM_UNREACHABLE, STORAGE_UNREACHABLE})

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# A gateway timeout may leave the request running behind it. (A dropped or reset connection or a
# 500 means the server has finished with the request, done or not: looking again settles it.)
UNKNOWN_OUTCOME_STATUS = frozenset({504})


def retry_after_seconds(exc: HttpResponseError) -> float | None:
    """The service's wait, if it sent one: ``retry-after-ms`` / ``x-ms-retry-after-ms``
    (milliseconds, the precise form) before ``Retry-After`` (seconds; the HTTP-date form is
    not used by Azure and is ignored). Never negative."""
    response: Any = exc.response
    if response is None:
        return None
    headers = response.headers
    for name, scale in (
        ("retry-after-ms", 1000.0),
        ("x-ms-retry-after-ms", 1000.0),
        ("Retry-After", 1.0),
    ):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return min(seconds, 3600.0)
    return None


def is_throttling(exc: Exception) -> bool:
    """A service said "too many requests": HTTP 429, or Azure Storage's 503 ServerBusy."""
    if not isinstance(exc, HttpResponseError):
        return False
    if exc.status_code == 429:
        return True
    return exc.status_code == 503 and getattr(exc, "error_code", None) == "ServerBusy"


def as_transient(exc: Exception, what: str) -> TransientError | None:
    """A :class:`TransientError` if ``exc`` is a connection error, a credential that could not
    get a token (``login_required``: fixed by signing in, not by refusing the package) or
    408/429/5xx, else None."""
    if isinstance(exc, EndpointUnreachable):  # the CLI's clients name the endpoint and the fix
        return TransientError(f"{what}: {exc.message}", reason=exc.reason)
    if isinstance(exc, ClientAuthenticationError) and exc.response is None:
        return TransientError(
            f"{what}: no Azure access token (the credential failed): sign in with `az login`, "
            "or give the managed identity (AZURE_CLIENT_ID) access",
            reason=LOGIN_REQUIRED,
        )
    if isinstance(exc, ServiceResponseTimeoutError):  # no answer in time: may still be running
        return TransientError(f"{what}: timed out waiting for the answer", outcome_unknown=True)
    if isinstance(exc, ServiceRequestError | ServiceResponseError):  # refused, reset or dropped
        return TransientError(f"{what}: connection failed ({type(exc).__name__})")
    if isinstance(exc, HttpResponseError) and is_throttling(exc):
        return TransientError(
            f"{what}: throttled ({exc.status_code})",
            retry_after=retry_after_seconds(exc),
            reason="throttled",
            throttled=True,
        )
    if isinstance(exc, HttpResponseError) and exc.status_code in TRANSIENT_STATUS:
        return TransientError(
            f"{what}: service answered {exc.status_code}",
            retry_after=retry_after_seconds(exc),
            outcome_unknown=exc.status_code in UNKNOWN_OUTCOME_STATUS,
        )
    return None
