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
import hashlib
import json
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, NoReturn

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError

from . import __version__
from .audit import AuditSink, utc_now
from .errors import TransientError
from .status import utc

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient

log = logging.getLogger("byok_pipeline.audit_trail")
PREFIX = "trail/"
GENESIS = "0" * 64
SEAL_EVENT = "byok.trail.sealed"
#: The fields the trail adds to each event.
TRAIL_FIELDS = ("sequence", "prev_sha256", "recorded", "record_sha256")
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
_NAME_RE = re.compile(r"^trail/(\d{4})/(\d{2})/(\d{2})/(\d{4})\.jsonl$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(rb',"record_sha256":"[0-9a-f]{64}"')


class TrailError(TransientError):
    """The trail cannot be read or continued: its last record is malformed, or the chain went
    back (records removed from its end, or rewritten). Appends stop (no package completes
    unaudited) until an operator has run ``byok audit verify`` and repaired the head."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="audit_trail_broken")


def blob_name(day: date, part: int = 0) -> str:
    """``trail/YYYY/MM/DD/NNNN.jsonl``."""
    return f"{PREFIX}{day:%Y/%m/%d}/{part:04d}.jsonl"


def parse_blob_name(name: str) -> tuple[date, int] | None:
    """``(day, part)`` of a trail blob name, None for any other name."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    try:
        day = date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None
    return day, int(match[4])


def canonical(record: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``record``.

    Raises:
        ValueError: it holds a NaN or an infinity (not JSON).
    """
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def seal_record(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` (with ``sequence``, ``prev_sha256``, ``recorded``) plus its ``record_sha256``."""
    record = {k: v for k, v in body.items() if k != "record_sha256"}
    record["record_sha256"] = hashlib.sha256(canonical(record)).hexdigest()
    return record


def encode_line(record: Mapping[str, Any]) -> bytes:
    """The line a sealed record is stored as (canonical JSON and a newline)."""
    return canonical(record) + b"\n"


class MalformedRecord(ValueError):
    """A stored line is not a trail record."""


def _no_constant(name: str) -> NoReturn:
    raise MalformedRecord(f"{name} is not JSON")


def parse_line(raw: bytes) -> dict[str, Any]:
    """Parse one stored line (without its newline).

    Raises:
        ValueError: not a JSON object with an integer ``sequence`` and hex hashes
            (:class:`MalformedRecord`, or the JSON decoder's error).
    """
    record = json.loads(raw, parse_constant=_no_constant)
    if not isinstance(record, dict):
        raise MalformedRecord("not a JSON object")
    sequence = record.get("sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise MalformedRecord("no valid sequence")
    for name in ("prev_sha256", "record_sha256"):
        if not isinstance(record.get(name), str) or not _HEX64.match(record[name]):
            raise MalformedRecord(f"no valid {name}")
    return record


def self_hash_ok(raw: bytes, record: Mapping[str, Any]) -> bool:
    """The line is the canonical form of ``record`` and ``record_sha256`` hashes the rest."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    try:
        expected = hashlib.sha256(canonical(body)).hexdigest()
        return record.get("record_sha256") == expected and canonical(record) == raw
    except ValueError:  # a number JSON cannot hold (1e400 reads as an infinity)
        return False


# -- writing ----------------------------------------------------------------------------------


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
                raise self._failure(call, f"another append in this process held the trail past "
                                    f"the {self._deadline:g} s deadline")  # fmt: skip
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
            log.warning("the clock is ahead of the audit storage's by %s; the trail uses "
                        "the storage service's time", now - service)  # fmt: skip
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
                raise TrailError(f"the audit trail has no records, but this writer saw sequence "
                                 f"{seq}: records were removed; {hint}")  # fmt: skip
            found = int(last["sequence"])
            if found < seq:
                raise TrailError(f"the audit trail ends at sequence {found} ({where}), but this "
                                 f"writer saw sequence {seq}: records were removed from its "
                                 f"end; {hint}")  # fmt: skip
            if found == seq and last["record_sha256"] != sha:
                raise TrailError(f"sequence {seq} of the audit trail ({where}) is not the "
                                 f"record this writer saw: the chain was rewritten; {hint}")  # fmt: skip
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
                candidates = [sent, *(m for m in call.maybe if (m.blob, m.offset) == (head.blob, head.offset))]  # fmt: skip
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
                log.warning("ignoring audit trail blob %s: dated after the storage service's "
                            "today (%s)", name, horizon)  # fmt: skip
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
    """An :class:`~byok_pipeline.audit.AuditSink` over the trail.

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


# -- reading and verifying --------------------------------------------------------------------

BREAK_KINDS = ("changed", "removed", "reordered", "inserted", "malformed")


@dataclass(frozen=True)
class Line:
    """One stored line of the trail, where it was found."""

    blob: str
    number: int  # 1-based line number in the blob
    raw: bytes


@dataclass(frozen=True)
class Break:
    """The first broken link of the chain."""

    kind: str  # one of BREAK_KINDS
    blob: str
    line: int
    sequence: int | None
    expected_sequence: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "blob": self.blob,
            "line": self.line,
            "sequence": self.sequence,
            "expected_sequence": self.expected_sequence,
            "detail": self.detail,
        }


@dataclass
class Report:
    """What ``byok audit verify`` found."""

    records: int = 0
    blobs: list[str] = field(default_factory=list)
    first_sequence: int | None = None
    head: dict[str, Any] | None = None  # sequence, record_sha256, blob of the last good record
    broken: Break | None = None
    #: With ``--expect-head``: sequence, record_sha256 and the verdict (``found``: True, False,
    #: or None when the range read cannot tell), with a sentence in ``detail``.
    expected_head: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "blobs": self.blobs,
            "first_sequence": self.first_sequence,
            "head": self.head,
            "broken": self.broken.to_dict() if self.broken else None,
            "expected_head": self.expected_head,
        }


def _lenient_sequence(raw: bytes) -> int | None:
    try:
        value = json.loads(raw).get("sequence")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def verify_lines(lines: Sequence[Line], anchor: Mapping[str, Any] | None = None) -> Report:
    """Check the chain over ``lines`` (in blob order). ``anchor`` is the record just before
    the first line (None: the lines start the trail). Stops at the first broken link."""
    report = Report()
    prev_seq = int(anchor["sequence"]) if anchor else 0
    prev_sha = str(anchor["record_sha256"]) if anchor else GENESIS
    prev_record: Mapping[str, Any] | None = anchor
    prev_blob: str | None = None
    seen: dict[str, int] = {}

    def broken(kind: str, line: Line, seq: int | None, detail: str) -> Report:
        report.broken = Break(kind, line.blob, line.number, seq, prev_seq + 1, detail)
        return report

    for index, line in enumerate(lines):
        expected = prev_seq + 1
        try:
            record = parse_line(line.raw)
        except ValueError as exc:
            return broken(
                "malformed", line, _lenient_sequence(line.raw), f"not a trail record: {exc}"
            )
        seq = int(record["sequence"])
        if not self_hash_ok(line.raw, record):
            return broken("changed", line, seq, "the record does not match its own record_sha256")
        if line.blob != prev_blob and prev_record is not None and prev_blob is not None:
            if prev_record.get("event") != SEAL_EVENT:
                if seq == expected and record["prev_sha256"] == prev_sha:
                    return broken(
                        "inserted",
                        line,
                        seq,
                        f"{prev_blob} continues in {line.blob} without a seal",
                    )
            elif prev_record.get("next_blob") != line.blob:
                return broken("reordered", line, seq,
                              f"the seal of {prev_blob} names {prev_record.get('next_blob')}, "
                              f"but the chain continues in {line.blob}")  # fmt: skip
        elif (
            line.blob == prev_blob
            and prev_record is not None
            and prev_record.get("event") == SEAL_EVENT
        ):
            return broken("inserted", line, seq, f"a record after the seal of {line.blob}")
        if seq != expected or record["prev_sha256"] != prev_sha:
            if record["record_sha256"] in seen:
                return broken("inserted", line, seq,
                              f"a copy of the record with sequence {seen[record['record_sha256']]}")  # fmt: skip
            if seq == expected:
                return broken("inserted", line, seq,
                              "prev_sha256 does not match the record before: a record was "
                              "forged or rewritten here")  # fmt: skip
            if seq > expected:
                later = (_lenient_sequence(other.raw) for other in lines[index + 1 :])
                if expected in later:
                    return broken("reordered", line, seq, f"sequence {expected} comes later")
                return broken("removed", line, seq,
                              f"sequence {expected}" + (f" to {seq - 1} are" if seq - 1 > expected else " is")
                              + " missing")  # fmt: skip
            return broken("reordered", line, seq, f"sequence {seq} after {prev_seq}")
        seen[record["record_sha256"]] = seq
        if report.first_sequence is None:
            report.first_sequence = seq
        report.records += 1
        if line.blob not in report.blobs:
            report.blobs.append(line.blob)
        prev_seq, prev_sha, prev_record, prev_blob = seq, record["record_sha256"], record, line.blob
        report.head = {"sequence": seq, "record_sha256": prev_sha, "blob": line.blob}
    return report


def split_lines(blob: str, data: bytes) -> Iterator[Line]:
    """The lines of a blob's content; an unterminated last line is kept (it is malformed)."""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    for number, raw in enumerate(parts, start=1):
        yield Line(blob, number, raw)


class TrailReader:
    """Reads the trail for verification and export."""

    def __init__(self, service: BlobServiceClient, container: str) -> None:
        self.container_name = container
        self._container: ContainerClient = service.get_container_client(container)

    def blob_names(self) -> list[str]:
        return sorted(
            b.name
            for b in self._container.list_blobs(name_starts_with=PREFIX)
            if parse_blob_name(b.name) is not None
        )

    def read(self, name: str) -> bytes:
        return bytes(self._container.get_blob_client(name).download_blob().readall())

    def select(self, start: date | None, end: date | None) -> tuple[list[str], str | None]:
        """Blobs of days in [start, end], and the blob just before them (None: none)."""
        names = self.blob_names()
        chosen: list[str] = []
        before: str | None = None
        for name in names:
            parsed = parse_blob_name(name)
            assert parsed is not None  # noqa: S101  # blob_names() filters on the pattern
            day = parsed[0]
            if start is not None and day < start:
                before = name
            elif end is None or day <= end:
                chosen.append(name)
        return chosen, before

    def anchor_line(self, before: str | None, names: list[str]) -> Line | None:
        """The last stored line before the selected blobs (walks back over empty blobs)."""
        if before is None:
            return None
        all_names = self.blob_names()
        index = all_names.index(before)
        for name in reversed(all_names[: index + 1]):
            if name in names:
                continue
            lines = list(split_lines(name, self.read(name)))
            if lines:
                return lines[-1]
        return None

    def anchor_before(self, before: str | None, names: list[str]) -> dict[str, Any] | None:
        """The last record before the selected blobs (walks back over empty blobs).

        Raises:
            TrailError: that record is malformed.
        """
        line = self.anchor_line(before, names)
        if line is None:
            return None
        try:
            return parse_line(line.raw)
        except ValueError as exc:
            raise TrailError(f"the last record of {line.blob} is malformed ({exc})") from None

    def lines(self, names: Iterable[str]) -> list[Line]:
        out: list[Line] = []
        for name in names:
            out.extend(split_lines(name, self.read(name)))
        return out

    def verify(
        self,
        start: date | None = None,
        end: date | None = None,
        *,
        expect_head: tuple[int, str] | None = None,
    ) -> tuple[Report, list[Line]]:
        """Verify the days [start, end] (each bound optional); also returns the lines read.

        A malformed or changed record just before the range is a broken link (the range
        cannot be anchored), not an error. With ``expect_head`` (``(sequence, record_sha256)``
        pinned from outside, such as Application Insights), the record with that sequence must
        be there with that hash: a trail cut below it, or rewritten, is broken.
        """
        names, before = self.select(start, end)
        anchor_line = self.anchor_line(before, names)
        anchor: dict[str, Any] | None = None
        if anchor_line is not None:
            broken = _anchor_break(anchor_line)
            if broken is not None:
                return Report(blobs=names, broken=broken), []
            anchor = parse_line(anchor_line.raw)
        lines = self.lines(names)
        report = verify_lines(lines, anchor)
        report.blobs = names
        if expect_head is not None:
            check_expected_head(report, lines, anchor, expect_head, bounded=end is not None)
        return report, lines


def _anchor_break(line: Line) -> Break | None:
    """Why the record before a range cannot anchor it (None: it can)."""
    seq = _lenient_sequence(line.raw)
    try:
        record = parse_line(line.raw)
    except ValueError as exc:
        return Break("malformed", line.blob, line.number, seq, seq or 0,
                     f"the record before the range is not a trail record: {exc}")  # fmt: skip
    if not self_hash_ok(line.raw, record):
        return Break("changed", line.blob, line.number, seq, seq or 0,
                     "the record before the range does not match its own record_sha256")  # fmt: skip
    return None


def check_expected_head(
    report: Report,
    lines: Sequence[Line],
    anchor: Mapping[str, Any] | None,
    expect: tuple[int, str],
    *,
    bounded: bool = False,
) -> None:
    """Check that the record with sequence ``expect[0]`` is in the chain read with
    ``record_sha256`` ``expect[1]``; sets ``report.expected_head`` and, when the chain was
    intact so far, ``report.broken`` (``removed``: the trail ends before it; ``changed``: a
    different record has that sequence). ``bounded``: the range ends before the trail's end
    (a sequence past it cannot be judged)."""
    seq, sha = expect
    verdict: dict[str, Any] = {"sequence": seq, "record_sha256": sha, "found": None, "detail": ""}
    report.expected_head = verdict
    records: list[tuple[Line | None, dict[str, Any]]] = [(None, dict(anchor))] if anchor else []
    for line in lines:
        with contextlib.suppress(ValueError):
            records.append((line, parse_line(line.raw)))
    if report.broken is not None:  # past the first break nothing read can be trusted
        verdict["detail"] = "not checked: the chain is broken before"
        return
    for where, record in records:
        if record["sequence"] != seq:
            continue
        if record["record_sha256"] == sha:
            verdict["found"] = True
            verdict["detail"] = f"sequence {seq} is in the trail as expected"
            return
        verdict["found"] = False
        verdict["detail"] = (f"sequence {seq} has record_sha256 {record['record_sha256']}, not "
                             f"the expected {sha}: the chain was rewritten")  # fmt: skip
        blob = where.blob if where else (report.blobs[0] if report.blobs else PREFIX)
        report.broken = Break("changed", blob, where.number if where else 0, seq, seq,
                              verdict["detail"])  # fmt: skip
        return
    last_seq = int(records[-1][1]["sequence"]) if records else 0
    if records and seq < int(records[0][1]["sequence"]):
        verdict["detail"] = f"sequence {seq} is before the range read: widen --from"
        return
    if bounded:
        verdict["detail"] = f"sequence {seq} is after the range read: drop --to"
        return
    verdict["found"] = False
    verdict["detail"] = (
        f"the trail ends at sequence {last_seq}, but sequence {seq} was expected: "
        + ("it has no records" if not records else "records were cut from its end")
    )
    last_line = lines[-1] if lines else None
    report.broken = Break(
        "removed",
        last_line.blob if last_line else (report.blobs[-1] if report.blobs else PREFIX),
        (last_line.number + 1) if last_line else 1,
        None,
        last_seq + 1,
        verdict["detail"],
    )
