"""What the pipeline needs to know about a KEK, independent of the SDK's types."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class KekFacts:
    """A KEK as read from the HSM by its exact version."""

    kid: str
    kty: str
    key_ops: tuple[str, ...]
    enabled: bool
    not_before: datetime | None
    expires_on: datetime | None
    public_key: rsa.RSAPublicKey | None  # None when kty is not RSA
