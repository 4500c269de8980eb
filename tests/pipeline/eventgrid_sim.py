"""Event Grid, simulated faithfully: at-least-once (duplicates) and unordered delivery of
BlobCreated events, each handed to the Function's blob trigger in-process, with redelivery
when the invocation fails (as the Functions host and Event Grid retry policy do)."""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobClient
from azurefunctions.extensions.base import Datum
from azurefunctions.extensions.bindings.blob import BlobClient as BlobClientBinding
from azurefunctions.extensions.bindings.blob.blobClientConverter import BlobClientConverter

from byok_pipeline.core.events import BlobCreatedEvent

EVENTS = Path(__file__).resolve().parent.parent / "events"


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return data


def event_for(
    template: str, container: str, blob_name: str, etag: str, length: int
) -> dict[str, Any]:
    """A recorded payload re-targeted at a blob of the local stack."""
    event = copy.deepcopy(recorded(template))
    event["subject"] = f"/blobServices/default/containers/{container}/blobs/{blob_name}"
    event["id"] = str(uuid.uuid4())
    event["data"]["eTag"] = etag
    event["data"]["contentLength"] = length
    base = event["data"]["url"].split("/byok-incoming/")[0]
    event["data"]["url"] = f"{base}/{container}/{blob_name}"
    return event


@dataclass(frozen=True)
class ModelBindingData:
    """The host's ``model_binding_data`` for an SDK-type blob binding (no blob content: the
    host sends only where the blob is and which connection setting reaches it)."""

    content: str
    version: str = "1.0"
    source: str = "AzureStorageBlobs"
    content_type: str = "application/json"


def blob_client(event: dict[str, Any], connection: str = "BYOK_STORAGE") -> BlobClient:
    """What the worker passes to a ``BlobClient``-typed blob trigger (source=EventGrid): the
    event's blob as model binding data, decoded by the extension's own converter (which builds
    the client from the ``connection`` app setting, as in Azure)."""
    parsed = BlobCreatedEvent.parse(event)
    content = {
        "Connection": connection,
        "ContainerName": parsed.container,
        "BlobName": parsed.blob_name,
    }
    datum = Datum(ModelBindingData(json.dumps(content)), "model_binding_data")
    client: BlobClient = BlobClientConverter.decode(
        datum, trigger_metadata={}, pytype=BlobClientBinding
    )
    return client


def deliver_all(
    events: list[dict[str, Any]],
    invoke: Callable[[dict[str, Any]], None],
    *,
    duplicates: int = 1,
    seed: int = 7,
    max_rounds: int = 50,
) -> dict[str, int]:
    """Deliver every event ``duplicates`` times in a shuffled order; an invocation that raises
    is retried in a later round. Returns counts of successes and failed invocations."""
    rng = random.Random(seed)  # noqa: S311  # shuffling test deliveries, not cryptography
    queue = [e for e in events for _ in range(duplicates)]
    stats = {"succeeded": 0, "failed_invocations": 0}
    for _ in range(max_rounds):
        if not queue:
            return stats
        rng.shuffle(queue)
        retry = []
        for event in queue:
            try:
                invoke(event)
                stats["succeeded"] += 1
            except Exception:  # noqa: BLE001  # the host marks the invocation failed and retries
                stats["failed_invocations"] += 1
                retry.append(event)
        queue = retry
    raise AssertionError("events still failing after the retry budget")
