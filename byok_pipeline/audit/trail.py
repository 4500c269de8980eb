"""The trail writer: one signed hash chain per writer, in append blobs (format:
:mod:`byok_pipeline.audit.records`).

A writer (one per process) starts its own chain on its first append, so writers never contend
for a blob: the normal cost of one append (a batch of events) is one ``Append Block`` request and
one signature. Appends carry an append-position condition (the length this writer last wrote),
so nothing of someone else's lands under this writer's records unnoticed:

- a request whose response was lost (timeout, connection reset) is looked up at the position it
  was sent for; not found, the very same bytes are sent again at that position, so a late
  original and its resend can never both land (the loser gets 412 and finds its own bytes);
- anything else found at that position is foreign: the writer leaves that chain (the verifier
  reports the foreign bytes, which no signature covers) and starts a new chain, so an attacker
  who can append cannot stop the pipeline's auditing;
- at a new UTC day, or when a blob nears the append-blob block limit, the chain continues in a
  new blob after a signed seal record naming it.

Every append is bounded by ``deadline`` seconds (retries, request timeouts and the wait for the
lock included, under half the package's lease); past it the caller gets a
:class:`TransientError` (``outcome_unknown`` when a request may still have landed). The next
append looks that batch up first: if it landed the chain goes on after it (the redelivered
package then records its events again: copies, which ``byok audit export`` skips, never gaps);
if it did not, or that cannot be told, the writer leaves the chain for a new one, so a late
landing never meets its next records. A chain never gets a seal before its start record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError

from byok_pipeline import __version__
from byok_pipeline.adapters.endpoints import EndpointUnreachable
from byok_pipeline.adapters.transient import LOGIN_REQUIRED, as_transient, is_throttling
from byok_pipeline.audit.events import AuditSink, utc_now
from byok_pipeline.audit.records import (
    SEAL_EVENT,
    START_EVENT,
    TRAIL_FIELDS,
    Signer,
    blob_name,
    build_batch,
    canonical,
    encode_line,
    new_chain_id,
)
from byok_pipeline.core.errors import TransientError
from byok_pipeline.core.status import utc

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient

log = logging.getLogger("byok_pipeline.audit.trail")
#: An append blob takes 50,000 blocks (one append each); move on to a new part before that.
MAX_BLOCKS = 49_000
#: One append is one block (at most 4 MiB); a batch is a few small events, far below.
MAX_BATCH_BYTES = 1024 * 1024
#: The default bound of one append, its retries included: under half the shortest lease (15 s).
APPEND_DEADLINE = 7.0


@dataclass
class TrailStats:
    """Counters of one writer (the benchmark prints them; tests assert the cheap path)."""

    appends: int = 0  # Append Block requests that wrote a batch
    records: int = 0
    requests: int = 0  # every storage request (appends, creates, look-ups)
    created: int = 0  # blobs created
    seals: int = 0
    settled: int = 0  # appends whose response was lost, found written (not sent twice)
    foreign: int = 0  # times foreign bytes were found in this writer's chain (a new chain began)
    conflicts: int = 0  # 412 answers


@dataclass
class _Head:
    """Where this writer's chain goes on."""

    chain_id: str
    blob: str
    day: date
    part: int
    offset: int  # the blob's length as this writer wrote it: the next append position
    blocks: int
    last: dict[str, Any] | None  # the chain's last record (None: the chain is not started)


class _Lost(Exception):
    """A request whose outcome is unknown (the response was lost)."""


class _Foreign(Exception):
    """Bytes this writer did not write stand in its chain."""


class AuditTrail:
    """Appends batches of audit events to this writer's own chain. Thread-safe.

    ``signer`` signs each batch (:class:`~byok_pipeline.audit.signers.HsmSigner` for the
    pipeline, a person's key for the CLI); ``role`` (``pipeline`` or ``person``) and ``writer``
    (free text: the host, the person) go into the chain's first record. ``clock`` decides the
    UTC day; ``monotonic`` and ``sleep`` are seams for tests.
    """

    def __init__(
        self,
        service: BlobServiceClient,
        container: str,
        *,
        signer: Signer,
        role: str,
        writer: str,
        clock: Callable[[], datetime] = utc_now,
        deadline: float = APPEND_DEADLINE,
        max_attempts: int = 8,
        backoff: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.container_name = container
        self._container: ContainerClient = service.get_container_client(container)
        self.signer = signer
        self.role = role
        self.writer = writer
        self._clock = clock
        self._deadline = deadline
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._head: _Head | None = None
        self._unsettled: tuple[_Head, bytes, list[dict[str, Any]]] | None = None
        self._deadline_at = 0.0
        self.stats = TrailStats()

    @property
    def chain_id(self) -> str | None:
        """This writer's current chain (None before its first append)."""
        return self._head.chain_id if self._head else None

    @property
    def head(self) -> tuple[str, int, str] | None:
        """``(chain_id, sequence, record_sha256)`` of the last record written, if any."""
        head = self._head
        if head is None or head.last is None:
            return None
        return head.chain_id, int(head.last["sequence"]), str(head.last["record_sha256"])

    # -- public -----------------------------------------------------------------------------
    def append(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Append one event; return it as stored. Raises as :meth:`append_many`."""
        return self.append_many([event])[-1]

    def append_many(self, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append ``events`` as one signed batch; return the records as stored (in order).

        Raises:
            TransientError: not appended within the deadline or the attempts
                (``outcome_unknown`` when a request may still have landed), or the storage
                refused (403: a missing role; 404: no such container), or the signer failed.
            ValueError: an event is not JSON, or the batch is too large for one append.
        """
        fields = [{k: v for k, v in e.items() if k not in TRAIL_FIELDS} for e in events]
        if not fields:
            return []
        if len(canonical({"events": fields})) > MAX_BATCH_BYTES:
            raise ValueError("the audit batch is too large for one append")
        deadline = self._monotonic() + self._deadline
        if not self._lock.acquire(timeout=max(self._deadline, 0.001)):
            raise TransientError(
                f"another append in this process held the trail past {self._deadline:g} s",
                reason="audit_trail",
            )
        try:
            return self._append_locked(fields, deadline)
        finally:
            self._lock.release()

    # -- internals --------------------------------------------------------------------------
    def _append_locked(self, fields: list[dict[str, Any]], deadline: float) -> list[dict[str, Any]]:
        self._deadline_at = deadline
        if self._monotonic() >= deadline:
            raise TransientError(
                f"the audit trail lock was free only after {self._deadline:g} s",
                reason="audit_trail",
            )
        self._settle_earlier()
        pending: tuple[_Head, bytes, list[dict[str, Any]]] | None = None  # sent, outcome unknown
        why = "no attempt made"
        throttled = False  # the last failure was storage saying "too many requests"
        for attempt in range(self._max_attempts):
            if attempt:
                left = deadline - self._monotonic()
                if left <= 0:
                    break
                self._sleep(min(self._backoff * 2 ** (attempt - 1), left))
            try:
                if pending is not None:  # its response was lost: look, else send the same bytes
                    head, data, records = pending
                    if self._landed(head, data):
                        self.stats.settled += 1
                    else:
                        self._append_block(head, data)  # a late original meets a 412: settled
                    pending = None
                    self._advance(head, data, records)
                    return self._events_of(records)
                now = self._clock()  # one reading: the blob's day and `recorded` agree
                head = self._ready_head(now)
                batch = self._batch(head, fields, now)
                data = b"".join(encode_line(r) for r in batch)
                pending = (head, data, batch)
                self._append_block(head, data)
                pending = None
                self._advance(head, data, batch)
                return self._events_of(batch)
            except EndpointUnreachable as exc:  # nothing was sent; a person is told at once
                raise TransientError(
                    f"audit trail append to {self.container_name}: {exc.message}",
                    reason=exc.reason,
                ) from None
            except _Lost as exc:
                why, throttled = str(exc), False
            except _Foreign as exc:
                pending = None
                why = str(exc)
                self._leave_chain(str(exc))
            except HttpResponseError as exc:  # answered: the request did not land
                pending = None
                throttled = is_throttling(exc)
                why = self._answered(exc)
            except AzureError as exc:
                why, throttled = type(exc).__name__, False
        if pending is not None:
            self._unsettled = pending  # looked up first by the next append
        raise TransientError(
            f"audit trail append to {self.container_name} failed ({why})"
            + ("; a request whose response was lost may have been recorded" if pending else ""),
            reason="audit_trail",
            outcome_unknown=pending is not None,
            throttled=throttled and pending is None,
        )

    def _answered(self, exc: HttpResponseError) -> str:
        """Why an append was answered with an error (then it did not land); leaves a chain
        whose blob is gone or sealed.

        Raises:
            TransientError: no token (``login_required``), or a refusal a retry cannot fix
                (400, 401, 403, 404, 405).
        """
        login = as_transient(exc, f"audit trail append to {self.container_name}")
        if login is not None and login.reason == LOGIN_REQUIRED:  # no token: no request sent
            raise login from None
        code = getattr(exc, "error_code", "") or ""
        why = f"{exc.status_code} {code}".strip()
        if exc.status_code == 409 or code == "BlobNotFound":
            self._leave_chain(f"its blob answers {why}")  # deleted, sealed, retyped
        elif exc.status_code in (400, 401, 403, 404, 405):
            raise TransientError(
                f"audit trail append to {self.container_name} refused: {why}",
                reason="audit_trail",
            ) from None
        return why

    def _settle_earlier(self) -> None:
        """A batch of an earlier append whose outcome stayed unknown: if it is in the chain the
        chain goes on after it (a redelivery may record its events again: copies, never gaps);
        otherwise, or if that cannot be told, this writer leaves the chain, so a late landing
        can never meet this writer's next records."""
        unsettled, self._unsettled = self._unsettled, None
        if unsettled is None:
            return
        head, data, records = unsettled
        try:
            if self._landed(head, data):
                self.stats.settled += 1
                self._advance(head, data, records)
                return
        except (_Lost, _Foreign, AzureError):
            pass
        self._leave_chain("an earlier append's outcome is unknown")

    def _opts(self) -> dict[str, Any]:
        """Per-request keywords: no hidden SDK retries (this loop retries, after looking),
        timeouts within the append's deadline."""
        left = max(self._deadline_at - self._monotonic(), 1.0)
        return {"retry_total": 0, "connection_timeout": min(left, 5.0), "read_timeout": left}

    @staticmethod
    def _events_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The stored records of the caller's events (without a chain's start record)."""
        if records and records[0]["sequence"] == 1 and records[0].get("event") == START_EVENT:
            return records[1:]
        return records

    def _ready_head(self, now: datetime) -> _Head:
        """The head to append at: a new chain on first use; the next blob after a seal when
        the UTC day changed or the blob is nearly full.

        Raises:
            _Lost, _Foreign, AzureError: from sealing the old blob.
        """
        today = now.date()
        head = self._head
        if head is None:
            chain_id = new_chain_id(self.role, now)
            head = _Head(chain_id, blob_name(today, chain_id), today, 0, 0, 0, None)
            self._head = head
            return head
        if head.day == today and head.blocks < MAX_BLOCKS:
            return head
        if head.last is None:  # nothing written yet (its first append failed): start afresh
            self._head = None
            return self._ready_head(now)
        part = head.part + 1 if head.day == today else 0
        nxt = blob_name(today, head.chain_id, part)
        seal = build_batch(
            [self._trail_event(SEAL_EVENT, now, next_blob=nxt)],
            chain_id=head.chain_id,
            after=head.last,
            recorded=utc(now),
            signer=self.signer,
        )
        data = encode_line(seal[0])
        try:
            self._append_block(head, data)
        except _Lost:
            if not self._landed(head, data):
                raise
        self.stats.seals += 1
        self._advance(head, data, seal)
        moved = _Head(head.chain_id, nxt, today, part, 0, 0, head.last)
        self._head = moved
        return moved

    def _batch(
        self, head: _Head, fields: list[dict[str, Any]], now: datetime
    ) -> list[dict[str, Any]]:
        events = list(fields)
        if head.last is None:  # the chain's first append starts with its start record
            events.insert(
                0,
                self._trail_event(
                    START_EVENT,
                    now,
                    writer_role=self.role,
                    writer=self.writer,
                    signer_kid=self.signer.kid,
                    signer_spki_sha256=self.signer.spki_sha256,
                ),
            )
        return build_batch(
            events,
            chain_id=head.chain_id,
            after=head.last,
            recorded=utc(now),
            signer=self.signer,
        )

    def _trail_event(self, name: str, now: datetime, **fields: Any) -> dict[str, Any]:
        return {
            "event": name,
            "time": utc(now),
            "pipeline_version": __version__,
            "correlation_id": self._head.chain_id[-12:] if self._head else "trail",
            **fields,
        }

    def _advance(self, head: _Head, data: bytes, records: list[dict[str, Any]]) -> None:
        head.offset += len(data)
        head.blocks += 1
        head.last = records[-1]
        self.stats.appends += 1
        self.stats.records += len(records)

    def _append_block(self, head: _Head, data: bytes) -> None:
        """One Append Block at exactly ``head.offset`` (the blob is created first if new).

        Raises:
            _Lost: the response was lost (the block may have landed).
            _Foreign: the blob is longer than this writer wrote (412).
            HttpResponseError: the service refused.
        """
        blob = self._container.get_blob_client(head.blob)
        if head.offset == 0 and head.blocks == 0:
            self._create(blob)
        try:
            self.stats.requests += 1
            blob.append_block(data, appendpos_condition=head.offset, **self._opts())
        except HttpResponseError as exc:
            if exc.status_code == 412:
                self.stats.conflicts += 1
                if self._landed(head, data):  # our own earlier attempt, answered late
                    self.stats.settled += 1
                    return
                raise _Foreign(f"{head.blob} holds bytes this writer did not write") from None
            raise
        except EndpointUnreachable:  # no connection: nothing was sent
            raise
        except AzureError as exc:
            raise _Lost(f"{type(exc).__name__} appending to {head.blob}") from None

    def _create(self, blob: Any) -> None:
        try:
            self.stats.requests += 1
            blob.create_append_blob(if_none_match="*", **self._opts())
            self.stats.created += 1
        except ResourceExistsError:
            # created by our own earlier attempt (a lost response), or by someone else: an
            # empty blob is ours to use; one with content is found by the append's 412
            return
        except (HttpResponseError, EndpointUnreachable):
            raise
        except AzureError as exc:
            raise _Lost(f"{type(exc).__name__} creating {blob.blob_name}") from None

    def _landed(self, head: _Head, data: bytes) -> bool:
        """Whether ``data`` stands at ``head.offset`` of the blob (a lost response's request
        did land).

        Raises:
            _Foreign: other bytes stand there.
            _Lost: the look-up itself failed.
        """
        blob = self._container.get_blob_client(head.blob)
        try:
            self.stats.requests += 1
            size = blob.get_blob_properties(**self._opts()).size
            if size <= head.offset:
                return False
            self.stats.requests += 1
            found = blob.download_blob(
                offset=head.offset, length=min(len(data), size - head.offset), **self._opts()
            ).readall()
        except HttpResponseError as exc:
            if exc.status_code == 404:
                return False
            raise _Lost(f"{exc.status_code} looking at {head.blob}") from None
        except EndpointUnreachable:
            raise
        except AzureError as exc:
            raise _Lost(f"{type(exc).__name__} looking at {head.blob}") from None
        if found == data:
            return True
        raise _Foreign(f"{head.blob} holds bytes this writer did not write at {head.offset}")

    def _leave_chain(self, why: str) -> None:
        """Foreign bytes in this writer's chain: start a new chain (the verifier reports them)."""
        self.stats.foreign += 1
        old = self._head.chain_id if self._head else None
        log.warning("audit chain %s: %s; continuing in a new chain", old, why)
        self._head = None


class TrailAuditSink:
    """An :class:`~byok_pipeline.audit.events.AuditSink` over the trail.

    ``emit``/``emit_many`` return only once the records are appended (else they raise), then
    hand the stored records (the events plus their chain fields) to ``then`` (telemetry, a local
    file). The trail is the record of truth: a failure of ``then`` is logged (the event's name,
    never its body) and not raised, so it never causes a retry that would append again.
    """

    def __init__(self, trail: AuditTrail, *, then: AuditSink | None = None) -> None:
        self.trail = trail
        self.then = then

    def emit(self, event: Mapping[str, Any]) -> None:
        self.emit_many([event])

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        records = self.trail.append_many(events)
        if self.then is None:
            return
        for record in records:
            try:
                self.then.emit(record)
            except Exception as exc:  # noqa: BLE001  # best effort after the trail, by design
                log.warning(
                    "audit event %s (chain %s sequence %s) is in the trail, but a later sink "
                    "failed: %s%s",
                    record.get("event"),
                    record.get("chain_id"),
                    record.get("sequence"),
                    type(exc).__name__,
                    f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else "",
                )
