"""Typed errors of the emulator, each with an HTTP status, a Key Vault error code and a reason.

Every refusal the emulator answers with is one of these. ``code`` is what Key Vault puts in
``{"error": {"code": ...}}``; ``reason`` is this emulator's stable, finer-grained code (sent as
``error.innererror.code``, and named in the message). Messages never contain key material.
"""

from __future__ import annotations

from typing import Any


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


class StartupError(Exception):
    """The emulator cannot start: bad data directory, options or fault rules.

    Carries a ``reason`` code like the request errors; never key material.
    """

    def __init__(self, message: str, *, reason: str = "startup") -> None:
        super().__init__(message)
        self.reason = reason
