"""Trail records: the format of the signed, hash-chained audit trail (pure; no storage).

One **chain** per writer: every process of the pipeline, and every person's CLI, appends to a
chain of its own, so writers never contend. A chain lives in append blobs
``trail/YYYY/MM/DD/<chain_id>/NNNN.jsonl`` (one folder per UTC day it writes in; NNNN counts
parts within the day). Its id names the writer's role, when it started and 12 random hex
digits, e.g. ``pipeline-20261201T015500Z-1a2b3c4d5e6f``.

Each line is one record, the audit event's fields plus:

- ``chain_id``; ``sequence``: 1, 2, 3, ... within the chain;
- ``prev_sha256``: the ``record_sha256`` of the record before (64 zeros for sequence 1);
- ``recorded``: UTC time of the append (RFC 3339 with microseconds, ``Z``); every record stands
  in the blob of its ``recorded`` day, except a seal, which closes the old day's blob with the
  time the chain moved on (the new day's);
- ``record_sha256``: SHA-256 of the record's canonical JSON without ``record_sha256`` and
  ``signature``.

Each append (a **batch**: the events of one step of one package) is signed once: its last record
carries ``batch_start`` (the first sequence of the batch; inside the hash) and ``signature`` =
``{"kid", "alg": "ES256", "value"}``, ECDSA P-256 with SHA-256 over the record's canonical JSON
without ``record_sha256`` and ``signature`` (so the signed digest is ``record_sha256``), the
value ``r || s`` in base64url without padding (the JWS form). Through ``prev_sha256`` that one
signature fixes the whole chain up to it; ``batch_start`` says which records its signer wrote,
so a record someone else slipped in between two batches is covered by no signature.

The first record of a chain (``byok.trail.started``) names the writer: ``writer_role``
(``pipeline`` or ``person``), ``writer`` (free text), ``signer_kid`` and
``signer_spki_sha256``; every signature in the chain must be by that key. When a chain moves on
to a new blob (a new UTC day, or a full blob) the old one ends with a signed
``byok.trail.sealed`` record naming ``next_blob``.

The canonical JSON is ``json.dumps(record, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)``; a stored line is exactly the canonical JSON of the record
(``record_sha256`` and ``signature`` included) and a newline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NoReturn, Protocol

from byok_pipeline.core.errors import TransientError
from offline_packager.package_format import b64url_encode

PREFIX = "trail/"
GENESIS = "0" * 64
START_EVENT = "byok.trail.started"
SEAL_EVENT = "byok.trail.sealed"
SIGNATURE_ALG = "ES256"
ROLES = ("pipeline", "person")
#: The fields the trail adds to each event (an event never sets them itself).
TRAIL_FIELDS = (
    "chain_id",
    "sequence",
    "prev_sha256",
    "recorded",
    "record_sha256",
    "batch_start",
    "signature",
)
#: The events each writer role may write (besides the trail's own start and seal records).
ROLE_EVENTS: dict[str, frozenset[str]] = {
    "pipeline": frozenset(
        {
            "byok.received",
            "byok.awaiting_approval",
            "byok.validated",
            "byok.importing",
            "byok.imported",
            "byok.verified",
            "byok.rejected",
            "byok.failed",
            "byok.verification_failed",
            "byok.duplicate",
        }
    ),
    "person": frozenset(
        {
            "byok.kek.created",
            "byok.kek.downloaded",
            "byok.policy.changed",
            # `byok import` runs the pipeline's steps on a person's machine, signed by them
            "byok.received",
            "byok.validated",
            "byok.importing",
            "byok.imported",
            "byok.verified",
            "byok.rejected",
            "byok.verification_failed",
            "byok.duplicate",  # `byok import` of a package imported before
        }
    ),
}
CHAIN_ID_RE = re.compile(r"(?P<role>[a-z]{1,16})-(?P<start>[0-9]{8}T[0-9]{6}Z)-[0-9a-f]{12}")
_NAME_RE = re.compile(
    r"trail/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<chain>[a-z0-9TZ-]{1,64})/(?P<part>\d{4})\.jsonl"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]{86}")  # 64 bytes, no padding


class TrailError(TransientError):
    """The trail cannot be written: its storage refused, or this writer's own chain was
    damaged under it. Appends stop (no package completes unaudited) until it is resolved."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="audit_trail_broken")


class MalformedRecord(ValueError):
    """A stored line is not a trail record."""


class Signer(Protocol):
    """Signs a trail batch: ES256 over a SHA-256 digest, returning ``r || s`` (64 bytes)."""

    @property
    def kid(self) -> str: ...

    @property
    def spki_sha256(self) -> str: ...

    def sign_digest(self, digest: bytes) -> bytes: ...


def new_chain_id(role: str, now: datetime) -> str:
    """A fresh chain id for a writer of ``role`` starting at ``now`` (UTC)."""
    if role not in ROLES:
        raise ValueError(f"unknown writer role {role!r}")
    return f"{role}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"


def blob_name(day: date, chain_id: str, part: int = 0) -> str:
    """``trail/YYYY/MM/DD/<chain_id>/NNNN.jsonl``."""
    return f"{PREFIX}{day:%Y/%m/%d}/{chain_id}/{part:04d}.jsonl"


@dataclass(frozen=True, order=True)
class BlobName:
    day: date
    chain_id: str
    part: int


def parse_blob_name(name: str) -> BlobName | None:
    """The day, chain and part of a trail blob name; None for any other name."""
    match = _NAME_RE.fullmatch(name)
    if match is None or not CHAIN_ID_RE.fullmatch(match["chain"]):
        return None
    try:
        day = date(int(match["y"]), int(match["m"]), int(match["d"]))
    except ValueError:
        return None
    return BlobName(day, match["chain"], int(match["part"]))


def canonical(record: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``record``.

    Raises:
        ValueError: it holds a NaN or an infinity (not JSON).
    """
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def signed_bytes(record: Mapping[str, Any]) -> bytes:
    """What ``record_sha256`` hashes and the signature signs: the canonical JSON of the record
    without ``record_sha256`` and ``signature``."""
    return canonical({k: v for k, v in record.items() if k not in ("record_sha256", "signature")})


def seal_record(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` plus its ``record_sha256`` (any old hash and signature dropped)."""
    record = {k: v for k, v in body.items() if k not in ("record_sha256", "signature")}
    record["record_sha256"] = hashlib.sha256(canonical(record)).hexdigest()
    return record


def b64url_decode(text: str) -> bytes:
    """Raises: MalformedRecord: not 86 base64url characters (64 bytes) without padding."""
    if not _B64URL.fullmatch(text):
        raise MalformedRecord("signature.value is not 64 bytes of base64url")
    return base64.urlsafe_b64decode(text + "==")


def sign_record(record: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """A sealed record (with ``batch_start``) plus its signature by ``signer``."""
    sealed = seal_record(record)
    value = signer.sign_digest(bytes.fromhex(sealed["record_sha256"]))
    if len(value) != 64:
        raise ValueError("an ES256 signature is 64 bytes (r || s)")
    sealed["signature"] = {"kid": signer.kid, "alg": SIGNATURE_ALG, "value": b64url_encode(value)}
    return sealed


def build_batch(
    events: Sequence[Mapping[str, Any]],
    *,
    chain_id: str,
    after: Mapping[str, Any] | None,
    recorded: str,
    signer: Signer,
) -> list[dict[str, Any]]:
    """The records of one append: ``events`` chained after ``after`` (None: the chain's first
    record), the last one carrying ``batch_start`` and the signature."""
    if not events:
        raise ValueError("an append holds at least one event")
    sequence = int(after["sequence"]) if after else 0
    prev = str(after["record_sha256"]) if after else GENESIS
    start = sequence + 1
    records: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        fields = {k: v for k, v in event.items() if k not in TRAIL_FIELDS}
        sequence += 1
        body = {
            **fields,
            "chain_id": chain_id,
            "sequence": sequence,
            "prev_sha256": prev,
            "recorded": recorded,
        }
        if i == len(events) - 1:
            body["batch_start"] = start
            record = sign_record(body, signer)
        else:
            record = seal_record(body)
        records.append(record)
        prev = record["record_sha256"]
    return records


def encode_line(record: Mapping[str, Any]) -> bytes:
    """The line a record is stored as (canonical JSON and a newline)."""
    return canonical(record) + b"\n"


def _no_constant(name: str) -> NoReturn:
    raise MalformedRecord(f"{name} is not JSON")


def parse_line(raw: bytes) -> dict[str, Any]:
    """Parse one stored line (without its newline).

    Raises:
        MalformedRecord: not a JSON object with a chain id, an integer ``sequence``, hex hashes
            and, where present, a well-formed ``batch_start`` and ``signature``.
    """
    try:
        record = json.loads(raw, parse_constant=_no_constant)
    except MalformedRecord:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, the int-digits limit
        raise MalformedRecord(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(record, dict):
        raise MalformedRecord("not a JSON object")
    if not isinstance(record.get("chain_id"), str) or not CHAIN_ID_RE.fullmatch(record["chain_id"]):
        raise MalformedRecord("no valid chain_id")
    sequence = record.get("sequence")
    if not _positive_int(sequence):
        raise MalformedRecord("no valid sequence")
    for name in ("event", "recorded"):
        if not isinstance(record.get(name), str):
            raise MalformedRecord(f"no valid {name}")
    for name in ("prev_sha256", "record_sha256"):
        if not isinstance(record.get(name), str) or not _HEX64.fullmatch(record[name]):
            raise MalformedRecord(f"no valid {name}")
    signature = record.get("signature")
    if ("batch_start" in record) != ("signature" in record):  # `"signature": null` is no absence
        raise MalformedRecord("batch_start and signature go together")
    if "signature" in record:
        if not _positive_int(record["batch_start"]) or record["batch_start"] > sequence:
            raise MalformedRecord("no valid batch_start")
        if (
            not isinstance(signature, dict)
            or set(signature) != {"kid", "alg", "value"}
            or signature["alg"] != SIGNATURE_ALG
            or not isinstance(signature["kid"], str)
            or not isinstance(signature["value"], str)
        ):
            raise MalformedRecord("no valid signature")
        b64url_decode(signature["value"])
    return record


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def self_hash_ok(raw: bytes, record: Mapping[str, Any]) -> bool:
    """The line is the canonical form of ``record`` and ``record_sha256`` hashes the rest."""
    try:
        expected = hashlib.sha256(signed_bytes(record)).hexdigest()
        return record.get("record_sha256") == expected and canonical(record) == raw
    except ValueError:  # a number JSON cannot hold (1e400 reads as an infinity)
        return False
