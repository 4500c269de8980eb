"""Settings, read from the environment on demand (never at import time).

The Function app and every ``byok`` command read the same variables; CLI flags override.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from byok_pipeline.core.errors import ConfigError
from offline_packager.keytypes import TARGET_TYPES

DEFAULTS = {
    "BYOK_INCOMING_CONTAINER": "byok-incoming",
    "BYOK_STATUS_CONTAINER": "byok-status",
    "BYOK_ARCHIVE_CONTAINER": "byok-archive",
    "BYOK_QUARANTINE_CONTAINER": "byok-quarantine",
    "BYOK_AUDIT_CONTAINER": "byok-audit",
    "BYOK_AUDIT_PEOPLE_CONTAINER": "byok-audit-people",
    "BYOK_CONFIG_CONTAINER": "byok-config",
    "BYOK_POLICY_BLOB": "import-policy.json",
    "BYOK_APPROVALS_CONTAINER": "byok-approvals",
    "BYOK_MAX_PACKAGE_BYTES": "65536",
    "BYOK_MAX_ATTEMPTS": "5",
    "BYOK_RETRY_TOTAL": "4",
    "BYOK_RETRY_BACKOFF_SECONDS": "0.8",
    "BYOK_RETRY_BACKOFF_MAX_SECONDS": "30",
    "BYOK_LEASE_SECONDS": "60",
    "BYOK_RECONCILE_SCHEDULE": "0 */10 * * * *",
    "BYOK_HSM_IMPORTS_PER_SECOND": "2",
    "BYOK_THROTTLE_WAIT_SECONDS": "20",
    "BYOK_HSM_MAX_KEYS": "5000",
    "BYOK_HSM_MAX_VERSIONS_PER_KEY": "100",
    "BYOK_POLICY_CACHE_SECONDS": "5",
    "BYOK_CLI_CONNECT_TIMEOUT_SECONDS": "3",
}

#: Every setting, for the README table and local.settings.example.json (a test compares them).
SETTINGS_DOC: dict[str, str] = {
    "BYOK_HSM_URL": "Managed HSM URL, https://<name>.managedhsm.azure.net (required)",
    "BYOK_KEK_KID": "The KEK custodians should wrap under (shown by GET /api/kek); optional",
    "BYOK_STORAGE": "Storage connection: a connection string locally; in Azure use "
    "BYOK_STORAGE__blobServiceUri (+ __credential=managedidentity, __clientId)",
    "BYOK_INCOMING_CONTAINER": "Container packages are dropped into",
    "BYOK_STATUS_CONTAINER": "Container of the status documents",
    "BYOK_ARCHIVE_CONTAINER": "Where imported (and duplicate) packages are moved",
    "BYOK_QUARANTINE_CONTAINER": "Where rejected and failed packages are moved",
    "BYOK_AUDIT_CONTAINER": "Container of the audit trail",
    "BYOK_AUDIT_PEOPLE_CONTAINER": "Container of the audit chains people's CLI commands write (KEK, policy, byok import)",
    "BYOK_AUDIT_SIGNING_KID": "Versioned kid of the pipeline's audit signing key: EC P-256 in the HSM, sign only (`byok audit init`)",
    "BYOK_AUDIT_PERSON_KEY": "CLI only: the person's audit signing key, an EC P-256 PEM file or a versioned HSM kid",
    "BYOK_CONFIG_CONTAINER": "Container of the import policy (written by policy administrators only)",
    "BYOK_POLICY_BLOB": "Blob name of the import policy in BYOK_CONFIG_CONTAINER; absent: safe defaults",
    "BYOK_POLICY_REQUIRED": "true: a missing policy blob stops every import (policy_invalid) instead of falling back to the safe defaults (Azure: true)",
    "BYOK_APPROVALS_CONTAINER": "Container of packages' manifests and signed approvals (<package sha256>/...)",
    "BYOK_AUDIT_LOG": "Local JSON-lines audit file (local runs); optional",
    "BYOK_TELEMETRY_LOG": "Local JSON-lines telemetry file when Application Insights is not set "
    "(default: telemetry.jsonl beside BYOK_AUDIT_LOG)",
    "BYOK_MAX_PACKAGE_BYTES": "Size cap of a package in bytes",
    "BYOK_MAX_ATTEMPTS": "Deliveries with transient failures before a package ends 'failed'",
    "BYOK_RETRY_TOTAL": "In-invocation retries of a transient HSM/storage error",
    "BYOK_RETRY_BACKOFF_SECONDS": "Base of the exponential backoff between retries",
    "BYOK_RETRY_BACKOFF_MAX_SECONDS": "Cap of one backoff wait (a Retry-After beyond it fails the try)",
    "BYOK_LEASE_SECONDS": "Lease on a package's status while one worker processes it (15-60)",
    "BYOK_RECONCILE_SCHEDULE": "NCRONTAB schedule of the reconciler timer (Function app only)",
    "BYOK_HSM_IMPORTS_PER_SECOND": "Import PUTs per second a worker sends at most (Managed HSM admits "
    "~1 key creation/s per partition; plan for 2); it slows down on every 429 and creeps back",
    "BYOK_THROTTLE_WAIT_SECONDS": "Longest a delivery waits for the HSM's pace before handing the "
    "package back to be redelivered (never counted as an attempt)",
    "BYOK_HSM_MAX_KEYS": "Managed HSM's key limit per HSM (5,000): a new key name past it is "
    "refused hsm_key_limit before the import",
    "BYOK_HSM_MAX_VERSIONS_PER_KEY": "Managed HSM's version limit per key (100): a new version past "
    "it is refused key_version_limit before the import",
    "BYOK_POLICY_CACHE_SECONDS": "How long a worker trusts the import policy it read before asking "
    "storage again (0: every package)",
    "BYOK_CLI_CONNECT_TIMEOUT_SECONDS": "CLI only: seconds a `byok` command waits for a "
    "connection to storage or the HSM (tried twice) before it names the unreachable endpoint "
    "and the fix",
    "BYOK_ALLOWED_KEK_NAMES": "Comma list of KEK names packages may use; empty allows any",
    "BYOK_ALLOWED_TARGET_TYPES": "Comma list of target types (rsa-3072, oct-256, ...); empty allows any",
    "AZURE_CLIENT_ID": "Client id of the user-assigned managed identity (Azure)",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "Enables export of telemetry to Application Insights",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=AAD;ClientId=<identity client id>: "
    "Entra ID ingestion (the Bicep sets it; local auth is off on the component)",
    "BYOK_HSM_CA_BUNDLE": "CA file to trust for the HSM endpoint (local emulator only)",
    "BYOK_HSM_EMULATOR_DIR": "Emulator data dir: use its credential (local runner only)",
}


N = TypeVar("N", int, float)


def _csv(value: str | None) -> frozenset[str]:
    return frozenset(v.strip() for v in (value or "").split(",") if v.strip())


def _flag(env: Mapping[str, str], name: str) -> bool:
    """``true``/``1``/``yes`` or ``false``/``0``/``no``/empty.

    Raises:
        ConfigError: anything else.
    """
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _number(env: Mapping[str, str], name: str, low: N, high: N) -> N:
    """``name`` as a number of the bounds' type, within [low, high].

    Raises:
        ConfigError: not a number of that type, or out of range.
    """
    raw = env.get(name) or DEFAULTS[name]
    kind = type(low)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}"
        ) from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}")
    return value


@dataclass(frozen=True)
class Settings:
    """Validated settings. Build with :meth:`from_env`."""

    hsm_url: str
    incoming_container: str = DEFAULTS["BYOK_INCOMING_CONTAINER"]
    status_container: str = DEFAULTS["BYOK_STATUS_CONTAINER"]
    archive_container: str = DEFAULTS["BYOK_ARCHIVE_CONTAINER"]
    quarantine_container: str = DEFAULTS["BYOK_QUARANTINE_CONTAINER"]
    audit_container: str = DEFAULTS["BYOK_AUDIT_CONTAINER"]
    audit_people_container: str = DEFAULTS["BYOK_AUDIT_PEOPLE_CONTAINER"]
    audit_signing_kid: str | None = None
    audit_person_key: str | None = None
    config_container: str = DEFAULTS["BYOK_CONFIG_CONTAINER"]
    policy_blob: str = DEFAULTS["BYOK_POLICY_BLOB"]
    policy_required: bool = False
    approvals_container: str = DEFAULTS["BYOK_APPROVALS_CONTAINER"]
    max_package_bytes: int = 65536
    max_attempts: int = 5
    retry_total: int = 4
    retry_backoff: float = 0.8
    retry_backoff_max: float = 30.0
    lease_seconds: int = 60
    hsm_imports_per_second: float = 2.0
    throttle_wait_seconds: float = 20.0
    hsm_max_keys: int = 5000
    hsm_max_versions_per_key: int = 100
    policy_cache_seconds: float = 5.0
    cli_connect_timeout: float = 3.0
    allowed_kek_names: frozenset[str] = field(default_factory=frozenset)
    allowed_target_types: frozenset[str] = field(default_factory=frozenset)
    kek_kid: str | None = None
    audit_log: str | None = None

    @property
    def kek_name(self) -> str | None:
        """The configured KEK's key name (from BYOK_KEK_KID), if any."""
        if not self.kek_kid:
            return None
        parts = urlsplit(self.kek_kid).path.strip("/").split("/")
        return parts[1] if len(parts) >= 2 and parts[0] == "keys" else None

    @property
    def hsm_host(self) -> str:
        """host[:port] of the HSM, as it appears in kids."""
        parts = urlsplit(self.hsm_url)
        return parts.netloc.lower()

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        require_hsm: bool = True,
        **overrides: str | None,
    ) -> Settings:
        """Read settings from ``env`` (default ``os.environ``); ``overrides`` win when not None.
        ``require_hsm=False`` serves storage-only commands (status, upload, audit).

        Raises:
            ConfigError: a required setting is missing or a value is invalid.
        """
        merged = dict(os.environ if env is None else env)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        hsm_url = (merged.get("BYOK_HSM_URL") or "").rstrip("/")
        parts = urlsplit(hsm_url)
        if (require_hsm or hsm_url) and (
            parts.scheme != "https" or not parts.netloc or parts.path not in ("", "/")
        ):
            raise ConfigError("BYOK_HSM_URL must be set to https://<name>.managedhsm.azure.net")
        bad_types = _csv(merged.get("BYOK_ALLOWED_TARGET_TYPES")) - TARGET_TYPES.keys()
        if bad_types:
            raise ConfigError(f"BYOK_ALLOWED_TARGET_TYPES has unknown type(s): {sorted(bad_types)}")
        return cls(
            hsm_url=hsm_url,
            incoming_container=merged.get("BYOK_INCOMING_CONTAINER")
            or DEFAULTS["BYOK_INCOMING_CONTAINER"],
            status_container=merged.get("BYOK_STATUS_CONTAINER")
            or DEFAULTS["BYOK_STATUS_CONTAINER"],
            archive_container=merged.get("BYOK_ARCHIVE_CONTAINER")
            or DEFAULTS["BYOK_ARCHIVE_CONTAINER"],
            quarantine_container=merged.get("BYOK_QUARANTINE_CONTAINER")
            or DEFAULTS["BYOK_QUARANTINE_CONTAINER"],
            audit_container=merged.get("BYOK_AUDIT_CONTAINER") or DEFAULTS["BYOK_AUDIT_CONTAINER"],
            audit_people_container=merged.get("BYOK_AUDIT_PEOPLE_CONTAINER")
            or DEFAULTS["BYOK_AUDIT_PEOPLE_CONTAINER"],
            audit_signing_kid=merged.get("BYOK_AUDIT_SIGNING_KID") or None,
            audit_person_key=merged.get("BYOK_AUDIT_PERSON_KEY") or None,
            config_container=merged.get("BYOK_CONFIG_CONTAINER")
            or DEFAULTS["BYOK_CONFIG_CONTAINER"],
            policy_blob=merged.get("BYOK_POLICY_BLOB") or DEFAULTS["BYOK_POLICY_BLOB"],
            policy_required=_flag(merged, "BYOK_POLICY_REQUIRED"),
            approvals_container=merged.get("BYOK_APPROVALS_CONTAINER")
            or DEFAULTS["BYOK_APPROVALS_CONTAINER"],
            max_package_bytes=_number(merged, "BYOK_MAX_PACKAGE_BYTES", 1024, 1024 * 1024),
            max_attempts=_number(merged, "BYOK_MAX_ATTEMPTS", 1, 100),
            retry_total=_number(merged, "BYOK_RETRY_TOTAL", 0, 20),
            retry_backoff=_number(merged, "BYOK_RETRY_BACKOFF_SECONDS", 0.0, 60.0),
            retry_backoff_max=_number(merged, "BYOK_RETRY_BACKOFF_MAX_SECONDS", 0.0, 600.0),
            lease_seconds=_number(merged, "BYOK_LEASE_SECONDS", 15, 60),
            hsm_imports_per_second=_number(merged, "BYOK_HSM_IMPORTS_PER_SECOND", 0.01, 1000.0),
            throttle_wait_seconds=_number(merged, "BYOK_THROTTLE_WAIT_SECONDS", 0.0, 300.0),
            hsm_max_keys=_number(merged, "BYOK_HSM_MAX_KEYS", 1, 1_000_000),
            hsm_max_versions_per_key=_number(merged, "BYOK_HSM_MAX_VERSIONS_PER_KEY", 1, 10_000),
            policy_cache_seconds=_number(merged, "BYOK_POLICY_CACHE_SECONDS", 0.0, 300.0),
            cli_connect_timeout=_number(merged, "BYOK_CLI_CONNECT_TIMEOUT_SECONDS", 0.1, 120.0),
            allowed_kek_names=_csv(merged.get("BYOK_ALLOWED_KEK_NAMES")),
            allowed_target_types=_csv(merged.get("BYOK_ALLOWED_TARGET_TYPES")),
            kek_kid=merged.get("BYOK_KEK_KID") or None,
            audit_log=merged.get("BYOK_AUDIT_LOG") or None,
        )
