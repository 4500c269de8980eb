"""The tamper-evident audit trail: hash-chained JSON lines in append blobs, one chain for ever.

Layout, in the audit container (``BYOK_AUDIT_CONTAINER``)::

    trail/YYYY/MM/DD/NNNN.jsonl     one append blob per UTC day (NNNN: part, 0000 unless a day
                                    outgrows the append-blob block limit)

Each line is one record: the audit event's fields plus

- ``sequence``: 1, 2, 3, ... across the whole trail (every day, every part);
- ``prev_sha256``: the ``record_sha256`` of the record before (64 zeros for the first record);
- ``recorded``: UTC time of the append;
- ``record_sha256``: SHA-256 of the record's canonical JSON without ``record_sha256``.

The canonical JSON is ``json.dumps(record, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)`` and the line is exactly the canonical JSON of the record
*with* ``record_sha256``, so any changed byte shows. When the chain moves on to a new blob (a
new UTC day, or a full part), the old blob is closed with a seal record (``byok.trail.sealed``,
naming ``next_blob``) and the first record of the new blob chains to the seal: the first record
of a day chains to the last record of the previous day that has records.

Writers append with an append-position condition (``appendpos_condition`` = the length they
last saw), so concurrent writers in threads or separate processes never interleave: a writer
that lost the race gets 412, reads what was appended since and retries on top of it. Each
writer keeps the head (blob, length, last record) in memory, so the normal cost of one record
is one append request.

A writer never builds on a damaged chain: it remembers the highest ``(sequence,
record_sha256)`` it has seen and refuses (:class:`TrailError`, reason ``audit_trail_broken``)
when the trail's head goes back below it or changes, when what was appended after its offset
does not chain onto the record it knew, or when the head record does not match its own hash.
An append whose outcome is unknown (the connection broke after the request was sent) is looked
up at the position it was sent for before anything is appended again, so it is never written
twice. The UTC day is the writer's clock, but never ahead of the storage service's own time
(the ``Date`` of its responses) by more than :data:`CLOCK_SKEW`; trail blobs dated after that
are ignored.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError

from byok_pipeline import __version__
from byok_pipeline.audit.events import AuditSink, utc_now
from byok_pipeline.audit.records import (
    GENESIS,
    PREFIX,
    SEAL_EVENT,
    TRAIL_FIELDS,
    TrailError,
    blob_name,
    canonical,
    encode_line,
    parse_blob_name,
    parse_line,
    seal_record,
    self_hash_ok,
)
from byok_pipeline.core.errors import TransientError
from byok_pipeline.core.status import utc

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient

log = logging.getLogger("byok_pipeline.audit.trail")
#: An append blob takes 50,000 blocks (one record each); roll over to a new part before that.
MAX_BLOCKS = 49_000
#: A record is one append block; the largest event (a 2,000-character message) is far below.
MAX_RECORD_BYTES = 32 * 1024
#: How much of a blob's end to read to find its last record.
TAIL_BYTES = 64 * 1024
#: How far a writer's clock may run ahead of the storage service's before the service's time
#: decides the UTC day instead (storage refuses Shared Key requests 15 minutes off anyway).
CLOCK_SKEW = timedelta(minutes=15)
#: The default bound of one append, its retries included: under half the shortest lease (15 s),
#: so a package's lease outlives a trail that does not answer.
APPEND_DEADLINE = 7.0
#: A service time older than this is refreshed before it overrules the writer's clock.
_SERVICE_TIME_STALE = 60.0


@dataclass
class _Head:
    """Where the next record goes, and the record it chains to."""

    blob: str  # the blob to append to
    offset: int  # its length as last seen: the append position
    blocks: int  # its committed block count as last seen
    last: dict[str, Any] | None  # the last record of the chain (None: the trail is empty)
    etag: str | None = None  # the blob's ETag as last seen (None: not known)


@dataclass
class TrailStats:
    """Counters of one writer (tests assert the cheap path is the normal one)."""

    appended: int = 0
    conflicts: int = 0  # 412: another writer appended first (each costs one reread)
    created: int = 0  # blobs this writer created (404 on the first append to a blob)
    discoveries: int = 0  # full lookups of the head (first use, or after the unexpected)
    seals: int = 0
    settled: int = 0  # appends whose response was lost, found in the blob (not written again)
    stale: int = 0  # 412 and nothing after our offset: the blob was cut, rewritten in place
    #                 (or its properties were set): the head is rediscovered and checked
    ignored: int = 0  # trail blobs ignored for being dated after the service's today
    clock_ahead: int = 0  # times the service's time overruled the writer's clock (ahead)


@dataclass(frozen=True)
class _Sent:
    """A record sent for ``offset`` of ``blob`` whose outcome is not known."""

    blob: str
    offset: int
    line: bytes
    record: dict[str, Any]


@dataclass
class _Call:
    """One ``append``: its deadline and the requests whose outcome it has not settled."""

    deadline: float
    unsettled: _Sent | None = None  # sent, then the response was lost: look before resending
    maybe: list[_Sent] = field(default_factory=list)  # looked: not there (yet); may still land


class _Conflict(Exception):
    """Another writer appended first (412), or the blob is not there yet (404)."""


class AuditTrail:
    """Appends records to the chain. Thread-safe; one per process is enough, several are fine.

    ``clock`` decides the UTC day (a seam for tests; never believed more than
    :data:`CLOCK_SKEW` ahead of the storage service); ``max_attempts`` and ``deadline`` (seconds)
    bound one append, its retries included (conflicts with other writers, transient storage
    errors, waiting for another thread's append); ``monotonic`` and ``sleep`` are seams for
    tests.
    """

    def __init__(
        self,
        service: BlobServiceClient,
        container: str,
        *,
        clock: Callable[[], datetime] = utc_now,
        max_attempts: int = 40,
        deadline: float = APPEND_DEADLINE,
        backoff: float = 0.01,
        backoff_max: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.container_name = container
        self._container: ContainerClient = service.get_container_client(container)
        self._clock = clock
        self._max_attempts = max_attempts
        self._deadline = deadline
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._sleep = sleep
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._head: _Head | None = None
        #: The highest (sequence, record_sha256) this writer has seen on the chain.
        self._known: tuple[int, str] | None = None
        #: The storage service's time (a response's Date) and when it was seen (monotonic).
        self._service: tuple[datetime, float] | None = None
        self._random = random.Random()  # noqa: S311  # jitter between retries, not a secret
        self.stats = TrailStats()

    @property
    def known_head(self) -> tuple[int, str] | None:
        """The highest ``(sequence, record_sha256)`` this writer has seen (None: none yet)."""
        return self._known

    # -- public -----------------------------------------------------------------------------
    def append(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``event`` as the next record; return the record as stored.

        Raises:
            TrailError: the chain is damaged (records removed or rewritten, a malformed head):
                the writer refuses to build on it.
            TransientError: the record could not be appended within the bounded retries or
                time (the caller must not treat the event as recorded; ``outcome_unknown``
                when a request whose response was lost may still be in the trail).
            ValueError: the event is too large for one record, or not JSON.
        """
        fields = {k: v for k, v in event.items() if k not in TRAIL_FIELDS}
        if len(canonical(fields)) > MAX_RECORD_BYTES - 512:
            raise ValueError(f"audit event {fields.get('event')} is too large for the trail")
        call = _Call(self._monotonic() + self._deadline)
        why = "no attempt made"
        for attempt in range(self._max_attempts):
            if attempt > 1:  # the first retry after a conflict goes at once
                delay = min(self._backoff_max, self._backoff * 2 ** min(attempt - 1, 10))
                self._sleep(
                    max(0.0, min(delay * (0.5 + self._random.random()), self._remaining(call)))
                )
            if attempt and self._remaining(call) <= 0:
                raise self._failure(call, f"not appended within {self._deadline:g} s ({why})")
            # the lock is held for one attempt, never through the backoff between attempts
            if not self._lock.acquire(timeout=max(self._remaining(call), 0.001)):
                raise self._failure(
                    call,
                    f"another append in this process held the trail past "
                    f"the {self._deadline:g} s deadline",
                )
            try:
                if call.unsettled is not None:
                    landed = self._settle(call)
                    if landed is not None:
                        return landed
                return self._try_append(fields, call)
            except _Conflict as exc:
                why = str(exc)
            except TrailError:
                self._head = None
                raise
            except AzureError as exc:
                self._head = None  # rediscover: the blob may have changed under us
                code = getattr(exc, "error_code", None) or ""
                why = f"{type(exc).__name__} {getattr(exc, 'status_code', '') or ''} {code}"
                why = why.strip()
                if _permanent(exc):
                    raise self._failure(call, f"failed: {why}") from None
            finally:
                self._lock.release()
        raise self._failure(call, f"failed after {self._max_attempts} attempts ({why})")

    def _remaining(self, call: _Call) -> float:
        return call.deadline - self._monotonic()

    def _failure(self, call: _Call, why: str) -> TransientError:
        unknown = call.unsettled is not None or bool(call.maybe)
        return TransientError(
            f"audit trail append to {self.container_name} {why}"
            + ("; a request whose response was lost may have been recorded" if unknown else ""),
            reason="audit_trail",
            outcome_unknown=unknown,
        )

    def _options(self, call: _Call) -> dict[str, Any]:
        """Per-request keywords: note the service's time; no hidden SDK retries (this loop
        retries, and settles lost responses first); timeouts within the deadline."""
        remaining = max(self._remaining(call), 1.0)
        return {
            "raw_response_hook": self._observe,
            "retry_total": 0,
            "connection_timeout": min(remaining, 10.0),
            "read_timeout": remaining,
        }

    # -- the storage service's time ---------------------------------------------------------
    def _observe(self, response: Any) -> None:
        """Raw response hook: remember the service's ``Date``."""
        header = response.http_response.headers.get("Date")
        if header:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                self._service = (parsedate_to_datetime(header), self._monotonic())

    def _service_now(self) -> datetime | None:
        if self._service is None:
            return None
        seen, at = self._service
        return seen + timedelta(seconds=self._monotonic() - at)

    def _now(self, head: _Head, call: _Call) -> datetime:
        """The writer's clock, unless it runs ahead of the service's by more than the skew."""
        now = self._clock()
        service = self._service_now()
        if service is None or now <= service + CLOCK_SKEW:
            return now
        if self._service is not None and self._monotonic() - self._service[1] > _SERVICE_TIME_STALE:
            with contextlib.suppress(AzureError):  # a 404 carries the Date just the same
                self._container.get_blob_client(head.blob).get_blob_properties(
                    **self._options(call)
                )
            service = self._service_now()
            if service is None or now <= service + CLOCK_SKEW:
                return now
        self.stats.clock_ahead += 1
        if self.stats.clock_ahead == 1:
            log.warning(
                "the clock is ahead of the audit storage's by %s; the trail uses "
                "the storage service's time",
                now - service,
            )
        return service

    def _horizon(self) -> date | None:
        """The latest UTC day a trail blob may be dated (None: the service's time unknown)."""
        service = self._service_now()
        return (service + CLOCK_SKEW).date() if service is not None else None

    # -- the head this writer knows ---------------------------------------------------------
    def _adopt(self, last: Mapping[str, Any] | None, where: str) -> None:
        """Take ``last`` as the chain's head, unless the chain went back: fewer records than
        this writer has seen, or a different record at the sequence it knew.

        Raises:
            TrailError: the chain went back.
        """
        known = self._known
        if known is not None:
            seq, sha = known
            hint = f"run `byok audit verify --expect-head {seq}:{sha}`"
            if last is None:
                raise TrailError(
                    f"the audit trail has no records, but this writer saw sequence "
                    f"{seq}: records were removed; {hint}"
                )
            found = int(last["sequence"])
            if found < seq:
                raise TrailError(
                    f"the audit trail ends at sequence {found} ({where}), but this "
                    f"writer saw sequence {seq}: records were removed from its "
                    f"end; {hint}"
                )
            if found == seq and last["record_sha256"] != sha:
                raise TrailError(
                    f"sequence {seq} of the audit trail ({where}) is not the "
                    f"record this writer saw: the chain was rewritten; {hint}"
                )
        self._note(last)

    def _note(self, record: Mapping[str, Any] | None) -> None:
        if record is not None and (self._known is None or int(record["sequence"]) > self._known[0]):
            self._known = (int(record["sequence"]), str(record["record_sha256"]))

    # -- one attempt ------------------------------------------------------------------------
    def _settle(self, call: _Call) -> dict[str, Any] | None:
        """Was the record whose response was lost appended? Its record if so, else None."""
        sent = call.unsettled
        assert sent is not None  # noqa: S101  # the caller checked
        blob = self._container.get_blob_client(sent.blob)
        try:
            stored = blob.download_blob(
                offset=sent.offset, length=len(sent.line), **self._options(call)
            ).readall()
        except HttpResponseError as exc:
            if exc.status_code not in (404, 416):
                raise
            stored = b""  # nothing at that position: not appended (yet)
        call.unsettled = None
        if stored == sent.line:
            self.stats.settled += 1
            self.stats.appended += 1
            self._note(sent.record)
            head = self._head
            if head is not None and (head.blob, head.offset) == (sent.blob, sent.offset):
                head.offset += len(sent.line)
                head.blocks += 1
                head.etag = None
                head.last = sent.record
            return sent.record
        if not stored:  # the request may still land there: a 412 at that position looks
            call.maybe.append(sent)
        return None

    def _try_append(self, fields: Mapping[str, Any], call: _Call) -> dict[str, Any]:
        head = self._head or self._discover(call)
        self._head = head
        now = self._now(head, call)
        if head.last is not None and head.last.get("event") == SEAL_EVENT:
            following = str(head.last.get("next_blob", ""))
            if head.blob != following:  # the chain continues in the sealed blob's successor
                if parse_blob_name(following) is None:
                    raise TrailError(
                        f"the trail's last seal names no valid next blob: {following!r}"
                    )
                head.blob, head.offset, head.blocks, head.etag = following, 0, 0, None
        else:
            successor = self._successor(head, now.date())
            if successor is not None:
                self._seal(head, successor, now, call)
                head.blob, head.offset, head.blocks, head.etag = successor, 0, 0, None
        last = head.last
        record = seal_record(
            {
                **fields,
                "sequence": (int(last["sequence"]) + 1) if last else 1,
                "prev_sha256": str(last["record_sha256"]) if last else GENESIS,
                "recorded": utc(now),
            }
        )
        stored = self._append_at(head, record, call, track=True)
        self.stats.appended += 1
        return stored

    def _successor(self, head: _Head, today: date) -> str | None:
        """The blob the chain must move to before appending today, or None (append in place)."""
        parsed = parse_blob_name(head.blob)
        if parsed is None:  # a name from elsewhere: start today
            return blob_name(today)
        day, part = parsed
        if day < today:
            return blob_name(today)
        if head.blocks >= MAX_BLOCKS:
            return blob_name(day, part + 1)
        return None  # the same day (or a writer whose clock is behind: keep to the head)

    def _seal(self, head: _Head, successor: str, now: datetime, call: _Call) -> None:
        """Close ``head.blob`` with a seal naming ``successor`` (412 if someone appended)."""
        last = head.last
        seal = seal_record(
            {
                "event": SEAL_EVENT,
                "time": utc(now),
                "pipeline_version": __version__,
                "correlation_id": uuid.uuid4().hex,
                "next_blob": successor,
                "sequence": (int(last["sequence"]) + 1) if last else 1,
                "prev_sha256": str(last["record_sha256"]) if last else GENESIS,
                "recorded": utc(now),
            }
        )
        self._append_at(head, seal, call, track=False)  # a lost seal shows on rediscovery
        self.stats.seals += 1

    def _append_at(
        self, head: _Head, record: dict[str, Any], call: _Call, *, track: bool
    ) -> dict[str, Any]:
        """Append ``record`` at ``head.offset`` exactly and return it; or find that it (or an
        earlier send of this call) is already there and return that; or update ``head`` and
        raise _Conflict. With ``track``, a lost response leaves the send to be settled."""
        line = encode_line(record)
        blob = self._container.get_blob_client(head.blob)
        sent = _Sent(head.blob, head.offset, line, record)
        if track:
            call.unsettled = sent
        options = self._options(call)
        if head.etag:  # also refused if the blob was rewritten in place (same length)
            options.update(etag=head.etag, match_condition=MatchConditions.IfNotModified)
        try:
            result = blob.append_block(line, appendpos_condition=head.offset, **options)
        except HttpResponseError as exc:
            code = getattr(exc, "error_code", None)
            if exc.status_code == 412:
                call.unsettled = None
                candidates = [
                    sent,
                    *(m for m in call.maybe if (m.blob, m.offset) == (head.blob, head.offset)),
                ]
                landed = self._reread(head, candidates if track else [sent], call)
                if landed is not None:
                    return landed
                raise _Conflict(f"another writer appended to {head.blob}") from None
            if exc.status_code == 404 and code != "ContainerNotFound":
                call.unsettled = None
                if head.offset:  # it was there: replaced or deleted under us
                    self._head = None
                    raise _Conflict(f"{head.blob} disappeared") from None
                with contextlib.suppress(ResourceExistsError):
                    blob.create_append_blob(if_none_match="*", **self._options(call))
                    self.stats.created += 1
                raise _Conflict(f"{head.blob} did not exist yet") from None
            if exc.status_code == 409 and code == "BlockCountExceedsLimit":
                call.unsettled = None
                head.blocks = MAX_BLOCKS
                raise _Conflict(f"{head.blob} is full") from None
            if isinstance(exc.status_code, int) and exc.status_code < 500:
                call.unsettled = None  # refused: not written
            raise  # a 5xx: the outcome is unknown, the next attempt looks first
        call.unsettled = None
        head.offset += len(line)
        count = result.get("blob_committed_block_count")
        head.blocks = int(count) if isinstance(count, int) else head.blocks + 1
        head.etag = _etag(result.get("etag"))
        head.last = record
        self._note(record)
        return record

    def _reread(
        self, head: _Head, candidates: Sequence[_Sent], call: _Call
    ) -> dict[str, Any] | None:
        """After a 412: read what was appended since ``head.offset``, check that it continues
        the chain, and take its last record. Returns the candidate found at ``head.offset``
        (our own append, committed although its response said otherwise), else None.

        Raises:
            TrailError: what follows ``head.offset`` does not continue the chain.
        """
        self.stats.conflicts += 1
        blob = self._container.get_blob_client(head.blob)
        data = b""
        try:
            downloader = blob.download_blob(
                offset=head.offset, length=TAIL_BYTES, **self._options(call)
            )
            data = downloader.readall()
        except HttpResponseError as exc:
            if exc.status_code != 416:
                raise
        if not data:  # refused, yet nothing after our offset: cut, or rewritten in place
            self.stats.stale += 1
            self._head = None  # rediscovery refuses if the chain went back
            return None
        blocks = downloader.properties.append_blob_committed_block_count
        etag = _etag(downloader.properties.etag)
        size = head.offset + len(data)
        landed = next((c.record for c in candidates if data.startswith(c.line)), None)
        self._check_continues(head, data)
        if len(data) >= TAIL_BYTES:  # maybe far behind: read just the end
            props = blob.get_blob_properties(**self._options(call))
            size, blocks = int(props.size), props.append_blob_committed_block_count
            etag = _etag(props.etag)
            if size > head.offset + len(data):
                data = blob.download_blob(
                    offset=size - TAIL_BYTES, length=TAIL_BYTES, **self._options(call)
                ).readall()
                data = data[data.find(b"\n") + 1 :]
        last = _last_record(data, head.blob)
        if last is not None:
            self._adopt(last, head.blob)
            head.last = last
        head.offset = size
        head.blocks = int(blocks) if blocks is not None else head.blocks
        head.etag = etag
        if landed is not None:
            self.stats.settled += 1
            call.maybe.clear()
        return landed

    def _check_continues(self, head: _Head, data: bytes) -> None:
        """The first record at ``head.offset`` chains onto ``head.last``.

        Raises:
            TrailError: it does not (the blob was cut and written again, or rewritten).
        """
        first = data.split(b"\n", 1)[0]
        last = head.last
        expected = (int(last["sequence"]) + 1) if last else 1
        expected_prev = str(last["record_sha256"]) if last else GENESIS
        try:
            record = parse_line(first)
        except ValueError:
            record = None
        if record is None or (record["sequence"], record["prev_sha256"]) != (
            expected,
            expected_prev,
        ):
            raise TrailError(
                f"{head.blob} at offset {head.offset} does not continue the chain after "
                f"sequence {expected - 1}: records were removed or rewritten; run `byok audit "
                f"verify`"
            )

    def _discover(self, call: _Call) -> _Head:
        """Find the head from a listing: the last record of the chain and the blob it is in
        (trail blobs dated after the service's today are ignored).

        Raises:
            TrailError: the chain's head is malformed, or went back (see :meth:`_adopt`).
        """
        self.stats.discoveries += 1
        listed = [
            (b.name, int(b.size or 0))
            for b in self._container.list_blobs(name_starts_with=PREFIX, **self._options(call))
        ]
        horizon = self._horizon()  # known now: the listing's response carried the Date
        blobs: list[tuple[str, int]] = []
        for name, size in sorted(listed):
            parsed = parse_blob_name(name)
            if parsed is None:
                continue
            if horizon is not None and parsed[0] > horizon:
                self.stats.ignored += 1
                log.warning(
                    "ignoring audit trail blob %s: dated after the storage service's today (%s)",
                    name,
                    horizon,
                )
                continue
            blobs.append((name, size))
        for candidate, candidate_size in reversed(blobs):
            if candidate_size == 0:
                continue
            client = self._container.get_blob_client(candidate)
            start = max(0, candidate_size - TAIL_BYTES)
            downloader = client.download_blob(offset=start, **self._options(call))  # to the end
            data = downloader.readall()
            end = start + len(data)
            blocks = int(downloader.properties.append_blob_committed_block_count or 0)
            etag = _etag(downloader.properties.etag)
            if start:
                data = data[data.find(b"\n") + 1 :]
            last = _last_record(data, candidate)
            if last is not None:
                self._adopt(last, candidate)
                # an empty blob after it is followed only if the seal names it (_try_append)
                return _Head(candidate, end, blocks, last, etag)
        self._adopt(None, self.container_name)
        today = self._now(_Head(blob_name(self._clock().date()), 0, 0, None), call).date()
        return _Head(blob_name(today), 0, 0, None)


def _last_record(data: bytes, where: str) -> dict[str, Any] | None:
    """The last complete record in ``data`` (the end of a blob), None if it holds none.

    Raises:
        TrailError: the last line is not a trail record, or does not match its own hash.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    else:
        raise TrailError(f"{where} does not end with a complete record: run `byok audit verify`")
    if not lines:
        return None
    try:
        record = parse_line(lines[-1])
    except ValueError as exc:
        raise TrailError(
            f"the last record of {where} is malformed ({exc}): run `byok audit verify`"
        ) from None
    if not self_hash_ok(lines[-1], record):
        raise TrailError(
            f"the last record of {where} (sequence {record['sequence']}) does not match its own "
            f"record_sha256: run `byok audit verify`"
        )
    return record


def _etag(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _permanent(exc: AzureError) -> bool:
    """Errors a retry cannot fix (a missing container, a denied request, a wrong blob type)."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and status in (400, 401, 403, 404, 405, 409)


class TrailAuditSink:
    """An :class:`~byok_pipeline.audit.events.AuditSink` over the trail.

    ``emit`` returns only once the record is appended (else it raises), then hands the stored
    record (the event plus its ``sequence`` and hashes) to ``then`` (telemetry, a local file).
    The trail is the record of truth: a failure of ``then`` is logged (the event's name, never
    its body) and not raised, so it never causes a retry that would append the event again.
    """

    def __init__(self, trail: AuditTrail, *, then: AuditSink | None = None) -> None:
        self.trail = trail
        self.then = then

    def emit(self, event: Mapping[str, Any]) -> None:
        record = self.trail.append(event)
        if self.then is None:
            return
        try:
            self.then.emit(record)
        except Exception as exc:  # noqa: BLE001  # best effort after the trail, by design
            log.warning(
                "audit event %s (trail sequence %s) is in the trail, but a later sink failed: %s%s",
                record.get("event"),
                record.get("sequence"),
                type(exc).__name__,
                f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else "",
            )
