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
ensure_ascii=True)`` and the line is exactly the canonical JSON of the record *with*
``record_sha256``, so any changed byte shows. When the chain moves on to a new blob (a new UTC
day, or a full part), the old blob is closed with a seal record (``byok.trail.sealed``, naming
``next_blob``) and the first record of the new blob chains to the seal: the first record of a
day chains to the last record of the previous day that has records.

Writers append with an append-position condition (``appendpos_condition`` = the length they
last saw), so concurrent writers in threads or separate processes never interleave: a writer
that lost the race gets 412, reads what was appended since and retries on top of it. Each
writer keeps the head (blob, length, last record) in memory, so the normal cost of one record
is one append request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError

from . import __version__
from .audit import AuditSink, utc_now
from .errors import TransientError
from .status import utc

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient

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
_NAME_RE = re.compile(r"^trail/(\d{4})/(\d{2})/(\d{2})/(\d{4})\.jsonl$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(rb',"record_sha256":"[0-9a-f]{64}"')


class TrailError(TransientError):
    """The trail cannot be read or continued: its last record is malformed. Appends stop (no
    package completes unaudited) until an operator has run ``byok audit verify`` and repaired
    the head."""

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
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


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


def parse_line(raw: bytes) -> dict[str, Any]:
    """Parse one stored line (without its newline).

    Raises:
        ValueError: not a JSON object with an integer ``sequence`` and hex hashes
            (:class:`MalformedRecord`, or the JSON decoder's error).
    """
    record = json.loads(raw)
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
    expected = hashlib.sha256(canonical(body)).hexdigest()
    return record.get("record_sha256") == expected and canonical(record) == raw


# -- writing ----------------------------------------------------------------------------------


@dataclass
class _Head:
    """Where the next record goes, and the record it chains to."""

    blob: str  # the blob to append to
    offset: int  # its length as last seen: the append position
    blocks: int  # its committed block count as last seen
    last: dict[str, Any] | None  # the last record of the chain (None: the trail is empty)


@dataclass
class TrailStats:
    """Counters of one writer (tests assert the cheap path is the normal one)."""

    appended: int = 0
    conflicts: int = 0  # 412: another writer appended first (each costs one reread)
    created: int = 0  # blobs this writer created (404 on the first append to a blob)
    discoveries: int = 0  # full lookups of the head (first use, or after the unexpected)
    seals: int = 0


class _Conflict(Exception):
    """Another writer appended first (412), or the blob is not there yet (404)."""


class AuditTrail:
    """Appends records to the chain. Thread-safe; one per process is enough, several are fine.

    ``clock`` decides the UTC day (a seam for tests); ``max_attempts`` bounds the retries of
    one append (conflicts with other writers and transient storage errors).
    """

    def __init__(
        self,
        service: BlobServiceClient,
        container: str,
        *,
        clock: Callable[[], datetime] = utc_now,
        max_attempts: int = 40,
        backoff: float = 0.01,
        backoff_max: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.container_name = container
        self._container: ContainerClient = service.get_container_client(container)
        self._clock = clock
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._sleep = sleep
        self._lock = threading.Lock()
        self._head: _Head | None = None
        self._random = random.Random()  # noqa: S311  # jitter between retries, not a secret
        self.stats = TrailStats()

    # -- public -----------------------------------------------------------------------------
    def append(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``event`` as the next record; return the record as stored.

        Raises:
            TransientError: the record could not be appended within the bounded retries (the
                caller must not treat the event as recorded).
        """
        fields = {k: v for k, v in event.items() if k not in TRAIL_FIELDS}
        if len(canonical(fields)) > MAX_RECORD_BYTES - 512:
            raise ValueError(f"audit event {fields.get('event')} is too large for the trail")
        why = "no attempt made"
        with self._lock:
            for attempt in range(self._max_attempts):
                try:
                    return self._try_append(fields)
                except _Conflict as exc:
                    why = str(exc)
                except TrailError:
                    self._head = None
                    raise
                except AzureError as exc:
                    self._head = None  # rediscover: the blob may have changed under us
                    code = getattr(exc, "error_code", None) or ""
                    why = f"{type(exc).__name__} {getattr(exc, 'status_code', '') or ''} {code}"
                    if _permanent(exc):
                        raise TransientError(
                            f"audit trail append to {self.container_name} failed: {why.strip()}",
                            reason="audit_trail",
                        ) from None
                if attempt:  # the first retry after a conflict goes at once
                    delay = min(self._backoff_max, self._backoff * 2 ** min(attempt, 10))
                    self._sleep(delay * (0.5 + self._random.random()))
        raise TransientError(
            f"audit trail append to {self.container_name} failed after "
            f"{self._max_attempts} attempts ({why})",
            reason="audit_trail",
        )

    # -- one attempt ------------------------------------------------------------------------
    def _try_append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        head = self._head or self._discover()
        self._head = head
        now = self._clock()
        if head.last is not None and head.last.get("event") == SEAL_EVENT:
            following = str(head.last.get("next_blob", ""))
            if head.blob != following:  # the chain continues in the sealed blob's successor
                if parse_blob_name(following) is None:
                    raise TrailError(
                        f"the trail's last seal names no valid next blob: {following!r}"
                    )
                head.blob, head.offset, head.blocks = following, 0, 0
        else:
            successor = self._successor(head, now.date())
            if successor is not None:
                self._seal(head, successor, now)
                head.blob, head.offset, head.blocks = successor, 0, 0
        last = head.last
        record = seal_record(
            {
                **fields,
                "sequence": (int(last["sequence"]) + 1) if last else 1,
                "prev_sha256": str(last["record_sha256"]) if last else GENESIS,
                "recorded": utc(now),
            }
        )
        self._append_at(head, encode_line(record))
        head.last = record
        self.stats.appended += 1
        return record

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

    def _seal(self, head: _Head, successor: str, now: datetime) -> None:
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
        self._append_at(head, encode_line(seal))
        head.last = seal
        self.stats.seals += 1

    def _append_at(self, head: _Head, line: bytes) -> None:
        """Append ``line`` at ``head.offset`` exactly, or update ``head`` and raise _Conflict."""
        blob = self._container.get_blob_client(head.blob)
        try:
            result = blob.append_block(line, appendpos_condition=head.offset)
        except HttpResponseError as exc:
            code = getattr(exc, "error_code", None)
            if exc.status_code == 404 and code != "ContainerNotFound":
                if head.offset:  # it was there: replaced or deleted under us
                    self._head = None
                    raise _Conflict(f"{head.blob} disappeared") from None
                with contextlib.suppress(ResourceExistsError):
                    blob.create_append_blob(if_none_match="*")
                    self.stats.created += 1
                raise _Conflict(f"{head.blob} did not exist yet") from None
            if exc.status_code == 412:
                self._reread(head)
                raise _Conflict(f"another writer appended to {head.blob}") from None
            if exc.status_code == 409 and code == "BlockCountExceedsLimit":
                head.blocks = MAX_BLOCKS
                raise _Conflict(f"{head.blob} is full") from None
            raise
        head.offset += len(line)
        count = result.get("blob_committed_block_count")
        head.blocks = int(count) if isinstance(count, int) else head.blocks + 1

    def _reread(self, head: _Head) -> None:
        """After a 412: read what was appended since ``head.offset``; take its last record."""
        self.stats.conflicts += 1
        blob = self._container.get_blob_client(head.blob)
        try:
            downloader = blob.download_blob(offset=head.offset, length=TAIL_BYTES)
        except HttpResponseError as exc:
            if exc.status_code == 416:  # nothing past our offset: the blob shrank (replaced)
                self._head = None
                return
            raise
        data = downloader.readall()
        blocks = downloader.properties.append_blob_committed_block_count
        size = head.offset + len(data)
        if len(data) >= TAIL_BYTES:  # maybe far behind: read just the end
            props = blob.get_blob_properties()
            size, blocks = int(props.size), props.append_blob_committed_block_count
            if size > head.offset + len(data):
                data = blob.download_blob(offset=size - TAIL_BYTES, length=TAIL_BYTES).readall()
                data = data[data.find(b"\n") + 1 :]
        last = _last_record(data, head.blob)
        if last is not None:
            head.last = last
        head.offset = size
        head.blocks = int(blocks) if blocks is not None else head.blocks

    def _discover(self) -> _Head:
        """Find the head from a listing: the last blob, and the last record of the chain."""
        self.stats.discoveries += 1
        blobs = sorted(
            (b.name, int(b.size or 0))
            for b in self._container.list_blobs(name_starts_with=PREFIX)
            if parse_blob_name(b.name) is not None
        )
        if not blobs:
            return _Head(blob_name(self._clock().date()), 0, 0, None)
        name, size = blobs[-1]
        blocks = 0
        last: dict[str, Any] | None = None
        for candidate, candidate_size in reversed(blobs):
            if candidate_size == 0:
                continue
            client = self._container.get_blob_client(candidate)
            start = max(0, candidate_size - TAIL_BYTES)
            downloader = client.download_blob(offset=start)  # to the end
            data = downloader.readall()
            if candidate == name:
                size = start + len(data)
                blocks = int(downloader.properties.append_blob_committed_block_count or 0)
            if start:
                data = data[data.find(b"\n") + 1 :]
            last = _last_record(data, candidate)
            if last is not None:
                break
        return _Head(name, size, blocks, last)


def _last_record(data: bytes, where: str) -> dict[str, Any] | None:
    """The last complete record in ``data`` (the end of a blob), None if it holds none.

    Raises:
        TrailError: the last line is not a trail record.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    else:
        raise TrailError(f"{where} does not end with a complete record: run `byok audit verify`")
    if not lines:
        return None
    try:
        return parse_line(lines[-1])
    except ValueError as exc:
        raise TrailError(
            f"the last record of {where} is malformed ({exc}): run `byok audit verify`"
        ) from None


def _permanent(exc: AzureError) -> bool:
    """Errors a retry cannot fix (a missing container, a denied request, a wrong blob type)."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and status in (400, 401, 403, 404, 405, 409)


class TrailAuditSink:
    """An :class:`~byok_pipeline.audit.AuditSink` over the trail.

    ``emit`` returns only once the record is appended (else it raises), then hands the stored
    record (the event plus its ``sequence`` and hashes) to ``then`` (telemetry, a local file).
    """

    def __init__(self, trail: AuditTrail, *, then: AuditSink | None = None) -> None:
        self.trail = trail
        self.then = then

    def emit(self, event: Mapping[str, Any]) -> None:
        record = self.trail.append(event)
        if self.then is not None:
            self.then.emit(record)


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

    def anchor_before(self, before: str | None, names: list[str]) -> dict[str, Any] | None:
        """The last record before the selected blobs (walks back over empty blobs)."""
        if before is None:
            return None
        all_names = self.blob_names()
        index = all_names.index(before)
        for name in reversed(all_names[: index + 1]):
            if name in names:
                continue
            records = list(split_lines(name, self.read(name)))
            if records:
                try:
                    return parse_line(records[-1].raw)
                except ValueError as exc:
                    raise TrailError(f"the last record of {name} is malformed ({exc})") from None
        return None

    def lines(self, names: Iterable[str]) -> list[Line]:
        out: list[Line] = []
        for name in names:
            out.extend(split_lines(name, self.read(name)))
        return out

    def verify(
        self, start: date | None = None, end: date | None = None
    ) -> tuple[Report, list[Line]]:
        """Verify the days [start, end] (each bound optional); also returns the lines read."""
        names, before = self.select(start, end)
        anchor = self.anchor_before(before, names)
        lines = self.lines(names)
        report = verify_lines(lines, anchor)
        report.blobs = names
        return report, lines
