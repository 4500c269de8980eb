"""Domain errors of the pipeline. Every error carries a stable reason code (see reasons.py).

- :class:`Rejected`: the package is refused for good; retrying cannot help.
- :class:`TransientError`: a dependency (HSM, storage) failed in a way a retry may fix.
- :class:`InProgress`: another worker holds the package; the platform should redeliver later.
"""

from __future__ import annotations

from offline_packager.errors import ByokError


class PipelineError(ByokError):
    """Base class of pipeline errors."""

    reason = "pipeline_error"


class Rejected(PipelineError):
    """A non-transient refusal with a reason code from :data:`byok_pipeline.core.reasons.REASONS`."""

    def __init__(self, reason: str, message: str, *, service_code: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.service_code = service_code


class TransientError(PipelineError):
    """Retryable failure (429, 5xx, connection). ``retry_after`` in seconds when the service said."""

    reason = "transient"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        reason: str = "transient",
        outcome_unknown: bool = False,
        throttled: bool = False,
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after
        # True when a service said "too many requests" (429): nothing was done, and waiting is
        # the whole remedy. Never counted as a failed attempt.
        self.throttled = throttled
        # True when a request was sent and may still be running at the service (a client
        # timeout, a 504): looking for its effect now cannot settle whether it will happen.
        self.outcome_unknown = outcome_unknown


class InProgress(PipelineError):
    """Another invocation is processing this package right now."""

    reason = "in_progress"


class ConfigError(PipelineError):
    """A setting is missing or invalid."""

    reason = "config_error"
