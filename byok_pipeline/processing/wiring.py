"""Build the pipeline's dependencies from settings: SDK clients with bounded retries.

Production credentials: a user-assigned managed identity (``AZURE_CLIENT_ID``) or
``DefaultAzureCredential``. The local runner passes the emulator's credential explicitly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import TokenCredential
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient
from azure.storage.blob import BlobServiceClient

from byok_pipeline.adapters.blobstore import BlobStore
from byok_pipeline.adapters.endpoints import EndpointHelp, NamingTransport, is_loopback
from byok_pipeline.adapters.keyvault import HsmAdapter
from byok_pipeline.audit.events import AuditSink, FanoutAuditSink, JsonLinesAuditSink
from byok_pipeline.core.errors import ConfigError
from byok_pipeline.core.settings import Settings
from byok_pipeline.processing.processor import Deps

CONNECTION_TIMEOUT = 10
READ_TIMEOUT = 30  # well below the lease (>= 15 s ... 60 s) so a hung import cannot outlive it


@dataclass(frozen=True)
class ClientProfile:
    """How the SDK clients connect and retry. The Function waits for its dependencies
    (:data:`FUNCTION_CLIENTS`: the SDKs' retries, BYOK_RETRY_TOTAL); a person at a terminal is
    told within seconds which endpoint is unreachable and what to do (the CLI's profile:
    shorter connect timeout, one retry of a failed connection, short storage backoff, and
    :class:`~byok_pipeline.adapters.endpoints.NamingTransport` for each service)."""

    connection_timeout: float = CONNECTION_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    retry_total: int | None = None  # None: BYOK_RETRY_TOTAL
    retry_connect: int | None = None  # None: the SDK's default (3)
    # storage's ExponentialRetry (initial backoff, increment base, jitter); None: the SDK's
    # (15 s, 3, 3 s): right for a Function, a minute of silence for a person
    storage_backoff: tuple[float, float, float] | None = None
    hsm_help: EndpointHelp | None = None
    storage_help: EndpointHelp | None = None

    def retries(self, settings: Settings) -> int:
        """Retries of one SDK call: BYOK_RETRY_TOTAL, at most the profile's."""
        if self.retry_total is None:
            return settings.retry_total
        return min(self.retry_total, settings.retry_total)


FUNCTION_CLIENTS = ClientProfile()


def _connection_kwargs(
    profile: ClientProfile, help_: EndpointHelp | None, *, verify: str | None = None
) -> dict[str, Any]:
    """Timeouts, and the transport that names an unreachable endpoint when the profile has
    help for this service (then the transport carries the TLS settings)."""
    kwargs: dict[str, Any] = {
        "connection_timeout": profile.connection_timeout,
        "read_timeout": profile.read_timeout,
    }
    if profile.retry_connect is not None:
        kwargs["retry_connect"] = profile.retry_connect
    if help_ is not None:
        kwargs["transport"] = NamingTransport(
            help_=help_,
            connection_timeout=profile.connection_timeout,
            read_timeout=profile.read_timeout,
            connection_verify=verify or True,
        )
        return kwargs
    kwargs |= env_settings_kwargs(verify=verify)
    return kwargs


def default_credential(env: Mapping[str, str] | None = None) -> TokenCredential:
    """Managed identity in Azure (user-assigned when AZURE_CLIENT_ID is set)."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    env = os.environ if env is None else env
    client_id = env.get("AZURE_CLIENT_ID")
    if client_id and env.get("IDENTITY_ENDPOINT"):
        return ManagedIdentityCredential(client_id=client_id)
    return DefaultAzureCredential(managed_identity_client_id=client_id)


# The CA-bundle variables the requests library reads (in this order, this exact spelling) when
# it may read the environment (``trust_env``); proxies it reads from any ``*_proxy`` variable.
_CA_BUNDLE_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def env_settings_kwargs(
    env: Mapping[str, str] | None = None,
    *,
    platform: str = sys.platform,
    verify: str | None = None,
) -> dict[str, Any]:
    """``use_env_settings=False`` for the SDK clients on Linux when no proxy variable is set
    (in any letter case): the requests library would otherwise scan the whole environment on
    every request (a few ms a package). A CA bundle it would have read there
    (``REQUESTS_CA_BUNDLE``, else ``CURL_CA_BUNDLE``) is passed as ``connection_verify``
    instead, unless the caller trusts its own CA (``verify``, which wins as it would in
    requests). With a proxy variable, or on another platform (system proxy settings), the
    default (read them) stays."""
    env = os.environ if env is None else env
    own = {"connection_verify": verify} if verify else {}
    if not platform.startswith("linux") or any(n.lower().endswith("_proxy") for n in env):
        return own
    bundle = next((env[name] for name in _CA_BUNDLE_ENV if env.get(name)), None)
    if bundle and not verify:
        own = {"connection_verify": bundle}
    return {"use_env_settings": False, **own}


def key_client(
    settings: Settings,
    credential: TokenCredential,
    *,
    ca_bundle: str | None = None,
    profile: ClientProfile = FUNCTION_CLIENTS,
) -> KeyClient:
    """A KeyClient for the configured HSM. Challenge-resource verification stays on except for
    a loopback HSM (the local emulator), where the SDK cannot verify it."""
    kwargs = {
        "retry_total": profile.retries(settings),
        "retry_backoff_factor": settings.retry_backoff,
        "retry_backoff_max": settings.retry_backoff_max,
        **_connection_kwargs(profile, profile.hsm_help, verify=ca_bundle),
    }
    if is_loopback(settings.hsm_url):
        kwargs["verify_challenge_resource"] = False
    return KeyClient(settings.hsm_url, credential, **kwargs)


def hsm_adapter(
    settings: Settings,
    credential: TokenCredential,
    *,
    ca_bundle: str | None = None,
    profile: ClientProfile = FUNCTION_CLIENTS,
) -> HsmAdapter:
    """The pipeline's HSM adapter: one KeyClient (one connection pool and token) for every
    call, the AES check value included."""
    client = key_client(settings, credential, ca_bundle=ca_bundle, profile=profile)
    return HsmAdapter(client, settings)


def blob_service(
    settings: Settings,
    env: Mapping[str, str] | None = None,
    credential: TokenCredential | None = None,
    *,
    profile: ClientProfile = FUNCTION_CLIENTS,
) -> BlobServiceClient:
    """``BYOK_STORAGE`` as a connection string, or identity-based ``BYOK_STORAGE__blobServiceUri``.

    Raises:
        ConfigError: neither is set.
    """
    env = os.environ if env is None else env
    kwargs: dict[str, Any] = {
        "retry_total": profile.retries(settings),
        **_connection_kwargs(profile, profile.storage_help),
    }
    if profile.storage_backoff is not None:
        initial, base, jitter = profile.storage_backoff
        kwargs |= {
            "initial_backoff": initial,
            "increment_base": base,
            "random_jitter_range": jitter,
        }
    conn = env.get("BYOK_STORAGE")
    if conn:
        return BlobServiceClient.from_connection_string(conn, **kwargs)
    uri = env.get("BYOK_STORAGE__blobServiceUri")
    if uri:
        return BlobServiceClient(uri, credential=credential or default_credential(env), **kwargs)
    raise ConfigError("set BYOK_STORAGE (connection string) or BYOK_STORAGE__blobServiceUri")


def audit_signer(
    settings: Settings,
    *,
    role: str,
    credential: TokenCredential | None = None,
    ca_bundle: str | None = None,
    profile: ClientProfile = FUNCTION_CLIENTS,
) -> Any:
    """The key that signs this process's trail batches: for the pipeline the HSM key of
    BYOK_AUDIT_SIGNING_KID (needs keys/sign on it, and keys/read); for a person
    BYOK_AUDIT_PERSON_KEY, an EC P-256 PEM file or an HSM kid of their own.

    Raises:
        ConfigError: the setting for ``role`` is missing or names no usable EC P-256 key.
        TransientError: the HSM key could not be read.
    """
    from byok_pipeline.audit.signers import FileSigner

    ref = settings.audit_signing_kid if role == "pipeline" else settings.audit_person_key
    if not ref:
        name = "BYOK_AUDIT_SIGNING_KID" if role == "pipeline" else "BYOK_AUDIT_PERSON_KEY"
        raise ConfigError(
            f"audit records are signed: set {name} "
            + (
                "(`byok audit init` creates the pipeline's key in the HSM)"
                if role == "pipeline"
                else "(your EC P-256 key: a PEM file, or the versioned kid of a key in your HSM)"
            )
        )
    if not ref.startswith("https://"):
        return FileSigner.from_pem(ref)
    return hsm_signer(ref, credential or default_credential(), ca_bundle=ca_bundle, profile=profile)


def hsm_signer(
    kid: str,
    credential: TokenCredential,
    *,
    ca_bundle: str | None = None,
    profile: ClientProfile = FUNCTION_CLIENTS,
) -> Any:
    """An :class:`~byok_pipeline.audit.signers.HsmSigner` for ``kid`` (read once).

    Raises:
        ConfigError: not an EC P-256 key that may sign.
        TransientError: the HSM could not be read.
    """
    from azure.core.exceptions import AzureError

    from byok_pipeline.adapters.keyvault import translate
    from byok_pipeline.audit.signers import HsmSigner, p256_public_key

    # a signature is inside an audit append's deadline: one quick retry, short timeouts
    quick = ClientProfile(
        connection_timeout=min(3, profile.connection_timeout),
        read_timeout=5,
        retry_connect=profile.retry_connect,
        hsm_help=profile.hsm_help,
    )

    def kwargs() -> dict[str, Any]:  # a transport of its own for each client
        made = {"retry_total": 1, **_connection_kwargs(quick, quick.hsm_help, verify=ca_bundle)}
        if is_loopback(kid):
            made["verify_challenge_resource"] = False
        return made

    parts = urlsplit(kid)
    path = parts.path.strip("/").split("/")
    if len(path) != 3 or path[0] != "keys":
        raise ConfigError(
            f"the audit signing key {kid!r} is not a versioned kid (keys/NAME/VERSION)"
        )
    keys = KeyClient(f"{parts.scheme}://{parts.netloc}", credential, **kwargs())
    try:
        key = keys.get_key(path[1], path[2])
    except AzureError as exc:
        raise translate(exc, "reading the audit signing key") from None
    client = CryptographyClient(key, credential, **kwargs())
    jwk: Any = key.key  # JsonWebKey sets its fields dynamically

    def text(value: Any) -> str:  # the SDK's enums, or plain strings
        return str(getattr(value, "value", value))

    if text(jwk.kty) not in ("EC", "EC-HSM") or text(jwk.crv) != "P-256" or not jwk.x:
        raise ConfigError(f"the audit signing key {kid} is not an EC P-256 key")
    if "sign" not in [text(o) for o in (jwk.key_ops or [])]:
        raise ConfigError(f"the audit signing key {kid} may not sign (key_ops)")
    public = p256_public_key(jwk)
    return HsmSigner(client, str(key.id), public)


def audit_sink(
    settings: Settings,
    *,
    role: str = "pipeline",
    credential: TokenCredential | None = None,
    ca_bundle: str | None = None,
    profile: ClientProfile = FUNCTION_CLIENTS,
) -> AuditSink:
    """Every audit event goes first to the signed trail (append blobs: the pipeline's chains in
    the audit container, a person's in the people container); once appended, the stored
    records go on to OpenTelemetry (Application Insights, or local JSON lines; set up lazily)
    and, when BYOK_AUDIT_LOG is set, to that local JSON-lines file. ``emit`` raises unless the
    trail append succeeded.

    Without storage settings (a ``byok kek`` command against the HSM only), BYOK_AUDIT_LOG
    is the record: OpenTelemetry and the local file (unsigned).

    Raises:
        ConfigError: neither storage nor BYOK_AUDIT_LOG is configured; the signing key is not.
        TransientError: the HSM signing key could not be read.
    """
    import getpass
    import socket

    from byok_pipeline.adapters.telemetry import TelemetryAuditSink
    from byok_pipeline.audit.trail import AuditTrail, TrailAuditSink

    after: list[AuditSink] = [TelemetryAuditSink(settings)]
    if settings.audit_log:
        after.append(JsonLinesAuditSink(settings.audit_log))
    try:
        service = blob_service(settings, profile=profile)
    except ConfigError:
        if settings.audit_log:
            return FanoutAuditSink(*after)
        raise ConfigError(
            "audit events need the audit trail (BYOK_STORAGE) or a local file (BYOK_AUDIT_LOG)"
        ) from None
    signer = audit_signer(
        settings, role=role, credential=credential, ca_bundle=ca_bundle, profile=profile
    )
    if role == "pipeline":
        container = settings.audit_container
        writer = f"{os.environ.get('WEBSITE_INSTANCE_ID', socket.gethostname())}:{os.getpid()}"
    else:
        container = settings.audit_people_container
        writer = f"{getpass.getuser()}@{socket.gethostname()}"
    # one append never outlives half the lease of the package it records
    trail = AuditTrail(
        service,
        container,
        signer=signer,
        role=role,
        writer=writer[:200],
        deadline=settings.lease_seconds / 2,
    )
    return TrailAuditSink(trail, then=FanoutAuditSink(*after))


def build_deps(
    settings: Settings,
    *,
    env: Mapping[str, str] | None = None,
    credential: TokenCredential | None = None,
    ca_bundle: str | None = None,
    audit: AuditSink | None = None,
    profile: ClientProfile = FUNCTION_CLIENTS,
) -> Deps:
    """All dependencies of :func:`byok_pipeline.processing.processor.process_blob`."""
    env = os.environ if env is None else env
    cred = credential or default_credential(env)
    ca = ca_bundle or env.get("BYOK_HSM_CA_BUNDLE") or None
    return Deps(
        settings=settings,
        store=BlobStore(blob_service(settings, env, profile=profile), settings),
        hsm=hsm_adapter(settings, cred, ca_bundle=ca, profile=profile),
        audit=audit or audit_sink(settings, credential=cred, ca_bundle=ca, profile=profile),
    )
