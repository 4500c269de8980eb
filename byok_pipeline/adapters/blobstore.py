"""Blob Storage adapter: incoming packages, status documents, leases, archive and quarantine.

Needs, on the storage account: read/delete in the incoming container, write in status, archive
and quarantine (role ``Storage Blob Data Contributor``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobLeaseClient, BlobServiceClient

from byok_pipeline.adapters.transient import as_transient
from byok_pipeline.core.errors import InProgress, PipelineError, TransientError
from byok_pipeline.core.settings import Settings
from byok_pipeline.core.status import StatusDoc
from offline_packager.kid import is_key_name


class BlobGone(PipelineError):
    """The incoming blob no longer exists (already processed, or deleted by its uploader)."""

    reason = "blob_gone"


class StatusConflict(InProgress):
    """The lease was lost (another worker took over); redeliver later."""

    reason = "status_conflict"


@dataclass(frozen=True)
class IncomingBlob:
    """A dropped package. ``data`` is None when the blob is over the size cap (never read)."""

    name: str
    etag: str
    size: int
    data: bytes | None
    metadata: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None


def _transient_or_raise(exc: AzureError, what: str) -> TransientError:
    transient = as_transient(exc, what)
    if transient is not None:
        return transient
    return TransientError(
        f"{what}: {type(exc).__name__} {getattr(exc, 'error_code', '')}".strip(),
        reason="storage_error",
    )


class BlobStore:
    """All storage I/O of the pipeline. Status documents live at ``packages/<sha256>.json``."""

    def __init__(self, service: BlobServiceClient, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self._lease_times: dict[int, float] = {}

    # -- containers -------------------------------------------------------------------------
    def ensure_containers(self) -> None:
        """Create the pipeline's containers if missing (local stack; in Azure, Bicep does it)."""
        s = self.settings
        for name in (
            s.incoming_container,
            s.status_container,
            s.archive_container,
            s.quarantine_container,
            s.audit_container,
            s.audit_people_container,
            s.config_container,
            s.approvals_container,
        ):
            with contextlib.suppress(ResourceExistsError):
                self.service.create_container(name)

    # -- incoming ---------------------------------------------------------------------------
    def read_incoming(self, name: str) -> IncomingBlob:
        """Read a dropped blob in one ranged GET of at most cap + 1 bytes: a blob over the cap
        is never read whole (its ``data`` is None).

        Raises:
            BlobGone: the blob does not exist.
            TransientError: storage failed.
        """
        blob = self.service.get_blob_client(self.settings.incoming_container, name)
        cap = self.settings.max_package_bytes
        try:
            try:
                downloader = blob.download_blob(offset=0, length=cap + 1)
                data = downloader.readall()
                props = downloader.properties
            except HttpResponseError as exc:
                if exc.status_code != 416:  # 416: a range of an empty blob
                    raise
                props = blob.get_blob_properties()
                data = b""
        except ResourceNotFoundError:
            raise BlobGone(f"blob {name} is no longer in the incoming container") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, f"reading {name}") from None
        meta = dict(props.metadata or {})
        if props.size > cap or len(data) > cap:
            size = max(props.size, len(data))
            with contextlib.suppress(AzureError):  # a ranged read reports the range: ask the total
                size = blob.get_blob_properties().size
            return IncomingBlob(name, props.etag, size, None, meta, props.creation_time)
        return IncomingBlob(name, props.etag, len(data), data, meta, props.creation_time)

    def list_incoming_items(self) -> list[tuple[str, datetime | None]]:
        """(name, last modified) of every blob waiting in the incoming container."""
        container = self.service.get_container_client(self.settings.incoming_container)
        try:
            return [(b.name, b.last_modified) for b in container.list_blobs()]
        except AzureError as exc:
            raise _transient_or_raise(exc, "listing incoming") from None

    def list_incoming(self) -> list[str]:
        container = self.service.get_container_client(self.settings.incoming_container)
        try:
            return [b.name for b in container.list_blobs()]
        except AzureError as exc:
            raise _transient_or_raise(exc, "listing incoming") from None

    def upload_incoming(self, name: str, data: bytes, metadata: dict[str, str]) -> str:
        """Drop a package (``byok upload``). Refuses to replace an existing blob; returns the etag.

        Raises:
            ResourceExistsError: a blob of that name is waiting already.
        """
        blob = self.service.get_blob_client(self.settings.incoming_container, name)
        result = blob.upload_blob(data, overwrite=False, metadata=metadata)
        return str(result["etag"])

    def dispose(
        self, blob: IncomingBlob, container: str, dest_name: str, metadata: dict[str, str]
    ) -> str | None:
        """Copy the package to ``container/dest_name`` then delete it from incoming, if unchanged.

        Idempotent: a source already moved (404 on copy) counts as moved. Returns
        ``container/dest_name``, or None when a newer drop replaced the blob (it is left for its
        own event).

        Raises:
            TransientError: storage failed (the source is kept).
        """
        src = self.service.get_blob_client(self.settings.incoming_container, blob.name)
        dest = self.service.get_blob_client(container, dest_name)
        where = f"{container}/{dest_name}"
        try:
            copy = dest.start_copy_from_url(
                src.url,
                metadata=metadata,
                source_etag=blob.etag,
                source_match_condition=_if_match(),
            )
            if copy.get("copy_status") not in ("success", None):
                self._wait_copy(dest)
            src.delete_blob(etag=blob.etag, match_condition=_if_match())
        except ResourceNotFoundError:
            return where  # moved by an earlier delivery
        except ResourceModifiedError:
            return None
        except HttpResponseError as exc:
            if exc.status_code == 412:  # a newer drop under this name: leave it
                return None
            raise _transient_or_raise(exc, f"moving {blob.name}") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, f"moving {blob.name}") from None
        return where

    @staticmethod
    def _wait_copy(dest: Any) -> None:
        for _ in range(100):
            status = dest.get_blob_properties().copy.status
            if status == "success":
                return
            if status in ("failed", "aborted"):
                raise TransientError("server-side copy failed", reason="storage_error")
            time.sleep(0.1)
        raise TransientError("server-side copy did not finish", reason="storage_error")

    # -- status documents -------------------------------------------------------------------
    def _status_blob(self, path: str) -> Any:
        return self.service.get_blob_client(self.settings.status_container, path)

    def create_status(self, path: str, doc: StatusDoc) -> str | None:
        """Create the document only if absent (``if_none_match='*'``): the claim. Returns its
        ETag when this call created it, None when it existed.

        The name index is written first, so a worker dying between the two leaves nothing
        claimed that ``byok status NAME`` cannot find.

        Raises:
            TransientError: storage failed.
        """
        self.index_name(doc, path)
        try:
            result = self._status_blob(path).upload_blob(
                doc.to_json(), overwrite=False, metadata=_status_meta(doc)
            )
        except ResourceExistsError:
            return None
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):  # exists, or leased by another worker
                return None
            raise _transient_or_raise(exc, "creating status") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, "creating status") from None
        return str(result["etag"])

    def index_name(self, doc: StatusDoc, path: str) -> None:
        """Point ``names/<blob name>`` at the status document of the latest drop of that name.

        Raises:
            TransientError: storage failed.
        """
        body = json.dumps({"status": path, "package_sha256": doc.package_sha256}).encode()
        try:
            self._status_blob(f"names/{quote(doc.blob_name, safe='')}.json").upload_blob(
                body, overwrite=True
            )
        except AzureError as exc:
            raise _transient_or_raise(exc, "indexing status") from None

    def indexed_path(self, blob_name: str) -> str | None:
        """The status document ``names/<blob name>`` points at, None when not indexed.

        Raises:
            TransientError: storage failed.
        """
        try:
            raw = (
                self._status_blob(f"names/{quote(blob_name, safe='')}.json")
                .download_blob()
                .readall()
            )
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise _transient_or_raise(exc, "reading status index") from None
        return str(json.loads(raw)["status"])

    # -- claims: canonical identities, and key names a policy protects -------------------------
    def claim_identity(self, package_id: str, path: str) -> tuple[str, str | None]:
        """Make ``identities/<package_id>`` point at ``path`` unless it points elsewhere
        (exactly-once across reformatted copies). Returns (the path it points at, its etag for
        :meth:`take_identity`).

        Raises:
            TransientError: storage failed.
        """
        owner, etag, _ = self._claim(f"identities/{package_id}.json", path, "identity")
        return owner, etag

    def take_identity(self, package_id: str, path: str, etag: str | None) -> bool:
        """Re-point an identity whose record was refused at ``path``, if nobody else did first
        (``etag`` condition). True if taken.

        Raises:
            TransientError: storage failed.
        """
        return self._take(f"identities/{package_id}.json", path, etag, "identity")

    def claim_key_name(self, key_name: str, path: str) -> tuple[str, str | None, bool]:
        """Make ``keys/<key name, case-folded>`` point at ``path`` unless it points elsewhere:
        one record at a time imports a key name the policy protects from new versions (Managed
        HSM's names are case-insensitive). Returns (the path it points at, its etag for
        :meth:`take_key_name`, whether this call created it).

        Raises:
            TransientError: storage failed.
        """
        return self._claim(_key_name_blob(key_name), path, "key name")

    def take_key_name(self, key_name: str, path: str, etag: str | None) -> bool:
        """Re-point a key name whose record has finished at ``path``, if nobody else did first
        (``etag`` condition). True if taken.

        Raises:
            TransientError: storage failed.
        """
        return self._take(_key_name_blob(key_name), path, etag, "key name")

    def _claim(self, name: str, path: str, what: str) -> tuple[str, str | None, bool]:
        blob = self._status_blob(name)
        body = json.dumps({"status": path}).encode()
        try:
            result = blob.upload_blob(body, overwrite=False)
            return path, str(result["etag"]), True
        except ResourceExistsError:
            pass
        except HttpResponseError as exc:
            if exc.status_code not in (409, 412):
                raise _transient_or_raise(exc, f"claiming {what}") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, f"claiming {what}") from None
        try:
            downloader = blob.download_blob()
            raw = downloader.readall()
        except AzureError as exc:
            raise _transient_or_raise(exc, f"reading {what}") from None
        return str(json.loads(raw)["status"]), downloader.properties.etag, False

    def _take(self, name: str, path: str, etag: str | None, what: str) -> bool:
        body = json.dumps({"status": path}).encode()
        try:
            self._status_blob(name).upload_blob(
                body, overwrite=True, etag=etag, match_condition=_if_match()
            )
        except ResourceModifiedError:
            return False
        except HttpResponseError as exc:
            if exc.status_code == 412:
                return False
            raise _transient_or_raise(exc, f"claiming {what}") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, f"claiming {what}") from None
        return True

    def load_status(self, path: str) -> StatusDoc | None:
        try:
            return StatusDoc.from_json(self._status_blob(path).download_blob().readall())
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise _transient_or_raise(exc, "reading status") from None

    def lease(self, path: str, *, etag: str | None = None) -> BlobLeaseClient:
        """Take the processing lease on a status document; with ``etag``, only if the document
        is still the one that ETag names (so the caller need not read it again).

        Raises:
            InProgress: another worker holds it (or, with ``etag``, changed the document).
            TransientError: storage failed.
        """
        lease = BlobLeaseClient(self._status_blob(path))
        condition: dict[str, Any] = (
            {"etag": etag, "match_condition": _if_match()} if etag is not None else {}
        )
        try:
            lease.acquire(lease_duration=self.settings.lease_seconds, **condition)
            self._lease_times[id(lease)] = time.monotonic()
        except HttpResponseError as exc:
            if exc.status_code == 412:  # ResourceModifiedError: the etag condition failed
                raise InProgress(f"{path} was changed by another worker") from None
            if exc.status_code == 409:  # LeaseAlreadyPresent
                raise InProgress(f"{path} is being processed by another worker") from None
            raise _transient_or_raise(exc, "leasing status") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, "leasing status") from None
        return lease

    def save_status(
        self,
        path: str,
        doc: StatusDoc,
        lease: BlobLeaseClient,
        *,
        renew: bool = False,
        keep_for: float | None = None,
    ) -> None:
        """Overwrite the document under the lease, renewing it when due: always with ``renew``;
        with ``keep_for``, when less than that many seconds of the lease would be left.

        Raises:
            StatusConflict: the lease was lost.
            TransientError: storage failed.
        """
        try:
            self._renew_if_due(lease, force=renew, keep_for=keep_for)
            self._status_blob(path).upload_blob(
                doc.to_json(), overwrite=True, lease=lease, metadata=_status_meta(doc)
            )
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):  # lease lost or broken
                raise StatusConflict(f"lost the lease on {path}") from None
            raise _transient_or_raise(exc, "writing status") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, "writing status") from None

    def renew_if_due(self, lease: BlobLeaseClient, *, keep_for: float) -> None:
        """Renew the lease when less than ``keep_for`` seconds (plus a margin) are left of it.

        Raises:
            StatusConflict: the lease was lost.
            TransientError: storage failed.
        """
        try:
            self._renew_if_due(lease, keep_for=keep_for)
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                raise StatusConflict("lost the lease") from None
            raise _transient_or_raise(exc, "renewing the lease") from None
        except AzureError as exc:
            raise _transient_or_raise(exc, "renewing the lease") from None

    def _renew_if_due(
        self, lease: BlobLeaseClient, *, force: bool = False, keep_for: float | None = None
    ) -> None:
        """Renew when a third of the lease has passed since it was taken or last renewed, or
        when less than ``keep_for`` seconds (plus a 2 s margin) would be left of it."""
        now = time.monotonic()
        taken = self._lease_times.get(id(lease))
        due = self.settings.lease_seconds / 3
        if keep_for is not None:
            due = min(due, self.settings.lease_seconds - keep_for - 2.0)
        if force or taken is None or now - taken > due:
            lease.renew()
            self._lease_times[id(lease)] = now

    def release(self, lease: BlobLeaseClient, *, keep: bool = False) -> None:
        """Release the lease (``keep``: let it run out by itself, one request less)."""
        self._lease_times.pop(id(lease), None)
        if keep:
            return
        with contextlib.suppress(AzureError):  # it expires by itself
            lease.release()

    def put_status(self, path: str, doc: StatusDoc, *, index: bool = True) -> None:
        """Write a document nobody else writes (a duplicate drop's record, a retired record)."""
        try:
            self._status_blob(path).upload_blob(
                doc.to_json(), overwrite=True, metadata=_status_meta(doc)
            )
        except AzureError as exc:
            raise _transient_or_raise(exc, "writing status") from None
        if index:
            self.index_name(doc, path)

    def iter_statuses(self, state: str | None = None) -> Iterator[StatusDoc]:
        """Every status document (``packages/`` and ``duplicates/``), optionally by state."""
        for _, doc in self.iter_status_items(state):
            yield doc

    def iter_status_items(self, state: str | None = None) -> Iterator[tuple[str, StatusDoc]]:
        """(path, document) of every status document, optionally by state."""
        container = self.service.get_container_client(self.settings.status_container)
        try:
            for prefix in ("packages/", "duplicates/"):
                for item in container.list_blobs(name_starts_with=prefix, include=["metadata"]):
                    if state is not None and (item.metadata or {}).get("state") != state:
                        continue
                    doc = self.load_status(item.name)
                    if doc is not None:
                        yield item.name, doc
        except AzureError as exc:
            raise _transient_or_raise(exc, "listing statuses") from None

    def status_by_name(self, blob_name: str) -> StatusDoc | None:
        """The latest status of the package dropped as exactly ``blob_name``.

        Raises:
            TransientError: storage failed.
        """
        path = self.indexed_path(blob_name)
        return None if path is None else self.load_status(path)

    def status_by_blob_or_key_name(self, name: str) -> StatusDoc | None:
        """``byok status NAME``: the blob named exactly ``name`` first; else, when ``name`` is a
        key name (no ``.byok``), the drop ``NAME.byok``. Nothing else is guessed.

        Raises:
            TransientError: storage failed.
        """
        doc = self.status_by_name(name)
        if doc is None and is_key_name(name):
            doc = self.status_by_name(f"{name}.byok")
        return doc


def _key_name_blob(key_name: str) -> str:
    return f"keys/{quote(key_name.casefold(), safe='')}.json"


def _if_match() -> Any:
    from azure.core import MatchConditions

    return MatchConditions.IfNotModified


def _status_meta(doc: StatusDoc) -> dict[str, str]:
    return {"state": doc.state or "none", "key_name": doc.key_name or ""}
