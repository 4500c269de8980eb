"""Trail records: naming of the day blobs, canonical JSON, sealing and parsing of one line.

The format is described in :mod:`byok_pipeline.audit.trail`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import date
from typing import TYPE_CHECKING, Any, NoReturn

from byok_pipeline.core.errors import TransientError

if TYPE_CHECKING:
    pass

PREFIX = "trail/"
GENESIS = "0" * 64
SEAL_EVENT = "byok.trail.sealed"
#: The fields the trail adds to each event.
TRAIL_FIELDS = ("sequence", "prev_sha256", "recorded", "record_sha256")
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
