"""Classify Azure SDK errors as transient or permanent, at the boundary (architecture rule 4)."""

from __future__ import annotations

from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)

from byok_pipeline.core.errors import TransientError

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# A gateway timeout may leave the request running behind it. (A dropped or reset connection or a
# 500 means the server has finished with the request, done or not: looking again settles it.)
UNKNOWN_OUTCOME_STATUS = frozenset({504})


def retry_after_seconds(exc: HttpResponseError) -> float | None:
    """The service's Retry-After (seconds form), if it sent one."""
    response: Any = exc.response
    if response is None:
        return None
    value = response.headers.get("Retry-After") or response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def as_transient(exc: Exception, what: str) -> TransientError | None:
    """A :class:`TransientError` if ``exc`` is a connection error or 408/429/5xx, else None."""
    if isinstance(exc, ServiceResponseTimeoutError):  # no answer in time: may still be running
        return TransientError(f"{what}: timed out waiting for the answer", outcome_unknown=True)
    if isinstance(exc, ServiceRequestError | ServiceResponseError):  # refused, reset or dropped
        return TransientError(f"{what}: connection failed ({type(exc).__name__})")
    if isinstance(exc, HttpResponseError) and exc.status_code in TRANSIENT_STATUS:
        return TransientError(
            f"{what}: service answered {exc.status_code}",
            retry_after=retry_after_seconds(exc),
            outcome_unknown=exc.status_code in UNKNOWN_OUTCOME_STATUS,
        )
    return None
