"""Event Grid ``Microsoft.Storage.BlobCreated`` events, parsed into a frozen dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from byok_pipeline.core.errors import PipelineError

BLOB_CREATED = "Microsoft.Storage.BlobCreated"
_SUBJECT = re.compile(
    r"/blobServices/default/containers/(?P<container>[^/]+)/blobs/(?P<blob>.+)", re.DOTALL
)


class EventError(PipelineError):
    """Not a BlobCreated event for a blob."""

    reason = "bad_event"


@dataclass(frozen=True)
class BlobCreatedEvent:
    """The parts of a BlobCreated event the pipeline uses."""

    id: str
    container: str
    blob_name: str
    etag: str | None
    content_length: int | None
    url: str | None
    event_time: str | None
    api: str | None
    client_request_id: str | None

    @classmethod
    def parse(cls, event: dict[str, Any]) -> BlobCreatedEvent:
        """Accept the Event Grid schema (``eventType``/``subject``) and CloudEvents (``type``).

        Raises:
            EventError: another event type, or a subject that does not name a blob.
        """
        etype = event.get("eventType") or event.get("type")
        if etype != BLOB_CREATED:
            raise EventError(f"not a BlobCreated event: {etype!r}")
        # fullmatch: a name ending in a newline stays that name (``$`` would cut the newline)
        match = _SUBJECT.fullmatch(str(event.get("subject", "")))
        if match is None:
            raise EventError("BlobCreated subject does not name a blob")
        data = event.get("data") or {}
        length = data.get("contentLength")
        return cls(
            id=str(event.get("id", "")),
            container=match["container"],
            blob_name=match["blob"],
            etag=data.get("eTag"),
            content_length=int(length) if isinstance(length, int) else None,
            url=data.get("url"),
            event_time=event.get("eventTime") or event.get("time"),
            api=data.get("api"),
            client_request_id=data.get("clientRequestId"),
        )


def blob_created(
    container: str,
    blob_name: str,
    *,
    etag: str,
    length: int,
    account_url: str,
    event_id: str,
    event_time: str,
) -> dict[str, Any]:
    """A BlobCreated event as Event Grid would deliver it (the local runner's stand-in)."""
    return {
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/local"
        "/providers/Microsoft.Storage/storageAccounts/local",
        "subject": f"/blobServices/default/containers/{container}/blobs/{blob_name}",
        "eventType": BLOB_CREATED,
        "eventTime": event_time,
        "id": event_id,
        "data": {
            "api": "PutBlob",
            "eTag": etag,
            "contentType": "application/octet-stream",
            "contentLength": length,
            "blobType": "BlockBlob",
            "url": f"{account_url}/{container}/{blob_name}",
        },
        "dataVersion": "",
        "metadataVersion": "1",
    }
