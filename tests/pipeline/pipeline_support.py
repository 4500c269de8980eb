"""A local stack for pipeline tests: settings, deps, packaging and delivery helpers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives import serialization

from byok_pipeline.audit.events import MemoryAuditSink
from byok_pipeline.core.errors import TransientError
from byok_pipeline.core.metadata import ImportOptions, options_from_manifest
from byok_pipeline.core.settings import Settings
from byok_pipeline.localdev.azurite import Azurite
from byok_pipeline.localdev.stack import emulator_deps
from byok_pipeline.processing.processor import Deps, Outcome, process_blob
from managed_hsm_emulator.testing import EmulatorHandle
from offline_packager.kek import load_kek_pem
from offline_packager.kid import parse_kid
from offline_packager.packager import build_package
from offline_packager.target_keys import TargetKey, generate_target
from offline_packager.wrap import wrap_target


@dataclass
class Package:
    """A package made by the offline packager, with its manifest and the target (for checks)."""

    name: str
    data: bytes
    manifest: dict[str, Any]
    target: TargetKey

    @property
    def options(self) -> ImportOptions:
        return options_from_manifest(self.manifest)


@dataclass
class Stack:
    azurite: Azurite
    hsm: EmulatorHandle
    kek_name: str
    settings: Settings
    service: BlobServiceClient
    deps: Deps
    audit: MemoryAuditSink
    tmp: Path
    kek_kid: str = ""
    kek_pem: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, azurite: Azurite, hsm: EmulatorHandle, kek_name: str, prefix: str, tmp: Path,
               service: BlobServiceClient, **overrides: Any) -> Stack:  # fmt: skip
        deps = emulator_deps(hsm, service, prefix, **overrides)
        settings = deps.settings
        audit = deps.audit
        assert isinstance(audit, MemoryAuditSink)
        client = deps.hsm.client
        stack = cls(azurite, hsm, kek_name, settings, service, deps, audit, tmp)
        kek = client.get_key(kek_name)
        stack.kek_kid = str(kek.id)
        stack.kek_pem = _pem_of(kek)
        return stack

    def close(self) -> None:
        self.service.close()

    def env(self) -> dict[str, str]:
        """The settings a ``byok`` command (or a Function) needs for this stack's emulator,
        Azurite account and containers."""
        s = self.settings
        return {
            "BYOK_HSM_URL": self.hsm.url,
            "BYOK_HSM_CA_BUNDLE": str(self.hsm.ca),
            "BYOK_HSM_EMULATOR_DIR": str(self.hsm.data_dir),
            "BYOK_STORAGE": self.azurite.connection_string,
            "BYOK_INCOMING_CONTAINER": s.incoming_container,
            "BYOK_STATUS_CONTAINER": s.status_container,
            "BYOK_ARCHIVE_CONTAINER": s.archive_container,
            "BYOK_QUARANTINE_CONTAINER": s.quarantine_container,
            "BYOK_AUDIT_CONTAINER": s.audit_container,
            "BYOK_AUDIT_PEOPLE_CONTAINER": s.audit_people_container,
            "BYOK_CONFIG_CONTAINER": s.config_container,
            "BYOK_APPROVALS_CONTAINER": s.approvals_container,
        }

    def package(self, type_name: str, name: str | None = None, *, kid: str | None = None,
                key_ops: tuple[str, ...] | None = None) -> Package:  # fmt: skip
        target = generate_target(type_name)
        kek = load_kek_pem(self.kek_pem)
        key_id = parse_kid(kid or self.kek_kid)
        ciphertext = wrap_target(kek.public_key, target.plaintext)
        file_name = f"{name or type_name}.byok"
        built = build_package(
            kek=kek, kek_kid=key_id, ciphertext=ciphertext, target=target.public,
            key_ops=key_ops or target.type.default_key_ops, key_source={"kind": "software-generated"},
            package_name=file_name, created=datetime.now(UTC),
        )  # fmt: skip
        return Package(file_name, built.package_bytes, built.manifest, target)

    def drop(self, blob_name: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        return self.deps.store.upload_incoming(blob_name, data, metadata or {})

    def drop_package(self, pkg: Package, *, with_manifest: bool = True) -> str:
        meta = pkg.options.to_metadata() if with_manifest else {}
        return self.drop(pkg.name, pkg.data, meta)

    def deliver(self, blob_name: str) -> Outcome:
        return process_blob(blob_name, self.deps)

    def deliver_throttled(self, pkg: Package, *, retry_after: int = 120) -> TransientError:
        """Deliver ``pkg`` (dropped) while the HSM answers its import PUT with 429 and no wait
        is allowed (``throttle_wait_seconds`` 0): the package is handed back with
        ``throttled_until`` ``retry_after`` seconds ahead and stays in incoming. Returns the
        throttled error the delivery raised."""
        self.deps.settings = replace(self.deps.settings, throttle_wait_seconds=0.0)
        self.deps.hsm.settings = self.deps.settings
        key_name = pkg.name.removesuffix(".byok")
        self.hsm.inject_fault(
            "429", method="PUT", path=f"/keys/{key_name}", retry_after=retry_after
        )
        caught: TransientError | None = None
        try:
            self.deliver(pkg.name)
        except TransientError as exc:
            caught = exc
        finally:
            self.hsm.clear_faults()
        if caught is None or not caught.throttled:
            raise AssertionError(f"{pkg.name} was not handed back throttled: {caught!r}")
        return caught

    def blobs(self, container: str) -> list[str]:
        return sorted(b.name for b in self.service.get_container_client(container).list_blobs())

    def status_docs(self) -> list[dict[str, Any]]:
        c = self.service.get_container_client(self.settings.status_container)
        return [
            json.loads(c.download_blob(b.name).readall())
            for b in c.list_blobs()
            if b.name.startswith(("packages/", "duplicates/"))
        ]


def _pem_of(key: Any) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import rsa

    n = int.from_bytes(key.key.n, "big")
    e = int.from_bytes(key.key.e, "big")
    return (
        rsa.RSAPublicNumbers(e, n)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def key_versions(stack: Stack, key: str) -> list[Any]:
    """The versions of ``key`` in the emulator (the SDK's properties)."""
    return list(stack.hsm.key_client().list_properties_of_key_versions(key))


def deliver_soon(stack: Stack, name: str, tries: int = 10) -> Outcome:
    """Deliver again a few times, 0.1 s apart, while the pipeline hands the package back."""
    from byok_pipeline.core.errors import InProgress, TransientError

    last: Exception | None = None
    for _ in range(tries):
        try:
            return stack.deliver(name)
        except (TransientError, InProgress) as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"not done: {last!r}")
