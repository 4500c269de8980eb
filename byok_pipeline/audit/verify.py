"""Reading and verifying the trail: every line parsed, every hash and link checked, breaks
reported with their first sequence. The format is described in :mod:`byok_pipeline.audit.trail`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

from byok_pipeline.audit.records import (
    GENESIS,
    PREFIX,
    SEAL_EVENT,
    TrailError,
    parse_blob_name,
    parse_line,
    self_hash_ok,
)

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient


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
                return broken(
                    "reordered",
                    line,
                    seq,
                    f"the seal of {prev_blob} names {prev_record.get('next_blob')}, "
                    f"but the chain continues in {line.blob}",
                )
        elif (
            line.blob == prev_blob
            and prev_record is not None
            and prev_record.get("event") == SEAL_EVENT
        ):
            return broken("inserted", line, seq, f"a record after the seal of {line.blob}")
        if seq != expected or record["prev_sha256"] != prev_sha:
            if record["record_sha256"] in seen:
                return broken(
                    "inserted",
                    line,
                    seq,
                    f"a copy of the record with sequence {seen[record['record_sha256']]}",
                )
            if seq == expected:
                return broken(
                    "inserted",
                    line,
                    seq,
                    "prev_sha256 does not match the record before: a record was "
                    "forged or rewritten here",
                )
            if seq > expected:
                later = (_lenient_sequence(other.raw) for other in lines[index + 1 :])
                if expected in later:
                    return broken("reordered", line, seq, f"sequence {expected} comes later")
                return broken(
                    "removed",
                    line,
                    seq,
                    f"sequence {expected}"
                    + (f" to {seq - 1} are" if seq - 1 > expected else " is")
                    + " missing",
                )
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
        return Break(
            "malformed",
            line.blob,
            line.number,
            seq,
            seq or 0,
            f"the record before the range is not a trail record: {exc}",
        )
    if not self_hash_ok(line.raw, record):
        return Break(
            "changed",
            line.blob,
            line.number,
            seq,
            seq or 0,
            "the record before the range does not match its own record_sha256",
        )
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
        verdict["detail"] = (
            f"sequence {seq} has record_sha256 {record['record_sha256']}, not "
            f"the expected {sha}: the chain was rewritten"
        )
        blob = where.blob if where else (report.blobs[0] if report.blobs else PREFIX)
        report.broken = Break(
            "changed", blob, where.number if where else 0, seq, seq, verdict["detail"]
        )
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
