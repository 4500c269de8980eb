"""Managed HSM adapter over ``azure-keyvault-keys``. Translates SDK errors into domain errors.

Needs, on the HSM (local RBAC, scope ``/keys``): the custom role ``BYOK Importer``
(infra/hsm-roles/byok-importer.json: keys read, import, write to disable a version, encrypt for
the AES check value), which infra/assign-hsm-roles.sh creates and assigns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.core.rest import HttpRequest
from azure.keyvault.keys import JsonWebKey, KeyClient, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa

from byok_pipeline.adapters.transient import as_transient
from byok_pipeline.core.errors import Rejected, TransientError
from byok_pipeline.core.kek_facts import KekFacts
from byok_pipeline.core.policy import ExistingKey
from byok_pipeline.core.settings import Settings
from offline_packager.kid import KeyId

TAG_PACKAGE_SHA256 = "byok-package-sha256"
TAG_KEK_KID = "byok-kek-kid"
# Key attestation: the api-version of Microsoft's instructions (az rest ... attestation?
# api-version=7.6-preview.1). azure-keyvault-keys 4.11 also has KeyClient.get_key_attestation,
# but it returns the parsed model; the custodian needs the HSM's answer byte for byte.
ATTESTATION_API_VERSION = "7.6-preview.1"
MAX_ATTESTATION_BYTES = 1024 * 1024
_CBC = {
    128: EncryptionAlgorithm.a128_cbc,
    192: EncryptionAlgorithm.a192_cbc,
    256: EncryptionAlgorithm.a256_cbc,
}
CryptoFactory = Callable[[str], CryptographyClient]
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
    )


def _permanent(exc: HttpResponseError, what: str) -> Rejected:
    code = getattr(exc.error, "code", None) if exc.error is not None else None
    message = getattr(exc.error, "message", None) if exc.error is not None else None
    text = f"{what}: HSM answered {exc.status_code} {code or ''}".strip()
    if message:
        text += f": {str(message)[:300]}"
    return Rejected("hsm_refused", text, service_code=code or str(exc.status_code))


def translate(exc: AzureError, what: str) -> Rejected | TransientError:
    """Transient (retry) or permanent (reject) domain error for an SDK failure.

    401/403 are treated as transient: a missing role assignment is fixed by an operator, and
    the package should then import on redelivery rather than be rejected for good.
    """
    transient = as_transient(exc, what)
    if transient is not None:
        return transient
    if isinstance(exc, HttpResponseError):
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
        crypto_factory: CryptoFactory | None = None,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.client = key_client
        self.settings = settings
        self._crypto_factory = crypto_factory
        self._sleep = sleep

    def get_kek(self, kid: KeyId, *, request_id: str) -> KekFacts:
        """Fetch the KEK by its exact version.

        Raises:
            Rejected: ``kek_missing`` (404), ``hsm_refused``.
            TransientError: 429/5xx/connection after the SDK's own retries.
        """
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
        return ExistingKey(
            kid=str(key.id),
            key_ops=tuple(_s(o) for o in (jwk.key_ops or ())),
            package_sha256_tag=(key.properties.tags or {}).get(TAG_PACKAGE_SHA256),
        )

    def find_imported(
        self, name: str, package_sha256: str, *, request_id: str
    ) -> ImportedKey | None:
        """The version of ``name`` tagged with this package's digest, if any (idempotency).

        Raises:
            TransientError: the listing failed.
            Rejected: the HSM refused the listing.
        """
        try:
            for props in self.client.list_properties_of_key_versions(name, request_id=request_id):
                if (props.tags or {}).get(TAG_PACKAGE_SHA256) == package_sha256:
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
        before_put: Callable[[], None] | None = None,
    ) -> ImportedKey:
        """Import unless a version tagged with this digest exists; never two versions.

        The SDK's own retry is off for the PUT (a retried PUT after a lost response would make a
        second version); instead each retry first looks for the tagged version. ``before_put``
        runs right before each PUT (the processor renews its lease there); the PUT's connection
        and read timeouts are bounded by the lease (:meth:`put_timeout_seconds`).

        Raises:
            Rejected: ``hsm_refused`` with the service's code.
            TransientError: still failing after BYOK_RETRY_TOTAL retries.
        """
        s = self.settings
        last: TransientError | None = None
        for attempt in range(s.retry_total + 1):
            existing = self.find_imported(name, package_sha256, request_id=request_id)
            if existing is not None:
                return existing
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
                return _imported(key)
            except AzureError as exc:
                err = translate(exc, "importing the key")
                if isinstance(err, Rejected) or err.outcome_unknown:
                    # unknown: the PUT may still land; only a later delivery, after it can no
                    # longer land, may look again and retry (see processor.import_in_flight)
                    raise err from None
                last = err
            if attempt < s.retry_total:
                wait = (
                    last.retry_after
                    if last.retry_after is not None
                    else s.retry_backoff * 2**attempt
                )
                if wait > s.retry_backoff_max:
                    break
                self._sleep(wait)
        assert last is not None  # noqa: S101  # the loop ran at least once and failed
        raise last

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

        Raises:
            TransientError / Rejected: the encrypt call failed.
        """
        if self._crypto_factory is None:
            raise TransientError("no cryptography client configured", reason="config_error")
        client = self._crypto_factory(kid)
        try:
            result = client.encrypt(_CBC[key_size], bytes(16), iv=bytes(16), request_id=request_id)
        except AzureError as exc:
            raise translate(exc, "computing the AES check value") from None
        return result.ciphertext[:3].hex().upper()

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
