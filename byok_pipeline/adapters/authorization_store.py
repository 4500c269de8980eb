"""Storage of what authorizes an import: the import policy (config container, written by policy
administrators only) and each package's manifest and signed approvals (approvals container,
under ``<package sha256>/``).

Needs: read on the config and approvals containers (the Function); write on the approvals
container (uploaders, ``byok upload`` / ``byok approve upload``); write on the config container
(policy administrators, ``byok policy set``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobServiceClient

from byok_pipeline.adapters.transient import as_transient
from byok_pipeline.core.approvals import MAX_APPROVAL_FILES
from byok_pipeline.core.errors import Rejected, TransientError
from byok_pipeline.core.policy import MAX_POLICY_BYTES, ImportPolicy, PolicyInvalid, load_policy
from byok_pipeline.core.settings import Settings
from offline_packager.approval import MAX_APPROVAL_BYTES

MANIFEST_BLOB = "manifest.json"
APPROVAL_PREFIX = "approval-"
MAX_MANIFEST_BYTES = 64 * 1024


def _transient(exc: AzureError, what: str) -> TransientError:
    return as_transient(exc, what) or TransientError(
        f"{what}: {type(exc).__name__} {getattr(exc, 'error_code', '') or ''}".strip(),
        reason="storage_error",
    )


@dataclass(frozen=True)
class Attachments:
    """A package's manifest bytes (None if it was uploaded without) and approval files."""

    manifest: bytes | None
    approvals: tuple[tuple[str, bytes], ...]
    unread: int = 0  # approval files over MAX_APPROVAL_FILES, listed but not read


class AuthorizationStore:
    """Reads the policy with its ETag cached and reads and writes attachments. A policy read
    less than BYOK_POLICY_CACHE_SECONDS ago is used as it is (no request); after that, one
    conditional GET (an unchanged policy costs a 304), so a change applies to the packages a
    worker starts at most that many seconds later. Every audit event names the policy
    (``policy_sha256``) that was applied."""

    def __init__(self, service: BlobServiceClient, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self._lock = threading.Lock()
        self._cached: tuple[str, ImportPolicy | PolicyInvalid, str] | None = None
        self._checked: tuple[float, ImportPolicy | PolicyInvalid | None, str | None] | None = None

    # -- the policy ---------------------------------------------------------------------------
    def policy_bytes(self) -> tuple[bytes, str] | None:
        """The policy blob's bytes and ETag; None when there is no policy blob.

        Raises:
            TransientError: storage failed.
            PolicyInvalid: the blob is over the size limit.
        """
        blob = self.service.get_blob_client(
            self.settings.config_container, self.settings.policy_blob
        )
        try:
            downloader = blob.download_blob(offset=0, length=MAX_POLICY_BYTES + 1)
            data = downloader.readall()
        except ResourceNotFoundError:
            return None
        except HttpResponseError as exc:
            if exc.status_code != 416:  # 416: a range of an empty blob
                raise _transient(exc, "reading the import policy") from None
            return b"", str(blob.get_blob_properties().etag)
        except AzureError as exc:
            raise _transient(exc, "reading the import policy") from None
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyInvalid(f"the policy blob is over {MAX_POLICY_BYTES} bytes")
        return data, str(downloader.properties.etag)

    def policy(self) -> ImportPolicy | None:
        """The configured policy (None: no policy blob, the safe defaults apply).

        Raises:
            PolicyInvalid: the configured policy is invalid, or missing while
                BYOK_POLICY_REQUIRED is set: nothing may be imported.
            TransientError: storage failed.
        """
        outcome, _ = self.snapshot()
        return _unwrap(outcome) if outcome is not None else None

    def snapshot(self) -> tuple[ImportPolicy | PolicyInvalid | None, str | None]:
        """The policy in force (or why none may be used) and the SHA-256 of the blob it came
        from, read together: a worker records the hash of exactly the policy it applied. From
        this worker's cache when read less than BYOK_POLICY_CACHE_SECONDS ago.

        Raises:
            TransientError: storage failed.
        """
        now = time.monotonic()
        with self._lock:
            checked = self._checked
        if checked is not None and now - checked[0] < self.settings.policy_cache_seconds:
            return checked[1], checked[2]
        try:
            outcome, sha = self._read()
        except PolicyInvalid as exc:  # over the size limit: no hash of a blob not read whole
            outcome, sha = exc, None
        with self._lock:
            self._checked = (now, outcome, sha)
        return outcome, sha

    def _read(self) -> tuple[ImportPolicy | PolicyInvalid | None, str | None]:
        with self._lock:
            cached = self._cached
        if cached is not None and not self._changed_since(cached[0]):
            return cached[1], cached[2]
        found = self.policy_bytes()
        if found is None:
            with self._lock:
                self._cached = None
            if self.settings.policy_required:  # deleted or never set: never the defaults
                return PolicyInvalid(
                    f"BYOK_POLICY_REQUIRED is set but {self.settings.config_container}/"
                    f"{self.settings.policy_blob} does not exist: a policy administrator sets "
                    "it with `byok policy set FILE`"
                ), None
            return None, None
        data, etag = found
        loaded: ImportPolicy | PolicyInvalid
        try:
            loaded = load_policy(data)
        except PolicyInvalid as exc:
            loaded = exc
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._cached = (etag, loaded, sha)
        return loaded, sha

    def _changed_since(self, etag: str) -> bool:
        """One conditional request: False when the blob still has ``etag`` (HTTP 304)."""
        blob = self.service.get_blob_client(
            self.settings.config_container, self.settings.policy_blob
        )
        try:
            blob.get_blob_properties(etag=etag, match_condition=MatchConditions.IfModified)
        except HttpResponseError as exc:
            if exc.status_code == 304:
                return False
            if exc.status_code == 404:
                return True
            raise _transient(exc, "reading the import policy") from None
        except AzureError as exc:
            raise _transient(exc, "reading the import policy") from None
        return True

    def put_policy(self, data: bytes, *, replaces: str | None = "*") -> str:
        """Write the policy blob (administrators). Returns the new ETag.

        ``replaces``: the ETag of the policy this one replaces (it is written only if the blob
        still has it), None when there is none yet (written only if the blob does not exist),
        ``"*"`` unconditionally. So two administrators setting a policy at once never record a
        wrong predecessor.

        Raises:
            Rejected: ``policy_invalid``: the policy changed since it was read (run again).
            TransientError: storage failed (a 403 says the caller is no policy administrator).
        """
        blob = self.service.get_blob_client(
            self.settings.config_container, self.settings.policy_blob
        )
        conditions: dict[str, Any] = {}
        if replaces is None:
            conditions = {"overwrite": False}
        elif replaces != "*":
            conditions = {
                "overwrite": True,
                "etag": replaces,
                "match_condition": MatchConditions.IfNotModified,
            }
        else:
            conditions = {"overwrite": True}
        try:
            result = blob.upload_blob(data, **conditions)
        except (ResourceExistsError, ResourceModifiedError):
            raise Rejected(
                "policy_invalid",
                "the import policy was changed by someone else meanwhile: run the command again",
            ) from None
        except AzureError as exc:
            raise _transient(exc, "writing the import policy") from None
        with self._lock:
            self._checked = None  # this process reads its own change at once
        return str(result["etag"])

    # -- attachments ---------------------------------------------------------------------------
    def attachments(self, package_sha256: str) -> Attachments:
        """The manifest and approvals stored for a package: bounded sizes, and at most
        MAX_APPROVAL_FILES approval files read (in name order; the others are counted).

        Raises:
            TransientError: storage failed.
        """
        container = self.service.get_container_client(self.settings.approvals_container)
        manifest: bytes | None = None
        approvals: list[tuple[str, bytes]] = []
        unread = 0
        try:
            for item in container.list_blobs(name_starts_with=f"{package_sha256}/"):
                leaf = item.name.split("/", 1)[1]
                if leaf == MANIFEST_BLOB:
                    manifest = self._read_bounded(item.name, int(item.size), MAX_MANIFEST_BYTES)
                elif leaf.startswith(APPROVAL_PREFIX):
                    if len(approvals) >= MAX_APPROVAL_FILES:
                        unread += 1
                        continue
                    data = self._read_bounded(item.name, int(item.size), MAX_APPROVAL_BYTES)
                    approvals.append((leaf, data if data is not None else b""))
        except AzureError as exc:
            raise _transient(exc, "reading the package's approvals") from None
        return Attachments(manifest, tuple(approvals), unread)

    def _read_bounded(self, name: str, size: int, limit: int) -> bytes | None:
        """The blob's bytes; None when the listing says it is over ``limit`` (never read), or
        when it is gone. An empty blob is ``b""`` (no ranged read: that would answer 416)."""
        if size > limit:
            return None
        if size == 0:
            return b""
        blob = self.service.get_blob_client(self.settings.approvals_container, name)
        try:
            data = blob.download_blob(offset=0, length=limit + 1).readall()
        except ResourceNotFoundError:
            return None
        return None if len(data) > limit else data

    def put_attachment(self, package_sha256: str, leaf: str, data: bytes) -> bool:
        """Store a manifest or an approval for a package; never replaces a different file.
        Returns False when the same bytes were already there.

        Raises:
            Rejected: ``approval_invalid``: another file is already stored under that name.
            TransientError: storage failed.
        """
        blob = self.service.get_blob_client(
            self.settings.approvals_container, f"{package_sha256}/{leaf}"
        )
        try:
            blob.upload_blob(data, overwrite=False)
        except ResourceExistsError:
            try:
                existing = blob.download_blob().readall()
            except AzureError as exc:
                raise _transient(exc, f"reading {leaf}") from None
            if existing != data:
                raise Rejected(
                    "approval_invalid",
                    f"another {leaf} is already stored for this package; name the new file "
                    "differently or ask an administrator to remove the old one",
                ) from None
            return False
        except AzureError as exc:
            raise _transient(exc, f"storing {leaf}") from None
        return True


def _unwrap(value: ImportPolicy | PolicyInvalid) -> ImportPolicy:
    if isinstance(value, PolicyInvalid):
        raise PolicyInvalid(value.message)  # a fresh exception each time, not the cached one
    return value
