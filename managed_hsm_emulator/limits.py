"""Service-limits mode: Managed HSM's published rate and object limits, optionally scaled.

Off by default; ``--limits managed-hsm`` turns it on (README "Service limits mode" gives every
number with its source). In this mode:

- **Rates.** Each key name belongs to one of :data:`PARTITIONS` partitions
  (:func:`partition_of`: SHA-256 of the lower-cased name, first 8 bytes big-endian, modulo 3).
  Each partition has one token bucket per limit class: ``create`` (create *and* import: an
  import creates a key version), ``get``, ``delete``, ``purge`` and one per crypto operation and
  key type (``sign RSA-2048``, ``verify EC P-521``, ``unwrapKey oct-256``...). A bucket refills
  at the published operations per second times ``scale`` and holds at most
  ``max(1, rate * BURST_SECONDS)`` tokens (it starts full). A request that finds no token is
  refused with :class:`~.errors.ThrottledError` (429) and takes nothing: Key Vault does not count
  throttled requests against its limits. Any other outcome (success, or a refusal such as 404 or
  a quota) has spent its token.
- **Objects.** A create or import of a new key name when the HSM holds ``max_keys`` keys (live
  or soft-deleted, not yet purged) is refused with :class:`~.errors.HsmKeyLimitError`; one that
  would give a key more than ``max_versions_per_key`` versions with
  :class:`~.errors.KeyVersionLimitError` (both 403; the service's own status and codes are not
  public).

Operations without a published figure (list, update, recover, get deleted, random bytes, AES
encrypt/decrypt) are not limited. Clock injectable (monotonic seconds).
"""

from __future__ import annotations

import collections
import hashlib
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    EmulatorError,
    HsmKeyLimitError,
    KeyVersionLimitError,
    StartupError,
    ThrottledError,
)

PROFILE = "managed-hsm"
PROFILES = (PROFILE,)
PARTITIONS = 3
BURST_SECONDS = 0.1
DEFAULT_MAX_KEYS = 5000
DEFAULT_MAX_VERSIONS_PER_KEY = 100

# Operations per second of one partition, from the Managed HSM scaling guidance
# (articles/key-vault/managed-hsm/scaling-guidance.md in MicrosoftDocs/azure-security-docs:
# "approximate maximum throughput with at least one partition available").
CLASS_RATES: Mapping[str, float] = {"create": 1.0, "get": 1100.0, "delete": 10.0, "purge": 10.0}
_OPERATION_CLASS: Mapping[str, str] = {
    "create_key": "create",
    "import_key": "create",
    "get_key": "get",
    "get_key_attestation": "get",
    "delete_key": "delete",
    "purge_deleted_key": "purge",
}
_RSA_SIZES = ("RSA-2048", "RSA-3072", "RSA-4096")
_EC_CURVES = ("EC P-256", "EC P-256K", "EC P-384", "EC P-521")
_AES_SIZES = ("oct-128", "oct-192", "oct-256")
_CRYPTO_TABLES: tuple[tuple[tuple[str, ...], Mapping[str, tuple[float, ...]]], ...] = (
    (
        _RSA_SIZES,
        {
            "encrypt": (2800, 2700, 2300),
            "decrypt": (1100, 360, 160),
            "wrapKey": (2200, 1900, 1900),
            "unwrapKey": (1100, 360, 160),
            "sign": (900, 340, 150),
            "verify": (3400, 3400, 3700),
        },
    ),
    (_EC_CURVES, {"sign": (330, 330, 160, 200), "verify": (130, 130, 82, 28)}),
    (_AES_SIZES, {"wrapKey": (2100, 2100, 2100), "unwrapKey": (1800, 1900, 2200)}),
)
CRYPTO_RATES: Mapping[str, float] = {
    f"{op} {key_type}": float(rate)
    for key_types, table in _CRYPTO_TABLES
    for op, rates in table.items()
    for key_type, rate in zip(key_types, rates, strict=True)
}


def partition_of(name: str) -> int:
    """The partition (0-2) of a key name: SHA-256 of the lower-cased name, mod 3."""
    digest = hashlib.sha256(name.lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % PARTITIONS


def limit_class(operation: str, key_type: str | None = None) -> str | None:
    """The limit class of an operation (a route operation, or a crypto operation such as
    ``sign`` with the key type as :meth:`.KeyMaterial.describe` gives it), or None: unlimited."""
    if key_type is not None:
        label = f"{operation} {key_type}"
        return label if label in CRYPTO_RATES else None
    return _OPERATION_CLASS.get(operation)


def base_rate(label: str) -> float:
    """Published operations per second of one partition for a limit class."""
    return CLASS_RATES[label] if label in CLASS_RATES else CRYPTO_RATES[label]


@dataclass(frozen=True)
class LimitsConfig:
    """The service-limits mode's options (``--limits``, ``--limits-scale``, ``--max-keys``,
    ``--max-versions-per-key``)."""

    profile: str = PROFILE
    scale: float = 1.0
    max_keys: int = DEFAULT_MAX_KEYS
    max_versions_per_key: int = DEFAULT_MAX_VERSIONS_PER_KEY

    @classmethod
    def from_options(
        cls,
        profile: str | None,
        *,
        scale: float | None = None,
        max_keys: int | None = None,
        max_versions_per_key: int | None = None,
    ) -> LimitsConfig | None:
        """The configuration the options ask for; None when ``profile`` is None (mode off).

        Raises:
            StartupError: reason ``bad_limits``: unknown profile, scale not a positive finite
                number, limits below 1, or a limit option without ``--limits``.
        """
        if profile is None:
            if (scale, max_keys, max_versions_per_key) != (None, None, None):
                raise StartupError(
                    "--limits-scale, --max-keys and --max-versions-per-key need --limits "
                    f"{PROFILE}",
                    reason="bad_limits",
                )
            return None
        if profile not in PROFILES:
            raise StartupError(
                f"--limits must be one of {', '.join(PROFILES)}", reason="bad_limits"
            )
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise StartupError("--limits-scale must be a number > 0", reason="bad_limits")
        options = (("--max-keys", max_keys), ("--max-versions-per-key", max_versions_per_key))
        for option, value in options:
            if value is not None and value < 1:
                raise StartupError(f"{option} must be at least 1", reason="bad_limits")
        return cls(
            profile=profile,
            scale=1.0 if scale is None else scale,
            max_keys=DEFAULT_MAX_KEYS if max_keys is None else max_keys,
            max_versions_per_key=(
                DEFAULT_MAX_VERSIONS_PER_KEY
                if max_versions_per_key is None
                else max_versions_per_key
            ),
        )

    def rate(self, label: str) -> float:
        """Operations per second one partition admits for a limit class, after scaling."""
        return base_rate(label) * self.scale


# What the bucket's arithmetic may lose: a client that waited exactly the advertised time must
# find a whole token.
_EPSILON = 1e-9


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` held; starts full."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is there (none taken)."""
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate


class ServiceLimits:
    """Token buckets per partition and limit class, object limits, and counters."""

    def __init__(
        self, config: LimitsConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[int, str], TokenBucket] = {}
        self._admitted: collections.Counter[str] = collections.Counter()
        self._throttled: collections.Counter[str] = collections.Counter()
        self._throttled_by_partition = [0] * PARTITIONS
        self._refused: collections.Counter[str] = collections.Counter()

    def admit(self, operation: str, name: str | None, *, key_type: str | None = None) -> None:
        """Let one request through, or refuse it. ``operation``: a route operation, or the crypto
        operation (``sign``, ``wrapKey``...) with ``key_type`` (e.g. ``RSA-2048``).

        Raises:
            ThrottledError: the partition's bucket for this limit class is empty.
        """
        label = limit_class(operation, key_type)
        if label is None or name is None:
            return
        partition = partition_of(name)
        rate = self.config.rate(label)
        with self._lock:
            key = (partition, label)
            bucket = self._buckets.get(key)
            now = self._clock()
            if bucket is None:
                bucket = TokenBucket(rate, max(1.0, rate * BURST_SECONDS), now)
                self._buckets[key] = bucket
            wait = bucket.take(now)
            if wait == 0.0:
                self._admitted[operation] += 1
                return
            self._throttled[operation] += 1
            self._throttled_by_partition[partition] += 1
        raise ThrottledError(
            f"managed-hsm-emulator: {label} on partition {partition} of {PARTITIONS} admits "
            f"{rate:g} per second; retry in {wait:.3f} s",
            retry_after=wait,
        )

    def check_new_version(
        self, name: str, *, versions: int | None, keys_held: Callable[[], int]
    ) -> None:
        """Refuse a create or import over an object limit. ``versions``: how many the key has,
        None for a new key name (then ``keys_held()``, the keys the HSM holds, matters).

        Raises:
            HsmKeyLimitError: reason ``hsm_key_limit``: a new name, and ``max_keys`` are held.
            KeyVersionLimitError: reason ``key_version_limit``: the key has
                ``max_versions_per_key`` versions.
        """
        error: EmulatorError | None = None
        if versions is not None and versions >= self.config.max_versions_per_key:
            error = KeyVersionLimitError(
                f"cannot add a version to key {name}: it has {versions} versions, the limit "
                f"per key is {self.config.max_versions_per_key}; use a new key name"
            )
        elif versions is None and (held := keys_held()) >= self.config.max_keys:
            error = HsmKeyLimitError(
                f"cannot create key {name}: this HSM holds {held} keys (live and "
                f"soft-deleted), its limit is {self.config.max_keys}; purge keys it no longer "
                "needs"
            )
        if error is not None:
            with self._lock:
                self._refused[error.reason] += 1
            raise error

    def reset(self) -> None:
        """Refill every bucket and zero the counters (tests, benchmarks)."""
        with self._lock:
            self._buckets.clear()
            self._admitted.clear()
            self._throttled.clear()
            self._throttled_by_partition = [0] * PARTITIONS
            self._refused.clear()

    def snapshot(self) -> dict[str, Any]:
        """Configuration, scaled rates per partition and counters (``GET /_admin/limits``)."""
        labels = [*CLASS_RATES, *CRYPTO_RATES]
        with self._lock:
            return {
                "enabled": True,
                "profile": self.config.profile,
                "scale": self.config.scale,
                "partitions": PARTITIONS,
                "burst_seconds": BURST_SECONDS,
                "max_keys": self.config.max_keys,
                "max_versions_per_key": self.config.max_versions_per_key,
                "rates": {label: self.config.rate(label) for label in labels},
                "admitted": dict(self._admitted),
                "throttled": dict(self._throttled),
                "throttled_by_partition": list(self._throttled_by_partition),
                "refused": {
                    HsmKeyLimitError.reason: self._refused[HsmKeyLimitError.reason],
                    KeyVersionLimitError.reason: self._refused[KeyVersionLimitError.reason],
                },
            }
