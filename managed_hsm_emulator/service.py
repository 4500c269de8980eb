"""The Key Vault keys service: operations on the key store, shaped like Managed HSM's answers.

Transport-free: :meth:`KeyVaultService.handle` takes a parsed :class:`ServiceRequest` and
returns a :class:`ServiceResponse`, or raises an :class:`~.errors.EmulatorError` that the HTTP
layer turns into Key Vault's error shape. Clock and randomness are injectable.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from offline_packager.errors import PackageFormatError
from offline_packager.kid import KEY_NAME_RE, KeyId
from offline_packager.package_format import b64url_decode, b64url_encode

from . import crypto_ops
from .attestation import AttestationAuthority
from .byok import Kek, check_kek, import_byok, kek_not_found
from .errors import BadParameterError, ConflictError, EmulatorError, KeyNotFoundError
from .limits import ServiceLimits
from .material import KeyMaterial, family_of, hsm_kty
from .model import (
    DeletedInfo,
    KeyAttributes,
    KeyRecord,
    KeyVersion,
    Origin,
    check_key_ops,
    check_tags,
)
from .routes import Route
from .store import KeyStore

# 7.6-preview.1 is the api-version Microsoft's key attestation instructions use
API_VERSIONS = ("7.2", "7.3", "7.4", "7.5", "7.6-preview.1", "7.6-preview.2", "7.6", "2025-07-01")
LATEST_API_VERSION = "2025-07-01"
MAX_RESULTS = 25
DEFAULT_RETENTION_DAYS = 7
MAX_RANDOM_BYTES = 128
_DAY = 86400
LOG = logging.getLogger("managed_hsm_emulator")
# What a body of an unexpected shape makes an operation raise (a number where a string was
# expected, a list for an object, a huge integer, deep nesting): a 400, not a 500. OSError and
# the like stay 500s: they are the emulator's own failures.
_BODY_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    UnicodeError,
)


@dataclass(frozen=True)
class ServiceRequest:
    """A Key Vault request after routing.

    ``host`` is the request's Host (``host[:port]``, already checked to name this emulator):
    kids in the answer are built from it. ``authorities`` are all the names this emulator
    answers to (:class:`~.identity.Identity`); a BYOK package's kid must name one of them.
    Empty means ``{host}``.
    """

    route: Route
    host: str
    api_version: str
    query: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    authorities: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ServiceResponse:
    """Status and JSON body (None for 204)."""

    status: int
    body: dict[str, Any] | None


def check_api_version(value: str | None) -> str:
    """Accept the api-versions Managed HSM speaks that this emulator implements.

    Raises:
        BadParameterError: reason ``bad_api_version``.
    """
    if value is None:
        raise BadParameterError(
            "the api-version query parameter is required", reason="bad_api_version"
        )
    if value not in API_VERSIONS:
        raise BadParameterError(
            f"the specified version ({value[:40]}) is not recognized; consider using the latest "
            f"supported version ({LATEST_API_VERSION})",
            reason="bad_api_version",
        )
    return value


def _check_name(name: str | None) -> str:
    if name is None or not KEY_NAME_RE.fullmatch(name):
        raise BadParameterError(
            "key names are 1-127 characters: letters, digits and dashes", reason="bad_key_name"
        )
    return name


def _b64_param(body: Mapping[str, Any], name: str, *, required: bool) -> bytes | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadParameterError(f"the request lacks {name!r}", reason="bad_input")
        return None
    if not isinstance(value, str):
        raise BadParameterError(f"{name!r} must be a base64url string", reason="bad_input")
    try:
        return b64url_decode(value)
    except PackageFormatError:
        raise BadParameterError(f"{name!r} is not valid base64url", reason="bad_input") from None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadParameterError("the request body must be a JSON object", reason="bad_body")
    return body


class KeyVaultService:
    """Key operations over a :class:`KeyStore`."""

    def __init__(
        self,
        store: KeyStore,
        *,
        clock: Callable[[], float] = time.time,
        randbytes: Callable[[int], bytes] = os.urandom,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        attestation: AttestationAuthority | None = None,
        limits: ServiceLimits | None = None,
    ) -> None:
        if not 7 <= retention_days <= 90:  # Key Vault's soft-delete range
            raise ValueError("retention_days must be 7-90")
        self._attestation = attestation
        self.limits = limits
        self._store = store
        self._clock = clock
        self._randbytes = randbytes
        self._retention_days = retention_days

    # --- dispatch -----------------------------------------------------------------------------

    def handle(self, req: ServiceRequest) -> ServiceResponse:
        """Run one operation.

        Raises:
            EmulatorError: every refusal (BadParameterError, KeyNotFoundError, ForbiddenError,
                ConflictError...).
        """
        handler: Callable[[ServiceRequest], ServiceResponse] = getattr(
            self, f"_op_{req.route.operation}"
        )
        if self.limits is not None and req.route.operation != "key_operation":
            # crypto operations are admitted once their key's type is known
            self.limits.admit(req.route.operation, req.route.name)
        if req.body is None:
            return handler(req)
        try:
            return handler(req)
        except EmulatorError:
            raise
        except _BODY_ERRORS as exc:
            # A request body is untrusted input: whatever shape of it an operation could not
            # handle is the client's error (400 with a reason), never a 500.
            LOG.warning(
                "refused a body %s could not handle (%s)", req.route.operation, type(exc).__name__
            )
            raise BadParameterError(
                f"the request body could not be processed ({type(exc).__name__})",
                reason="bad_body",
            ) from None

    # --- shaping ------------------------------------------------------------------------------

    @property
    def _recovery_level(self) -> str:
        if self._retention_days == 90:  # the default retention
            return "Recoverable+Purgeable"
        return "CustomizedRecoverable+Purgeable"

    def _attributes(self, v: KeyVersion) -> dict[str, Any]:
        out = v.attributes.to_json()
        out["recoverableDays"] = self._retention_days
        out["recoveryLevel"] = self._recovery_level
        out["exportable"] = False
        return out

    def key_bundle(self, host: str, v: KeyVersion) -> dict[str, Any]:
        """A KeyBundle: ``key`` (public JWK with ``kid``), ``attributes``, ``tags``."""
        key: dict[str, Any] = {
            "kid": f"https://{host}/keys/{v.name}/{v.version}",
            "kty": hsm_kty(v.family),
            "key_ops": list(v.key_ops),
            **v.public,
        }
        out: dict[str, Any] = {"key": key, "attributes": self._attributes(v)}
        if v.tags:
            out["tags"] = dict(v.tags)
        return out

    def _deleted_fields(self, host: str, record: KeyRecord) -> dict[str, Any]:
        assert record.deleted is not None  # noqa: S101  # callers check first
        return {
            "recoveryId": f"https://{host}/deletedkeys/{record.name}",
            "deletedDate": record.deleted.deleted_date,
            "scheduledPurgeDate": record.deleted.scheduled_purge_date,
        }

    def _key_item(self, host: str, v: KeyVersion, *, versioned: bool) -> dict[str, Any]:
        kid = f"https://{host}/keys/{v.name}" + (f"/{v.version}" if versioned else "")
        out: dict[str, Any] = {"kid": kid, "attributes": self._attributes(v)}
        if v.tags:
            out["tags"] = dict(v.tags)
        return out

    # --- lookups ------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _record(self, name: str | None, *, deleted: bool = False) -> KeyRecord:
        """The live (or, with ``deleted``, the soft-deleted) record of a name."""
        name = _check_name(name)
        with self._store.lock:
            record = self._store.get(name)
            if (
                record is not None
                and record.deleted is not None
                and self._now() >= record.deleted.scheduled_purge_date
            ):
                self._store.remove(record.name)
                record = None
            if record is None or (record.deleted is not None) != deleted:
                what = "deleted key" if deleted else "key"
                raise KeyNotFoundError(f"A {what} with (name/id) {name} was not found in this HSM")
            return record

    def _version(self, name: str | None, version: str | None) -> KeyVersion:
        record = self._record(name)
        if not version:
            return record.latest
        found = record.find_version(version)
        if found is None:
            raise KeyNotFoundError(
                f"A key with (name/id) {record.name}/{version[:64]} was not found in this HSM"
            )
        return found

    # --- paging -------------------------------------------------------------------------------

    def _page(
        self,
        req: ServiceRequest,
        path: str,
        items: Sequence[tuple[str, dict[str, Any]]],
    ) -> ServiceResponse:
        """One page of ``(sort_key, item)`` pairs sorted by key, after ``$skiptoken``."""
        raw_max = req.query.get("maxresults")
        try:
            maxresults = MAX_RESULTS if raw_max is None else int(raw_max)
        except ValueError:
            maxresults = 0
        if not 1 <= maxresults <= MAX_RESULTS:
            raise BadParameterError(f"maxresults must be 1-{MAX_RESULTS}", reason="bad_maxresults")
        after = None
        token = req.query.get("$skiptoken")
        if token:
            try:
                after = json.loads(b64url_decode(token))["after"]
            except (PackageFormatError, ValueError, KeyError, TypeError):
                raise BadParameterError("$skiptoken is not valid", reason="bad_skiptoken") from None
        remaining = [(key, item) for key, item in items if after is None or key > after]
        page = remaining[:maxresults]
        next_link = None
        if len(remaining) > maxresults:
            skip = b64url_encode(json.dumps({"after": page[-1][0]}).encode())
            next_link = (
                f"https://{req.host}{path}?api-version={req.api_version}"
                f"&$skiptoken={skip}&maxresults={maxresults}"
            )
        return ServiceResponse(200, {"value": [item for _, item in page], "nextLink": next_link})

    # --- keys ---------------------------------------------------------------------------------

    def _new_version(
        self,
        req: ServiceRequest,
        material: KeyMaterial,
        body: Mapping[str, Any],
        key_ops: object,
        origin: Origin,
    ) -> ServiceResponse:
        name = _check_name(req.route.name)
        ops = check_key_ops(material.family, key_ops, origin=origin)
        now = self._now()
        attributes = KeyAttributes.from_request(body.get("attributes"), now=now)
        tags = check_tags(body.get("tags")) or {}
        version = self._randbytes(16).hex()
        sealed = self._store.seal(material, name=name, version=version)
        with self._store.lock:
            record = self._store.get(name)
            if record is not None and record.deleted is not None:
                if now < record.deleted.scheduled_purge_date:
                    raise ConflictError(
                        f"key {record.name} is deleted but recoverable; recover or purge it "
                        "before reusing its name",
                        reason="name_deleted",
                    )
                self._store.remove(record.name)
                record = None
            self._check_object_limits(name, record, now)
            v = KeyVersion(
                name=record.name if record is not None else name,
                version=version,
                seq=self._store.next_seq(),
                family=material.family,
                key_ops=ops,
                attributes=attributes,
                tags=tags,
                public=material.public_jwk(),
                sealed=sealed,
                origin=origin,
                material=material,
            )
            if record is None:
                record = KeyRecord(name=name, versions=[v])
            else:
                record = KeyRecord(name=record.name, versions=[*record.versions, v])
            self._store.save(record)
        return ServiceResponse(200, self.key_bundle(req.host, v))

    def _check_object_limits(self, name: str, record: KeyRecord | None, now: int) -> None:
        """In the service-limits mode: refuse a key over the HSM's keys, or a version over the
        key's versions. Soft-deleted keys count until purged. Called under the store lock.

        Raises:
            HsmKeyLimitError, KeyVersionLimitError: see :mod:`.limits`.
        """
        if self.limits is not None:
            self.limits.check_new_version(
                record.name if record is not None else name,
                versions=None if record is None else len(record.versions),
                keys_held=lambda: self._keys_held(now),
            )

    def _keys_held(self, now: int) -> int:
        """Live keys plus soft-deleted ones not yet due for purging."""
        return self._store.count(
            lambda r: r.deleted is None or now < r.deleted.scheduled_purge_date
        )

    def limits_status(self) -> dict[str, Any]:
        """``GET /_admin/limits``: ``{"enabled": false}``, or the configuration, the scaled rates,
        the counters and ``keys`` (keys held, soft-deleted ones included)."""
        if self.limits is None:
            return {"enabled": False}
        return {**self.limits.snapshot(), "keys": self._keys_held(self._now())}

    def _op_create_key(self, req: ServiceRequest) -> ServiceResponse:
        _check_name(req.route.name)
        body = _object(req.body)
        family = family_of(body.get("kty"))
        key_size = body.get("key_size")
        crv = body.get("crv")
        if key_size is not None and (isinstance(key_size, bool) or not isinstance(key_size, int)):
            raise BadParameterError("key_size must be an integer", reason="bad_key_size")
        if crv is not None and not isinstance(crv, str):
            raise BadParameterError("crv must be a string", reason="bad_curve")
        exponent = body.get("public_exponent")
        if exponent not in (None, 65537):
            raise BadParameterError("public_exponent must be 65537", reason="bad_exponent")
        check_key_ops(family, body.get("key_ops"), origin="generated")
        material = KeyMaterial.generate(
            family, key_size=key_size, crv=crv, randbytes=self._randbytes
        )
        return self._new_version(req, material, body, body.get("key_ops"), "generated")

    def _op_import_key(self, req: ServiceRequest) -> ServiceResponse:
        _check_name(req.route.name)
        body = _object(req.body)
        jwk = body.get("key")
        if not isinstance(jwk, dict):
            raise BadParameterError("the request lacks the key (a JWK object)", reason="bad_jwk")
        kty = jwk.get("kty")
        family = family_of(kty)
        if "key_hsm" in jwk:
            if not str(kty).endswith("-HSM"):
                raise BadParameterError(
                    "BYOK import refused (byok_needs_hsm_kty): a key_hsm import needs kty "
                    "RSA-HSM, EC-HSM or oct-HSM",
                    reason="byok_needs_hsm_kty",
                )
            check_key_ops(family, jwk.get("key_ops"), origin="byok")
            material = import_byok(
                jwk["key_hsm"],
                family=family,
                crv=jwk.get("crv"),
                hosts=req.authorities or frozenset({req.host}),
                find_kek=self._find_kek,
                now=self._clock(),
            )
            return self._new_version(req, material, body, jwk.get("key_ops"), "byok")
        check_key_ops(family, jwk.get("key_ops"), origin="imported")
        material = KeyMaterial.from_private_jwk(family, jwk)
        return self._new_version(req, material, body, jwk.get("key_ops"), "imported")

    def _find_kek(self, kid: KeyId) -> Kek:
        with self._store.lock:
            record = self._store.get(kid.name)
            if record is None or record.deleted is not None:
                raise kek_not_found(kid, name_exists=False)
            v = record.find_version(kid.version)
            if v is None:
                raise kek_not_found(kid, name_exists=True)
        check_kek(v, now=self._clock())
        rsa_key = self._store.material(v).rsa_key
        if rsa_key is None:  # pragma: no cover - check_kek refused non-RSA keys
            raise BadParameterError("the KEK has no RSA key", reason="kek_not_rsa")
        return Kek(v, rsa_key)

    def _op_get_key(self, req: ServiceRequest) -> ServiceResponse:
        return ServiceResponse(
            200, self.key_bundle(req.host, self._version(req.route.name, req.route.version))
        )

    def _op_get_key_attestation(self, req: ServiceRequest) -> ServiceResponse:
        """The key bundle with ``attributes.attestation``, signed by the emulator's TEST PKI.

        Raises:
            KeyNotFoundError: no such key or version.
            BadParameterError: reason ``attestation_unavailable`` (no TEST PKI configured).
        """
        v = self._version(req.route.name, req.route.version)
        if self._attestation is None:
            raise BadParameterError(
                "this emulator has no attestation signer", reason="attestation_unavailable"
            )
        material = self._store.material(v)
        bundle = self.key_bundle(req.host, v)
        bundle["attributes"]["attestation"] = self._attestation.attestation(
            family=v.family,
            kid=bundle["key"]["kid"],
            key_ops=v.key_ops,
            rsa_public=(
                material.rsa_key.public_key().public_numbers() if material.rsa_key else None
            ),
            key_bytes=len(material.aes_key) if material.aes_key is not None else None,
            local=v.origin == "generated",
        )
        return ServiceResponse(200, bundle)

    def _op_list_keys(self, req: ServiceRequest) -> ServiceResponse:
        items = [
            (r.name.lower(), self._key_item(req.host, r.latest, versioned=False))
            for r in self._store.records()
            if r.deleted is None
        ]
        return self._page(req, "/keys", items)

    def _op_list_versions(self, req: ServiceRequest) -> ServiceResponse:
        record = self._record(req.route.name)
        items = [
            (f"{v.seq:020d}", self._key_item(req.host, v, versioned=True))
            for v in list(record.versions)
        ]
        return self._page(req, f"/keys/{record.name}/versions", items)

    def _op_update_key(self, req: ServiceRequest) -> ServiceResponse:
        body = _object(req.body)
        with self._store.lock:
            record = self._record(req.route.name)
            v = self._version(req.route.name, req.route.version)
            ops = v.key_ops
            if body.get("key_ops") is not None:
                ops = check_key_ops(v.family, body["key_ops"], origin=v.origin)
            attributes = v.attributes.updated_from(body.get("attributes"), now=self._now())
            tags = check_tags(body.get("tags"))
            new_v = KeyVersion(
                name=v.name,
                version=v.version,
                seq=v.seq,
                family=v.family,
                key_ops=ops,
                attributes=attributes,
                tags=v.tags if tags is None else tags,
                public=v.public,
                sealed=v.sealed,
                origin=v.origin,
                material=v.material,
            )
            versions = [new_v if x is v else x for x in record.versions]
            self._store.save(KeyRecord(name=record.name, versions=versions))
        return ServiceResponse(200, self.key_bundle(req.host, new_v))

    # --- soft delete --------------------------------------------------------------------------

    def _op_delete_key(self, req: ServiceRequest) -> ServiceResponse:
        with self._store.lock:
            record = self._record(req.route.name)
            now = self._now()
            deleted = KeyRecord(
                name=record.name,
                versions=record.versions,
                deleted=DeletedInfo(now, now + self._retention_days * _DAY),
            )
            self._store.save(deleted)
        body = self.key_bundle(req.host, deleted.latest)
        body.update(self._deleted_fields(req.host, deleted))
        return ServiceResponse(200, body)

    def _op_get_deleted_key(self, req: ServiceRequest) -> ServiceResponse:
        record = self._record(req.route.name, deleted=True)
        body = self.key_bundle(req.host, record.latest)
        body.update(self._deleted_fields(req.host, record))
        return ServiceResponse(200, body)

    def _op_list_deleted_keys(self, req: ServiceRequest) -> ServiceResponse:
        items = []
        now = self._now()
        for r in self._store.records():
            if r.deleted is None or now >= r.deleted.scheduled_purge_date:
                continue
            item = self._key_item(req.host, r.latest, versioned=False)
            item.update(self._deleted_fields(req.host, r))
            items.append((r.name.lower(), item))
        return self._page(req, "/deletedkeys", items)

    def _op_recover_deleted_key(self, req: ServiceRequest) -> ServiceResponse:
        with self._store.lock:
            record = self._record(req.route.name, deleted=True)
            live = KeyRecord(name=record.name, versions=record.versions)
            self._store.save(live)
        return ServiceResponse(200, self.key_bundle(req.host, live.latest))

    def _op_purge_deleted_key(self, req: ServiceRequest) -> ServiceResponse:
        with self._store.lock:
            record = self._record(req.route.name, deleted=True)
            self._store.remove(record.name)
        return ServiceResponse(204, None)

    # --- cryptography -------------------------------------------------------------------------

    def _op_key_operation(self, req: ServiceRequest) -> ServiceResponse:
        body = _object(req.body)
        op = req.route.crypto_op or ""
        v = self._version(req.route.name, req.route.version)
        material = self._store.material(v)
        if self.limits is not None:
            self.limits.admit(op, v.name, key_type=material.describe())
        v.require_usable(op, now=self._clock())
        alg = body.get("alg")
        if not isinstance(alg, str):
            raise BadParameterError("the request lacks alg", reason="bad_algorithm")
        kid = f"https://{req.host}/keys/{v.name}/{v.version}"
        value = _b64_param(body, "value", required=True) or b""
        if op == "sign":
            return ServiceResponse(
                200, {"kid": kid, "value": b64url_encode(crypto_ops.sign(material, alg, value))}
            )
        if op == "verify":
            digest = _b64_param(body, "digest", required=True) or b""
            return ServiceResponse(200, {"value": crypto_ops.verify(material, alg, digest, value)})
        if op == "wrapKey":
            wrapped = crypto_ops.wrap_key(material, alg, value)
            return ServiceResponse(200, {"kid": kid, "value": b64url_encode(wrapped)})
        if op == "unwrapKey":
            unwrapped = crypto_ops.unwrap_key(material, alg, value)
            return ServiceResponse(200, {"kid": kid, "value": b64url_encode(unwrapped)})
        iv = _b64_param(body, "iv", required=False)
        aad = _b64_param(body, "aad", required=False)
        if op == "encrypt":
            result = crypto_ops.encrypt(
                material, alg, value, iv=iv, aad=aad, randbytes=self._randbytes
            )
            out: dict[str, Any] = {"kid": kid, "value": b64url_encode(result.value)}
            if result.iv is not None:
                out["iv"] = b64url_encode(result.iv)
            if result.tag is not None:
                out["tag"] = b64url_encode(result.tag)
            if result.aad is not None:
                out["aad"] = b64url_encode(result.aad)
            return ServiceResponse(200, out)
        tag = _b64_param(body, "tag", required=False)
        plain = crypto_ops.decrypt(material, alg, value, iv=iv, aad=aad, tag=tag)
        return ServiceResponse(200, {"kid": kid, "value": b64url_encode(plain)})

    def _op_get_random_bytes(self, req: ServiceRequest) -> ServiceResponse:
        count = _object(req.body).get("count")
        if isinstance(count, bool) or not isinstance(count, int):
            raise BadParameterError("count must be an integer", reason="bad_input")
        if not 1 <= count <= MAX_RANDOM_BYTES:
            raise BadParameterError(f"count must be 1-{MAX_RANDOM_BYTES}", reason="bad_input")
        return ServiceResponse(200, {"value": b64url_encode(self._randbytes(count))})
