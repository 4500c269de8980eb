"""Typed errors of the emulator, each with an HTTP status, a Key Vault error code and a reason.

Every refusal the emulator answers with is one of these. ``code`` is what Key Vault puts in
``{"error": {"code": ...}}``; ``reason`` is this emulator's stable, finer-grained code (sent as
``error.innererror.code``, and named in the message). Messages never contain key material.
"""

from __future__ import annotations

import math
from typing import Any

# Error codes of the service-limits mode (see README "Service limits mode"). "Throttled" and the
# message prefix are what Key Vault sends with a 429 (confirmed); the two quota codes are this
# emulator's choice: the service's own codes for them are not public.
THROTTLED_CODE = "Throttled"
THROTTLED_MESSAGE = "Request was not processed because too many requests were received."
HSM_KEY_LIMIT_CODE = "HsmKeyLimitExceeded"
KEY_VERSION_LIMIT_CODE = "KeyVersionLimitExceeded"
HSM_KEY_LIMIT_REASON = "hsm_key_limit"
KEY_VERSION_LIMIT_REASON = "key_version_limit"


class EmulatorError(Exception):
    """Base class: a refusal answered with ``status`` and Key Vault's error shape."""

    status: int = 500
    code: str = "InternalError"
    reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason

    def headers(self) -> dict[str, str]:
        """Response headers this refusal adds (none, unless a subclass says otherwise)."""
        return {}

    def to_body(self) -> dict[str, Any]:
        """The JSON body Key Vault sends for this error."""
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "innererror": {"code": self.reason},
            }
        }


class BadParameterError(EmulatorError):
    """400: the request is malformed or asks for something the service refuses."""

    status = 400
    code = "BadParameter"
    reason = "bad_parameter"


class UnauthorizedError(EmulatorError):
    """401: no, forged, wrong-audience or expired token."""

    status = 401
    code = "Unauthorized"
    reason = "unauthorized"


class ForbiddenError(EmulatorError):
    """403: the key exists but may not be used this way (disabled, outside nbf/exp, key_ops)."""

    status = 403
    code = "Forbidden"
    reason = "forbidden"


class KeyNotFoundError(EmulatorError):
    """404: no such key, key version or deleted key."""

    status = 404
    code = "KeyNotFound"
    reason = "key_not_found"


class PathNotFoundError(EmulatorError):
    """404: no such path in the Key Vault keys API."""

    status = 404
    code = "NotFound"
    reason = "no_such_path"


class MethodNotAllowedError(EmulatorError):
    """405: the path exists but not with this method."""

    status = 405
    code = "MethodNotAllowed"
    reason = "method_not_allowed"


class ConflictError(EmulatorError):
    """409: the name is held by a soft-deleted key, or a concurrent change won."""

    status = 409
    code = "Conflict"
    reason = "conflict"


class PayloadTooLargeError(EmulatorError):
    """413: the request body is over the emulator's limit."""

    status = 413
    code = "RequestEntityTooLarge"
    reason = "too_large"


class ThrottledError(EmulatorError):
    """429: over a rate limit of the service-limits mode; nothing was done.

    The body is Key Vault's throttling body (``code`` and ``message`` only, no ``innererror``);
    ``retry_after`` (seconds, exact) becomes ``Retry-After`` (whole seconds, rounded up) and
    ``x-ms-retry-after-ms`` (milliseconds, rounded up).
    """

    status = 429
    code = THROTTLED_CODE
    reason = "throttled"

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(f"{THROTTLED_MESSAGE} ({detail})")
        self.retry_after = retry_after

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def headers(self) -> dict[str, str]:
        millis = max(1, math.ceil(self.retry_after * 1000))
        return {"Retry-After": str(math.ceil(millis / 1000)), "x-ms-retry-after-ms": str(millis)}


class HsmKeyLimitError(EmulatorError):
    """403: a create or import of a new key name would exceed the keys per HSM."""

    status = 403
    code = HSM_KEY_LIMIT_CODE
    reason = HSM_KEY_LIMIT_REASON


class KeyVersionLimitError(EmulatorError):
    """403: a create or import would give a key more versions than allowed."""

    status = 403
    code = KEY_VERSION_LIMIT_CODE
    reason = KEY_VERSION_LIMIT_REASON


class StartupError(Exception):
    """The emulator cannot start: bad data directory, options or fault rules.

    Carries a ``reason`` code like the request errors; never key material.
    """

    def __init__(self, message: str, *, reason: str = "startup") -> None:
        super().__init__(message)
        self.reason = reason
