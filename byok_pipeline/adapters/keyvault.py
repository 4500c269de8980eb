"""Managed HSM adapter over ``azure-keyvault-keys``. Translates SDK errors into domain errors.

Needs, on the HSM (local RBAC, scope ``/keys``): the custom role ``BYOK Importer``
(infra/hsm-roles/byok-importer.json: keys read, import, write to disable a version, encrypt for
the AES check value), which infra/assign-hsm-roles.sh creates and assigns.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceResponseError,
)
from azure.core.rest import HttpRequest
from azure.keyvault.keys import JsonWebKey, KeyClient, KeyVaultKey
from cryptography.hazmat.primitives.asymmetric import rsa

from byok_pipeline.adapters.transient import as_transient
from byok_pipeline.core.errors import Rejected, TransientError
from byok_pipeline.core.identity import same_package
from byok_pipeline.core.kek_facts import KekFacts
from byok_pipeline.core.pacing import Clock, ImportPacer, pacer_for
from byok_pipeline.core.policy import ExistingKey
from byok_pipeline.core.settings import Settings
from offline_packager.errors import PackageFormatError
from offline_packager.kid import KeyId
from offline_packager.package_format import b64url_decode, b64url_encode

TAG_PACKAGE_SHA256 = "byok-package-sha256"
TAG_PACKAGE_ID = "byok-package-id"  # the canonical identity (core.identity): reformatted copies
TAG_KEK_KID = "byok-kek-kid"
# Key attestation: the api-version of Microsoft's instructions (az rest ... attestation?
# api-version=7.6-preview.1). azure-keyvault-keys 4.11 also has KeyClient.get_key_attestation,
# but it returns the parsed model; the custodian needs the HSM's answer byte for byte.
ATTESTATION_API_VERSION = "7.6-preview.1"
MAX_ATTESTATION_BYTES = 1024 * 1024
_CBC = {128: "A128CBC", 192: "A192CBC", 256: "A256CBC"}
# How long a worker reuses a KEK's facts (keyed by the versioned kid). A KEK disabled or expired
# within this window is still refused by the HSM itself at the import.
KEK_CACHE_SECONDS = 60.0
# How long a worker trusts its count of the HSM's keys (counted up after each new key).
KEY_COUNT_CACHE_SECONDS = 60.0
Sleep = Callable[[float], None]


@dataclass(frozen=True)
class ImportedKey:
    """The imported version: kid and public parts, as the SDK returned them."""

    kid: str
    name: str
    version: str
    kty: str
    key_ops: tuple[str, ...]
    n: bytes | None
    e: bytes | None
    crv: str | None
    x: bytes | None
    y: bytes | None
    tags: dict[str, str]
    enabled: bool = True


def _s(value: Any) -> str:
    """The SDK returns enums (JsonWebKeyType, KeyOperation, KeyCurveName); we want their values."""
    return str(getattr(value, "value", value))


def _jwk(key: KeyVaultKey) -> Any:
    """The key's JsonWebKey; its fields are set dynamically, so mypy cannot see them."""
    return key.key


def _imported(key: KeyVaultKey) -> ImportedKey:
    jwk = _jwk(key)
    return ImportedKey(
        kid=str(key.id),
        name=str(key.name),
        version=str(key.properties.version),
        kty=_s(jwk.kty),
        key_ops=tuple(_s(o) for o in (jwk.key_ops or ())),
        n=jwk.n,
        e=jwk.e,
        crv=_s(jwk.crv) if jwk.crv else None,
        x=jwk.x,
        y=jwk.y,
        tags=dict(key.properties.tags or {}),
        enabled=key.properties.enabled is not False,
    )


def _permanent(exc: HttpResponseError, what: str) -> Rejected:
    code = _error_code(exc)
    message = getattr(exc.error, "message", None) if exc.error is not None else None
    text = f"{what}: HSM answered {exc.status_code} {code or ''}".strip()
    if message:
        text += f": {str(message)[:300]}"
    return Rejected("hsm_refused", text, service_code=code or str(exc.status_code))


# The error codes of an import refused for Managed HSM's limits. Not confirmed from a public
# source (managed_hsm_emulator/README.md "Service limits mode"): the emulator answers with these;
# the pre-checks (processing.authorize.check_existing) refuse before the PUT in any case.
QUOTA_CODES = {
    "KeyVersionLimitExceeded": "key_version_limit",
    "HsmKeyLimitExceeded": "hsm_key_limit",
}


def is_ours(tags: dict[str, str] | None, package_sha256: str, package_id: str | None) -> bool:
    """A version's tags say it is this package's import: its digest, or (a reformatted copy)
    its canonical identity."""
    tags = tags or {}
    return same_package(
        tags.get(TAG_PACKAGE_SHA256), tags.get(TAG_PACKAGE_ID), package_sha256, package_id
    )


def _error_code(exc: HttpResponseError) -> str | None:
    return getattr(exc.error, "code", None) if exc.error is not None else None


def _quota_reason(err: Rejected | TransientError) -> Rejected | TransientError:
    """The HSM's own limit refusal under this pipeline's reason code (the pre-checks missed a
    concurrent writer); anything else unchanged."""
    if isinstance(err, Rejected) and err.service_code in QUOTA_CODES:
        return Rejected(QUOTA_CODES[err.service_code], err.message, service_code=err.service_code)
    return err


def translate(exc: AzureError, what: str) -> Rejected | TransientError:
    """Transient (retry) or permanent (reject) domain error for an SDK failure.

    401/403 are treated as transient: a missing role assignment is fixed by an operator, and
    the package should then import on redelivery rather than be rejected for good.
    """
    transient = as_transient(exc, what)
    if transient is not None:
        return transient
    if isinstance(exc, HttpResponseError):
        if _error_code(exc) in QUOTA_CODES:  # a limit, whatever the status: never retried
            return _permanent(exc, what)
        if exc.status_code in (401, 403):  # auth/permission: fixable by operators
            return TransientError(
                f"{what}: HSM answered {exc.status_code} (check role assignments)",
                reason="hsm_forbidden",
            )
        return _permanent(exc, what)
    return TransientError(f"{what}: {type(exc).__name__}")


class HsmAdapter:
    """Key Vault calls of the pipeline; every call carries the correlation id as request id."""

    def __init__(
        self,
        key_client: KeyClient,
        settings: Settings,
        *,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
        pacer: ImportPacer | None = None,
    ) -> None:
        self.client = key_client
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self.pacer = pacer or pacer_for(settings.hsm_host, settings.hsm_imports_per_second)
        self._lock = threading.Lock()
        self._kek_cache: dict[str, tuple[float, KekFacts]] = {}
        self._key_count: tuple[float, int] | None = None
        self.stats = {"throttled": 0}  # 429s answered to this worker's import PUTs

    def get_kek(self, kid: KeyId, *, request_id: str) -> KekFacts:
        """The KEK's facts by its exact version, from this worker's short-lived cache
        (:data:`KEK_CACHE_SECONDS`) or one GET. Needs keys/read.

        Raises:
            Rejected: ``kek_missing`` (404), ``hsm_refused``.
            TransientError: 429/5xx/connection after the SDK's own retries.
        """
        now = self._clock()
        with self._lock:
            cached = self._kek_cache.get(kid.kid)
        if cached is not None and now - cached[0] < KEK_CACHE_SECONDS:
            return cached[1]
        facts = self._fetch_kek(kid, request_id=request_id)
        with self._lock:
            if len(self._kek_cache) > 64:
                self._kek_cache.clear()
            self._kek_cache[kid.kid] = (now, facts)
        return facts

    def _fetch_kek(self, kid: KeyId, *, request_id: str) -> KekFacts:
        try:
            key = self.client.get_key(kid.name, kid.version, request_id=request_id)
        except ResourceNotFoundError:
            raise Rejected(
                "kek_missing", f"no key {kid.name} version {kid.version} in this HSM"
            ) from None
        except AzureError as exc:
            raise translate(exc, "reading the KEK") from None
        jwk = _jwk(key)
        public: rsa.RSAPublicKey | None = None
        if jwk.n and jwk.e:
            public = rsa.RSAPublicNumbers(
                int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big")
            ).public_key()
        props = key.properties
        return KekFacts(
            kid=str(key.id),
            kty=_s(jwk.kty),
            key_ops=tuple(_s(o) for o in (jwk.key_ops or ())),
            enabled=bool(props.enabled),
            not_before=props.not_before,
            expires_on=props.expires_on,
            public_key=public,
        )

    def existing_key(self, name: str, *, request_id: str) -> ExistingKey | None:
        """The current version of ``name`` (its operations and the pipeline's tag), None when
        no key of that name exists. Needs keys/read.

        Raises:
            TransientError: 429/5xx/connection after the SDK's own retries.
            Rejected: the HSM refused the read.
        """
        try:
            key = self.client.get_key(name, request_id=request_id)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise translate(exc, "reading the existing key") from None
        jwk = _jwk(key)
        tags = key.properties.tags or {}
        return ExistingKey(
            kid=str(key.id),
            key_ops=tuple(_s(o) for o in (jwk.key_ops or ())),
            package_sha256_tag=tags.get(TAG_PACKAGE_SHA256),
            package_id_tag=tags.get(TAG_PACKAGE_ID),
        )

    def find_imported(
        self, name: str, package_sha256: str, *, package_id: str | None = None, request_id: str
    ) -> ImportedKey | None:
        """The version of ``name`` tagged with this package's digest or its canonical identity
        (a reformatted copy's), if any (idempotency). Needs keys/read.

        Raises:
            TransientError: the listing failed.
            Rejected: the HSM refused the listing.
        """
        try:
            for props in self.client.list_properties_of_key_versions(name, request_id=request_id):
                if is_ours(props.tags, package_sha256, package_id):
                    return _imported(
                        self.client.get_key(name, props.version, request_id=request_id)
                    )
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise translate(exc, "listing key versions") from None
        return None

    def import_once(
        self,
        name: str,
        *,
        package_bytes: bytes,
        package_sha256: str,
        kty: str,
        crv: str | None,
        key_ops: tuple[str, ...],
        tags: dict[str, str],
        request_id: str,
        package_id: str | None = None,
        look_first: bool = True,
        before_put: Callable[[], None] | None = None,
    ) -> ImportedKey:
        """Import unless a version tagged with this digest exists; never two versions.

        The SDK's own retry is off for the PUT (a retried PUT after a lost response would make a
        second version); instead every retry first looks for the tagged version (after a 429
        too). ``look_first=False`` skips the look before the first PUT: the caller looked
        already, or knows no earlier attempt reached the HSM.

        Every PUT waits for this worker's pacer (:mod:`byok_pipeline.core.pacing`). A 429 is
        not a failed try: the pacer slows down, the service's Retry-After is honoured, and the
        PUT is tried again, for up to BYOK_THROTTLE_WAIT_SECONDS in all; past that a throttled
        TransientError hands the package back for redelivery (never counted as an attempt).
        ``before_put`` runs right before each PUT (the processor renews its lease there); the
        PUT's connection and read timeouts are bounded by the lease (:meth:`put_timeout_seconds`).
        Needs keys/import (and keys/read for the look).

        Raises:
            Rejected: ``hsm_refused`` with the service's code; ``key_version_limit`` or
                ``hsm_key_limit`` when the HSM refused for its limits.
            TransientError: still failing after BYOK_RETRY_TOTAL retries, or throttled for
                longer than BYOK_THROTTLE_WAIT_SECONDS (``throttled``).
        """
        s = self.settings
        failures = 0
        look = look_first
        waited = 0.0
        hold: float | None = None  # after a 429: the service's wait for this PUT
        while True:
            if look:
                existing = self.find_imported(
                    name, package_sha256, package_id=package_id, request_id=request_id
                )
                if existing is not None:
                    return existing
            paced = hold is None or hold <= 0  # "Retry-After: 0" says nothing: the pacer's slot
            waited += self._pace(waited, None if paced else hold)
            hold = None
            if before_put is not None:
                before_put()
            connect, read = self._put_timeouts()
            try:
                key = self.client.import_key(
                    name,
                    JsonWebKey(kty=kty, crv=crv, key_ops=list(key_ops), t=package_bytes),
                    hardware_protected=True,
                    tags=tags,
                    request_id=request_id,
                    retry_total=0,
                    connection_timeout=connect,
                    read_timeout=read,
                )
            except AzureError as exc:
                err = translate(exc, "importing the key")
                if isinstance(exc, ServiceResponseError) and isinstance(err, TransientError):
                    err.outcome_unknown = True  # sent, then the connection broke: may still run
                if isinstance(err, Rejected) or err.outcome_unknown:
                    # unknown: the PUT may still land; only a later delivery, after it can no
                    # longer land, may look again and retry (see processor.import_in_flight)
                    raise _quota_reason(err) from None
                look = True  # even a 429 may stand for an import done (a proxy's answer)
                if err.throttled:
                    self.stats["throttled"] += 1
                    if paced:  # the pacer learns from the PUTs it timed, not from retries
                        self.pacer.throttled()  # that went when the HSM said
                    hold = err.retry_after if err.retry_after is not None else 1.0
                    continue
                failures += 1
                if failures > s.retry_total:
                    raise err from None
                wait = (
                    err.retry_after
                    if err.retry_after is not None
                    else s.retry_backoff * 2 ** (failures - 1)
                )
                if wait > s.retry_backoff_max:
                    raise err from None
                self._sleep(wait)
                continue
            self.pacer.accepted()
            with self._lock:
                if self._key_count is not None and key.properties.version:
                    stamp, count = self._key_count
                    self._key_count = (stamp, count + 1)  # at most one too many: safe side
            return _imported(key)

    def _pace(self, waited: float, hold: float | None = None) -> float:
        """Wait for this worker's next import slot; returns the seconds waited. A PUT the HSM
        throttled (``hold``: the service's Retry-After, above 0) waits that, but at least one
        interval of the pacer's ceiling, and takes no slot: the service knows when its
        partition admits the PUT again, the pacer (shared by all partitions) does not, and
        queueing a retry behind other partitions' first tries idles its own partition
        (benchmarks/throughput_bench.py, 300 packages at 9/s, 4 workers: drained in 1.75x
        the HSM's floor that way, 1.18x without). The floor keeps a tiny Retry-After (a
        proxy's ``retry-after-ms: 1``) from becoming a busy loop.

        Raises:
            TransientError: ``throttled``, when the wait is longer than what is left of
                BYOK_THROTTLE_WAIT_SECONDS (a slot taken is given back).
        """
        wait = self.pacer.reserve() if hold is None else max(hold, 1.0 / self.pacer.ceiling)
        if wait <= 0:
            return 0.0
        if waited + wait > self.settings.throttle_wait_seconds:
            if hold is None:
                self.pacer.cancel()
            raise TransientError(
                f"throttled: the HSM's import pace leaves no slot within "
                f"{self.settings.throttle_wait_seconds:g} s",
                retry_after=wait,
                reason="throttled",
                throttled=True,
            )
        self._sleep(wait)
        return wait

    def scan_versions(
        self,
        name: str,
        *,
        stop_at: int,
        package_sha256: str,
        package_id: str | None,
        request_id: str,
    ) -> tuple[int, str | None]:
        """How many versions ``name`` has (counting no further than ``stop_at``; one listing
        page per 25 versions), and the version tagged with this package, if the listing met
        one. Needs keys/read.

        Raises:
            TransientError / Rejected: the listing failed.
        """
        count, ours = 0, None
        try:
            for props in self.client.list_properties_of_key_versions(name, request_id=request_id):
                count += 1
                if ours is None and is_ours(props.tags, package_sha256, package_id):
                    ours = str(props.version)
                if count >= stop_at:
                    break
        except ResourceNotFoundError:
            return 0, None
        except AzureError as exc:
            raise translate(exc, "counting key versions") from None
        return count, ours

    def get_imported(self, name: str, version: str, *, request_id: str) -> ImportedKey:
        """One version, as an :class:`ImportedKey`. Needs keys/read.

        Raises:
            TransientError / Rejected: the read failed.
        """
        try:
            return _imported(self.client.get_key(name, version, request_id=request_id))
        except AzureError as exc:
            raise translate(exc, "reading the imported version") from None

    def count_keys(self, *, stop_at: int, request_id: str) -> int:
        """How many (not deleted) keys the HSM holds, from this worker's count when it is recent
        (:data:`KEY_COUNT_CACHE_SECONDS`, counted up after each import), else one listing.
        Within 5% of ``stop_at`` it is always listed afresh (other workers import too).
        Deleted keys that are not purged yet are not listed (that needs keys/deletedKeys/read):
        the HSM's own refusal covers them (:data:`QUOTA_CODES`). Needs keys/read.

        Raises:
            TransientError / Rejected: the listing failed.
        """
        now = self._clock()
        with self._lock:
            cached = self._key_count
        margin = max(1, stop_at // 20)
        if (
            cached is not None
            and now - cached[0] < KEY_COUNT_CACHE_SECONDS
            and cached[1] < stop_at - margin
        ):
            return cached[1]
        count = 0
        try:
            for _ in self.client.list_properties_of_keys(request_id=request_id):
                count += 1
                if count >= stop_at:
                    break
        except AzureError as exc:
            raise translate(exc, "counting keys") from None
        with self._lock:
            self._key_count = (now, count)
        return count

    def _put_timeouts(self) -> tuple[float, float]:
        lease = self.settings.lease_seconds
        return min(10.0, lease / 4), lease / 2

    def put_timeout_seconds(self) -> float:
        """The longest an import PUT may take on the client side (connect + read timeouts)."""
        return sum(self._put_timeouts())

    def disable_version(self, name: str, version: str, *, request_id: str) -> None:
        """Disable a version that failed verification.

        Raises:
            TransientError / Rejected: the update failed.
        """
        try:
            self.client.update_key_properties(name, version, enabled=False, request_id=request_id)
        except AzureError as exc:
            raise translate(exc, "disabling the key") from None

    def aes_check_value(self, kid: str, key_size: int, *, request_id: str) -> str:
        """A*CBC encryption of one zero block with a zero IV, in the HSM; its first 3 bytes, hex.

        One ``POST {kid}/encrypt`` through the key client's own pipeline (its connection and
        token; no key GET first). Needs keys/encrypt.

        Raises:
            TransientError / Rejected: the encrypt call failed, or its answer is not one block.
        """
        name, version = kid.rstrip("/").split("/")[-2:]
        zero = b64url_encode(bytes(16))
        request = HttpRequest(
            "POST",
            f"/keys/{name}/{version}/encrypt",
            params={"api-version": self.client.api_version},
            json={"alg": _CBC[key_size], "value": zero, "iv": zero},
        )
        what = "computing the AES check value"
        try:
            response = self.client.send_request(request, request_id=request_id)
            response.raise_for_status()
            value = str(response.json()["value"])
            ciphertext = b64url_decode(value)
        except AzureError as exc:
            raise translate(exc, what) from None
        except (ValueError, KeyError, TypeError, PackageFormatError):
            raise Rejected("hsm_refused", f"{what}: the answer holds no ciphertext") from None
        if len(ciphertext) < 16:
            raise Rejected("hsm_refused", f"{what}: the answer is shorter than one block")
        return ciphertext[:3].hex().upper()

    def key_attestation(self, kid: KeyId, *, request_id: str) -> bytes:
        """``GET /keys/{name}/{version}/attestation``: the HSM's answer, exactly as sent (the
        key bundle with ``attributes.attestation``), through the SDK's pipeline (auth, retries).

        Raises:
            Rejected: ``kek_missing`` (404), ``hsm_refused`` (another 4xx, an answer over 1 MiB
                or without an ``attestation`` object).
            TransientError: 401/403, 429/5xx or connection failures after the SDK's retries.
        """
        request = HttpRequest(
            "GET",
            f"/keys/{kid.name}/{kid.version}/attestation",
            params={"api-version": ATTESTATION_API_VERSION},
        )
        what = "reading the KEK attestation"
        try:
            response = self.client.send_request(request, request_id=request_id)
            if response.status_code == 404:
                raise Rejected(
                    "kek_missing", f"no key {kid.name} version {kid.version} in this HSM"
                )
            response.raise_for_status()
            body = response.read()
        except AzureError as exc:
            raise translate(exc, what) from None
        if len(body) > MAX_ATTESTATION_BYTES:
            raise Rejected("hsm_refused", f"{what}: the answer is over 1 MiB")
        try:
            doc = json.loads(body)
            attestation = doc["attributes"]["attestation"]
        except (ValueError, KeyError, TypeError):
            attestation = None
        if not isinstance(attestation, dict):
            raise Rejected("hsm_refused", f"{what}: the answer holds no attestation object")
        return bytes(body)

    def get_key(self, name: str, version: str | None = None, **kwargs: Any) -> KeyVaultKey:
        return self.client.get_key(name, version, **kwargs)
