"""Reading and verifying the signed, per-writer audit trail (the format: :mod:`.records`).

Every trail blob of both containers (the pipeline's and the people's) is read, grouped by chain
and ordered by (day, part); each chain is checked on its own: every line a canonical record that
matches its ``record_sha256``, in the blob of its chain and of its day, sequences 1, 2, 3, ...
linked by ``prev_sha256`` across blobs joined by seals, every record inside exactly one batch
whose signature verifies with the chain's signer, that signer trusted for the chain's role and
not revoked when it signed, and (with expected heads) no chain cut short or missing. Each
problem is a :class:`Break` naming the chain, the first bad sequence of its kind and where the
line is. :class:`TrailReader` reads Blob Storage; :func:`verify_blobs` is the pure check.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from byok_pipeline.audit.records import (
    GENESIS,
    PREFIX,
    ROLE_EVENTS,
    ROLES,
    SEAL_EVENT,
    START_EVENT,
    MalformedRecord,
    b64url_decode,
    parse_blob_name,
    parse_line,
    self_hash_ok,
)
from byok_pipeline.audit.signers import spki_sha256, verify_digest
from byok_pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient

#: The kinds of :class:`Break`, in the order the documentation explains them.
BREAK_KINDS = (
    "changed",
    "removed",
    "reordered",
    "inserted",
    "malformed",
    "moved",
    "unsigned",
    "bad_signature",
    "unknown_signer",
    "revoked_signer",
    "wrong_role",
    "truncated",
    "missing_chain",
)
#: Returns the public key of an HSM key id (None: no such key). Or a mapping kid -> key.
KeyFetcher = Callable[[str], "ec.EllipticCurvePublicKey | None"]
_HEX64 = frozenset("0123456789abcdef")


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def _timestamp(value: object) -> datetime | None:
    """An RFC 3339 UTC time (``...Z`` or ``+00:00``); None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    offset = parsed.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        return None
    return parsed


# ---------------------------------------------------------------------------------------------
# Trust


@dataclass(frozen=True)
class TrustedSigner:
    """One entry of the trust file: a key allowed to sign chains of ``role``."""

    kid: str
    spki_sha256: str
    role: str
    public_key_pem: str | None = None
    name: str | None = None
    revoked_after: datetime | None = None


@dataclass(frozen=True)
class Trust:
    """The signers an operator pinned (``--trust FILE``)::

        {"signers": [{"kid": "...", "spki_sha256": "<64 hex>", "role": "pipeline"|"person",
                      "public_key_pem": "...", "name": "...", "revoked_after": "RFC 3339"}]}

    ``public_key_pem`` may be left out for HSM key ids (the key is then fetched from the HSM
    and must have the pinned SPKI SHA-256); ``name`` and ``revoked_after`` are optional.
    """

    signers: Mapping[str, TrustedSigner]

    @classmethod
    def from_dict(cls, data: object) -> Trust:
        """Raises: ConfigError: not a trust document (the message names the entry)."""
        if not isinstance(data, dict) or not isinstance(data.get("signers"), list):
            raise ConfigError('a trust file is a JSON object {"signers": [...]}')
        signers: dict[str, TrustedSigner] = {}
        for index, entry in enumerate(data["signers"]):
            signer = _trusted_signer(index, entry)
            if signer.kid in signers:
                raise ConfigError(f"trust file: signer {signer.kid!r} is listed twice")
            signers[signer.kid] = signer
        return cls(signers)

    @classmethod
    def load(cls, path: str | Path) -> Trust:
        """Raises: ConfigError: unreadable, not JSON, or not a trust document."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"trust file {path}: {exc.strerror or 'unreadable'}") from None
        except ValueError:
            raise ConfigError(f"trust file {path} is not JSON") from None
        return cls.from_dict(data)


def _trusted_signer(index: int, entry: object) -> TrustedSigner:
    """Raises: ConfigError: the entry is not a valid signer."""
    where = f"trust file: signers[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not an object")
    unknown = set(entry) - {"kid", "spki_sha256", "role", "public_key_pem", "name", "revoked_after"}
    if unknown:
        raise ConfigError(f"{where} has unknown fields {sorted(unknown)}")
    kid, spki, role = entry.get("kid"), entry.get("spki_sha256"), entry.get("role")
    if not isinstance(kid, str) or not kid:
        raise ConfigError(f"{where} has no kid")
    if not isinstance(spki, str) or not _is_hex64(spki.lower()):
        raise ConfigError(f"{where} ({kid}): spki_sha256 is not 64 hex digits")
    if role not in ROLES:
        raise ConfigError(f"{where} ({kid}): role is not one of {', '.join(ROLES)}")
    pem = entry.get("public_key_pem")
    if pem is not None:
        if not isinstance(pem, str):
            raise ConfigError(f"{where} ({kid}): public_key_pem is not a string")
        key = _load_public_pem(pem, where)
        if spki_sha256(key) != spki.lower():
            raise ConfigError(f"{where} ({kid}): public_key_pem does not have that spki_sha256")
    elif not kid.startswith("https://"):
        raise ConfigError(f"{where} ({kid}): a key that is not in an HSM needs public_key_pem")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where} ({kid}): name is not a string")
    revoked: datetime | None = None
    if entry.get("revoked_after") is not None:
        revoked = _timestamp(entry["revoked_after"])
        if revoked is None:
            raise ConfigError(f"{where} ({kid}): revoked_after is not an RFC 3339 UTC time")
    return TrustedSigner(kid, spki.lower(), str(role), pem, name, revoked)


def _load_public_pem(pem: str, where: str) -> ec.EllipticCurvePublicKey:
    """Raises: ConfigError: not an EC P-256 public key in PEM."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(f"{where}: public_key_pem is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{where}: public_key_pem is not an EC P-256 key")
    return key


def _fetcher(fetch_key: KeyFetcher | Mapping[str, Any] | None) -> KeyFetcher:
    """One look-up per kid however many chains it signs."""
    if fetch_key is None:
        return lambda _kid: None
    if isinstance(fetch_key, Mapping):
        return fetch_key.get
    fetched: dict[str, ec.EllipticCurvePublicKey | None] = {}

    def fetch(kid: str) -> ec.EllipticCurvePublicKey | None:
        if kid not in fetched:
            fetched[kid] = fetch_key(kid)
        return fetched[kid]

    return fetch


@dataclass(frozen=True)
class _ChainSigner:
    """How a chain's signatures are checked: the key (None: they cannot be) and why."""

    kid: str | None
    key: ec.EllipticCurvePublicKey | None
    trust: str  # "pinned", "unpinned" (fetched from the HSM, no trust file), "none"
    revoked_after: datetime | None = None


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TrailBlob:
    """One trail blob: its container and name, and the day, chain and part its name says."""

    container: str
    name: str
    day: date
    chain_id: str
    part: int

    @property
    def where(self) -> str:
        return f"{self.container}/{self.name}"

    @classmethod
    def of(cls, container: str, name: str) -> TrailBlob | None:
        parsed = parse_blob_name(name)
        if parsed is None:
            return None
        return cls(container, name, parsed.day, parsed.chain_id, parsed.part)


@dataclass(frozen=True)
class Line:
    """One stored line of the trail, where it was found."""

    blob: str
    number: int  # 1-based line number in the blob
    raw: bytes


def split_lines(blob: str, data: bytes) -> Iterator[Line]:
    """The lines of a blob's content; an unterminated last line is kept (it is malformed)."""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    for number, raw in enumerate(parts, start=1):
        yield Line(blob, number, raw)


@dataclass(frozen=True)
class Break:
    """A problem in one chain: its kind, the first bad sequence of that kind, and where."""

    chain_id: str
    kind: str  # one of BREAK_KINDS
    sequence: int
    blob: str | None  # container/name
    line: int | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "kind": self.kind,
            "sequence": self.sequence,
            "blob": self.blob,
            "line": self.line,
            "detail": self.detail,
        }


@dataclass
class ChainSummary:
    """What one chain holds (as read; a broken chain's figures include its bad records)."""

    chain_id: str
    container: str | None = None
    records: int = 0
    blobs: int = 0
    role: str | None = None
    writer: str | None = None
    signer_kid: str | None = None
    trust: str = "none"
    first_recorded: str | None = None
    last_recorded: str | None = None
    head: dict[str, Any] | None = None  # sequence and record_sha256 of the last signed record
    # sequences a good signature covers (through the links inside its batch); not in to_dict
    authenticated: frozenset[int] = field(default=frozenset(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "records": self.records,
            "blobs": self.blobs,
            "role": self.role,
            "writer": self.writer,
            "signer_kid": self.signer_kid,
            "trust": self.trust,
            "first_recorded": self.first_recorded,
            "last_recorded": self.last_recorded,
            "head": self.head,
        }


@dataclass
class Report:
    """What ``byok audit verify`` found: breaks (none: ``ok``), each chain's summary and its
    head (what ``--expect-heads`` takes back)."""

    chains: dict[str, ChainSummary] = field(default_factory=dict)
    breaks: list[Break] = field(default_factory=list)
    blobs: int = 0

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def pinned(self) -> bool:
        """Every chain's signer is pinned by the trust file."""
        return all(c.trust == "pinned" for c in self.chains.values())

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains.values())

    @property
    def heads(self) -> dict[str, dict[str, Any]]:
        return {cid: dict(c.head) for cid, c in sorted(self.chains.items()) if c.head}

    def vouched(self) -> dict[str, frozenset[int]]:
        """Chain id -> the sequences this verification vouches for: covered by a good signature
        and before the chain's first break (whatever follows a break is suspect, even when
        signed: ``byok audit export`` marks those records ``trail_verified: false``)."""
        bad = self.first_bad()
        return {
            cid: frozenset(s for s in c.authenticated if s < bad.get(cid, s + 1))
            for cid, c in self.chains.items()
        }

    def first_bad(self) -> dict[str, int]:
        """Chain id -> its first bad sequence (over every kind)."""
        out: dict[str, int] = {}
        for b in self.breaks:
            out[b.chain_id] = min(out.get(b.chain_id, b.sequence), b.sequence)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "pinned": self.pinned,
            "records": self.records,
            "blobs": self.blobs,
            "chains": {cid: c.to_dict() for cid, c in sorted(self.chains.items())},
            "heads": {"chains": self.heads},
            "breaks": [b.to_dict() for b in self.breaks],
        }


@dataclass
class TrailRecord:
    """A parsed record with where it was stored (for export)."""

    record: dict[str, Any]
    blob: str
    line: int


# ---------------------------------------------------------------------------------------------
# The check


@dataclass
class _Entry:
    blob: TrailBlob
    line: int
    raw: bytes
    record: dict[str, Any]
    seq: int
    sha: str
    moved: bool = False

    @property
    def prev(self) -> str:
        return str(self.record["prev_sha256"])


@dataclass
class ChainContext:
    """For a range read (``--from``): the chain's start record and the last record before the
    range (both stored outside it); None each when the range holds them."""

    start: Line | None = None
    anchor: Line | None = None


class _Checker:
    """Checks one chain; collects the first break of each kind."""

    def __init__(
        self,
        chain_id: str,
        trust: Trust | None,
        fetch: KeyFetcher,
        summary: ChainSummary,
    ) -> None:
        self.chain_id = chain_id
        self.trust = trust
        self.fetch = fetch
        self.summary = summary
        self.container_roles: Mapping[str, str] = {}
        self.found: dict[str, Break] = {}

    def report(self, kind: str, seq: int, where: _Entry | Line | None, detail: str) -> None:
        blob: str | None
        if isinstance(where, _Entry):
            blob, line = where.blob.where, where.line
        elif isinstance(where, Line):
            blob, line = where.blob, where.number
        else:
            blob, line = None, None
        old = self.found.get(kind)
        if old is None or seq < old.sequence:
            self.found[kind] = Break(self.chain_id, kind, seq, blob, line, detail)

    # -- the signer ------------------------------------------------------------------------

    def chain_signer(
        self, start: dict[str, Any] | None, where: _Entry | Line | None
    ) -> _ChainSigner:
        if start is None:
            self.report("unknown_signer", 1, where, "no byok.trail.started record names the signer")
            return _ChainSigner(None, None, "none")
        role, kid, spki = (
            start.get("writer_role"),
            start.get("signer_kid"),
            start.get("signer_spki_sha256"),
        )
        self.summary.role = role if isinstance(role, str) else None
        self.summary.writer = start.get("writer") if isinstance(start.get("writer"), str) else None
        if role not in ROLES or not isinstance(kid, str) or not _is_hex64(spki):
            self.report(
                "malformed",
                1,
                where,
                "the start record lacks writer_role, signer_kid or signer_spki_sha256",
            )
            return _ChainSigner(None, None, "none")
        self.summary.signer_kid = kid
        if self.chain_id.split("-", 1)[0] != role:
            self.report(
                "wrong_role", 1, where, f"a {role} writer in a chain named for another role"
            )
        expected = self.container_roles.get(self.summary.container or "")
        if expected is not None and expected != role:
            self.report(
                "wrong_role",
                1,
                where,
                f"a {role} chain in the {expected} container ({self.summary.container})",
            )
        if self.trust is None:
            return self._unpinned(kid, str(spki), where)
        entry = self.trust.signers.get(kid)
        if entry is None:
            self.report(
                "unknown_signer", 1, where, f"the chain's signer {kid} is not in the trust file"
            )
            return _ChainSigner(kid, None, "none")
        if entry.spki_sha256 != spki:
            self.report(
                "unknown_signer",
                1,
                where,
                f"the start record names SPKI {spki} for {kid}; the trust file pins {entry.spki_sha256}",
            )
            return _ChainSigner(kid, None, "none")
        if entry.role != role:
            self.report(
                "wrong_role",
                1,
                where,
                f"the chain claims writer_role {role}, but its signer {kid} is trusted as {entry.role}",
            )
        key = self._key_of(entry, where)
        if key is None:
            return _ChainSigner(kid, None, "none")
        return _ChainSigner(kid, key, "pinned", entry.revoked_after)

    def _unpinned(self, kid: str, spki: str, where: _Entry | Line | None) -> _ChainSigner:
        if not kid.startswith("https://"):
            self.report("unknown_signer", 1, where, f"{kid} is not an HSM key: pin it with --trust")
            return _ChainSigner(kid, None, "none")
        key = self.fetch(kid)
        if key is None:
            self.report("unknown_signer", 1, where, f"the HSM has no key {kid}")
            return _ChainSigner(kid, None, "none")
        if spki_sha256(key) != spki:
            self.report(
                "unknown_signer",
                1,
                where,
                f"the HSM's key {kid} is not the one the start record names",
            )
            return _ChainSigner(kid, None, "none")
        return _ChainSigner(kid, key, "unpinned")

    def _key_of(
        self, entry: TrustedSigner, where: _Entry | Line | None
    ) -> ec.EllipticCurvePublicKey | None:
        if entry.public_key_pem is not None:
            return _load_public_pem(entry.public_key_pem, f"trust file ({entry.kid})")
        key = self.fetch(entry.kid)
        if key is None:
            self.report("unknown_signer", 1, where, f"the HSM has no key {entry.kid}")
            return None
        if spki_sha256(key) != entry.spki_sha256:
            self.report(
                "unknown_signer",
                1,
                where,
                f"the HSM's key {entry.kid} does not have the SPKI SHA-256 the trust file pins",
            )
            return None
        return key

    # -- one batch's signature -------------------------------------------------------------

    def check_signature(self, signer: _ChainSigner, e: _Entry, start: int) -> bool:
        """Whether the batch ``start..e`` is signed by the chain's signer (reports why not)."""
        sig = e.record["signature"]
        kid = sig["kid"]
        if signer.kid is None or (signer.key is None and kid == signer.kid):
            return False  # reported once, at the chain's start
        if kid != signer.kid:
            other = self.trust.signers.get(kid) if self.trust else None
            if other is None:
                self.report("unknown_signer", start, e, f"batch signed by {kid}, an unknown key")
            elif other.role != self.summary.role:
                self.report(
                    "wrong_role",
                    start,
                    e,
                    f"batch signed by {kid}, a {other.role} key, in a {self.summary.role} chain",
                )
            else:
                self.report(
                    "bad_signature",
                    start,
                    e,
                    f"batch signed by {kid}, not by the chain's signer {signer.kid}",
                )
            return False
        assert signer.key is not None  # noqa: S101  # kid == signer.kid and the key is known (above)
        value = b64url_decode(sig["value"])
        if not verify_digest(signer.key, bytes.fromhex(e.sha), value):
            self.report("bad_signature", start, e, f"the signature does not verify with {kid}")
            return False
        recorded = _timestamp(e.record.get("recorded"))
        if signer.revoked_after is not None and (
            recorded is None or recorded > signer.revoked_after
        ):
            self.report(
                "revoked_signer",
                start,
                e,
                f"batch recorded {e.record.get('recorded')}, after {kid} was revoked",
            )
            return False
        return True


def _lenient_sequence(raw: bytes) -> int | None:
    try:
        value = json.loads(raw).get("sequence")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _day_ok(e: _Entry) -> bool:
    """The record was recorded on the day of its blob; a seal, appended when the writer moves on
    to a new day, on the day of the blob it names."""
    recorded = _timestamp(e.record.get("recorded"))
    if recorded is None:
        return False
    if e.record.get("event") == SEAL_EVENT:
        nxt = parse_blob_name(str(e.record.get("next_blob")))
        return nxt is not None and recorded.date() == nxt.day and nxt.day >= e.blob.day
    return recorded.date() == e.blob.day


def _parse_anchor(line: Line | None, checker: _Checker, what: str) -> dict[str, Any] | None:
    if line is None:
        return None
    try:
        record = parse_line(line.raw)
    except MalformedRecord as exc:
        checker.report("malformed", _lenient_sequence(line.raw) or 1, line, f"{what}: {exc}")
        return None
    if not self_hash_ok(line.raw, record):
        checker.report(
            "changed", int(record["sequence"]), line, f"{what} does not match its record_sha256"
        )
        return None
    return record


def verify_blobs(
    blobs: Sequence[tuple[TrailBlob, bytes]],
    *,
    trust: Trust | None = None,
    fetch_key: KeyFetcher | Mapping[str, Any] | None = None,
    expected_heads: Mapping[str, Mapping[str, Any]] | None = None,
    contexts: Mapping[str, ChainContext] | None = None,
    container_roles: Mapping[str, str] | None = None,
) -> tuple[Report, list[TrailRecord]]:
    """Verify the trail blobs given (with their content); also returns every readable record.

    ``trust`` None: signers are looked up in the HSM through ``fetch_key`` and reported as
    unpinned. ``expected_heads``: chain id -> ``{"sequence", "record_sha256"}`` (what
    ``Report.heads`` gave earlier). ``contexts``: for a range read, what precedes the range per
    chain. ``container_roles``: container -> the role whose chains it holds (a chain of
    another role in it is ``wrong_role``).

    Raises:
        ConfigError: a trust entry's PEM cannot be loaded; an expected head has no integer
            sequence and hex record_sha256.
        TransientError: ``fetch_key`` failed (from the caller's fetcher).
    """
    fetch = _fetcher(fetch_key)
    report = Report(blobs=len(blobs))
    records: list[TrailRecord] = []
    by_chain: dict[str, list[tuple[TrailBlob, bytes]]] = {}
    for blob, data in blobs:
        role = (container_roles or {}).get(blob.container)
        if role is not None and not blob.chain_id.startswith(f"{role}-"):
            # a blob named for another role's chain, in this container: reported on its own,
            # never merged into the real chain of that id (it could only add noise there)
            report.breaks.append(
                Break(
                    blob.chain_id,
                    "wrong_role",
                    1,
                    blob.where,
                    None,
                    f"a blob of a chain that is not a {role} chain, in {blob.container}",
                )
            )
            continue
        by_chain.setdefault(blob.chain_id, []).append((blob, data))
    foreign: dict[str, list[_Entry]] = {}
    checkers: dict[str, _Checker] = {}

    def checker_of(chain_id: str) -> _Checker:
        if chain_id not in checkers:
            summary = report.chains.setdefault(chain_id, ChainSummary(chain_id))
            checkers[chain_id] = _Checker(chain_id, trust, fetch, summary)
            checkers[chain_id].container_roles = container_roles or {}
        return checkers[chain_id]

    parsed: dict[str, list[_Entry]] = {}
    for chain_id, chain_blobs in sorted(by_chain.items()):
        chain_blobs.sort(key=lambda item: (item[0].day, item[0].part))
        checker = checker_of(chain_id)
        checker.summary.blobs = len(chain_blobs)
        checker.summary.container = chain_blobs[0][0].container
        entries: list[_Entry] = []
        last_seq = 0  # of the line before, for a line without a readable sequence
        for blob, data in chain_blobs:
            for line in split_lines(blob.where, data):
                try:
                    record = parse_line(line.raw)
                except MalformedRecord as exc:
                    seq = _lenient_sequence(line.raw) or last_seq + 1
                    checker.report("malformed", seq, line, str(exc))
                    continue
                last_seq = int(record["sequence"])
                e = _Entry(
                    blob,
                    line.number,
                    line.raw,
                    record,
                    int(record["sequence"]),
                    record["record_sha256"],
                )
                records.append(TrailRecord(record, blob.where, line.number))
                if record["chain_id"] != chain_id:
                    foreign.setdefault(record["chain_id"], []).append(e)
                    continue
                if not self_hash_ok(line.raw, record):
                    checker.report(
                        "changed", e.seq, e, "the record does not match its record_sha256"
                    )
                if not _day_ok(e):
                    e.moved = True
                    checker.report(
                        "moved",
                        e.seq,
                        e,
                        f"recorded {record.get('recorded')}, in the blob of {blob.day}",
                    )
                entries.append(e)
        parsed[chain_id] = entries
    for chain_id, entries in sorted(foreign.items()):
        checker = checker_of(chain_id)
        for e in entries:
            checker.report(
                "moved", e.seq, e, f"a record of {chain_id} in the blob of {e.blob.chain_id}"
            )
    for chain_id, chain_blobs in sorted(by_chain.items()):
        context = (contexts or {}).get(chain_id) or ChainContext()
        _check_chain(checkers[chain_id], [b for b, _ in chain_blobs], parsed[chain_id], context)
    for chain_id, expected in sorted((expected_heads or {}).items()):
        _check_head(checker_of(chain_id), parsed.get(chain_id), expected)
    for chain_id in sorted(checkers):
        report.breaks.extend(
            sorted(
                checkers[chain_id].found.values(),
                key=lambda b: (b.sequence, BREAK_KINDS.index(b.kind)),
            )
        )
    return report, records


def _check_head(
    checker: _Checker, entries: list[_Entry] | None, expected: Mapping[str, Any]
) -> None:
    seq, sha = expected.get("sequence"), expected.get("record_sha256")
    if not isinstance(seq, int) or not _is_hex64(sha):
        raise ConfigError(
            f"expected heads: {checker.chain_id} needs a sequence and a record_sha256"
        )
    if not entries:
        checker.report(
            "missing_chain", 1, None, f"expected up to sequence {seq}; no record of it is there"
        )
        return
    same = [e for e in entries if e.seq == seq]
    if any(e.sha == sha for e in same):
        return
    if same:
        checker.report("changed", seq, same[0], f"sequence {seq} is not the record pinned ({sha})")
        return
    last = max(e.seq for e in entries)
    if last < seq:
        checker.report(
            "truncated",
            last + 1,
            entries[-1],
            f"the chain ends at sequence {last}; {seq} was pinned",
        )
    else:
        checker.report("removed", seq, None, f"the pinned sequence {seq} is not there")


def _check_chain(
    checker: _Checker,
    blobs: list[TrailBlob],
    entries: list[_Entry],
    context: ChainContext,
) -> None:
    summary = checker.summary
    summary.records = len(entries)
    if not entries and context.start is None:
        return  # blobs created, nothing appended: no records to check
    recorded = sorted(str(e.record.get("recorded")) for e in entries)
    summary.first_recorded = recorded[0] if recorded else None
    summary.last_recorded = recorded[-1] if recorded else None
    chain = _storage_order(checker, entries)
    ordered = [chain[s] for s in sorted(chain)]
    signer = _signer_of(checker, chain, context)
    _check_roles(checker, ordered)
    anchor = _parse_anchor(context.anchor, checker, "the record before the range")
    if anchor is not None:
        base_seq, prev_sha = int(anchor["sequence"]), str(anchor["record_sha256"])
    elif context.anchor is not None and ordered:  # a bad anchor (reported): start at the range
        base_seq, prev_sha = ordered[0].seq - 1, ordered[0].prev
    else:
        base_seq, prev_sha = 0, GENESIS
    links_ok = _links(checker, ordered, base_seq, prev_sha)
    authenticated = _batches(checker, signer, chain, links_ok, base_seq)
    summary.authenticated = frozenset(authenticated)
    # link breaks, now attributed: a record whose own batch is signed and that chains to
    # something else than the record before names that record as replaced; otherwise the
    # record itself does not belong there (forged, or rewritten without the key)
    for e in ordered:
        if e.seq <= base_seq or links_ok.get(e.seq, True):
            continue
        before = chain.get(e.seq - 1)
        if before is None and e.seq - 1 != base_seq:
            continue  # a gap: reported as removed
        if e.seq in authenticated and before is not None:
            checker.report(
                "changed",
                before.seq,
                before,
                f"the signed sequence {e.seq} chains to another record",
            )
        else:
            checker.report("inserted", e.seq, e, "prev_sha256 does not match the record before")
    signed = [s for s in sorted(authenticated) if s in chain and "signature" in chain[s].record]
    if signed:
        head = chain[signed[-1]]
        summary.head = {"sequence": head.seq, "record_sha256": head.sha}
    _check_seals(checker, blobs, entries)


def _storage_order(checker: _Checker, entries: list[_Entry]) -> dict[int, _Entry]:
    """Sequence -> record, reporting copies and records stored out of order."""
    chain: dict[int, _Entry] = {}
    highest = 0
    for e in entries:
        if e.seq in chain:
            what = "a copy of" if chain[e.seq].sha == e.sha else "a second record with"
            checker.report("inserted", e.seq, e, f"{what} sequence {e.seq}")
            continue
        chain[e.seq] = e
        if e.seq < highest and not e.moved:
            checker.report("reordered", e.seq, e, f"stored after sequence {highest}")
        highest = max(highest, e.seq)
    return chain


def _signer_of(checker: _Checker, chain: dict[int, _Entry], context: ChainContext) -> _ChainSigner:
    """The chain's signer, from its start record (read from before the range if need be)."""
    start_where: _Entry | Line | None
    if context.start is not None:
        start = _parse_anchor(context.start, checker, "the chain's start record")
        start_where = context.start
    else:
        first = chain.get(1)
        start = first.record if first else None
        start_where = first
    if start is not None and (start.get("event") != START_EVENT or start.get("sequence") != 1):
        checker.report("inserted", 1, start_where, "sequence 1 is not a byok.trail.started record")
        start = None
    signer = checker.chain_signer(start, start_where)
    checker.summary.trust = signer.trust
    return signer


def _check_roles(checker: _Checker, ordered: list[_Entry]) -> None:
    """Every event is one the chain's writer role may write."""
    role = checker.summary.role
    allowed = (ROLE_EVENTS.get(role, frozenset()) if role else frozenset()) | {SEAL_EVENT}
    for e in ordered:
        event = e.record.get("event")
        if e.seq == 1 and event == START_EVENT:
            continue
        if event not in allowed:
            checker.report("wrong_role", e.seq, e, f"a {role} chain may not record {event!r}")


def _links(
    checker: _Checker, ordered: list[_Entry], base_seq: int, prev_sha: str
) -> dict[int, bool]:
    """Sequence -> whether it links to the record before; gaps are reported as removed."""
    links_ok: dict[int, bool] = {}
    expected = base_seq + 1
    for e in ordered:
        if e.seq <= base_seq:
            checker.report("inserted", e.seq, e, f"sequence {e.seq} is before the range's anchor")
            continue
        if e.seq > expected:
            last = e.seq - 1
            plural = f" to {last} are" if last > expected else " is"
            checker.report("removed", expected, e, f"sequence {expected}{plural} missing")
            links_ok[e.seq] = False
        else:
            links_ok[e.seq] = e.prev == prev_sha
        prev_sha, expected = e.sha, e.seq + 1
    return links_ok


def _batches(
    checker: _Checker,
    signer: _ChainSigner,
    chain: dict[int, _Entry],
    links_ok: dict[int, bool],
    base_seq: int,
) -> set[int]:
    """Check that each record is in exactly one signed batch and each signature; returns the
    sequences a good signature fixes (through the links inside its batch)."""
    authenticated: set[int] = set()
    covered = base_seq
    ordered = sorted(chain)

    def first_after(bound: int) -> int | None:  # a bisection: crafted lines cost no n^2 walk
        i = bisect.bisect_right(ordered, bound)
        return ordered[i] if i < len(ordered) else None

    for seq in ordered:
        e = chain[seq]
        if "signature" not in e.record or seq <= base_seq:
            continue
        start_seq = int(e.record["batch_start"])
        if start_seq <= covered:
            checker.report(
                "inserted", seq, e, f"a batch from {start_seq} overlaps the one ending at {covered}"
            )
            covered = seq
            continue
        u = first_after(covered)
        if u is not None and u < start_seq:
            checker.report("unsigned", u, chain[u], f"sequence {u} is in no signed batch")
        if checker.check_signature(signer, e, start_seq):
            s = seq
            authenticated.add(s)
            while s > start_seq and links_ok.get(s) and (s - 1) in chain:
                s -= 1
                authenticated.add(s)
        covered = seq
    u = first_after(covered)
    if u is not None:
        checker.report("unsigned", u, chain[u], f"sequence {u} is in no signed batch")
    return authenticated


def _check_seals(checker: _Checker, blobs: list[TrailBlob], entries: list[_Entry]) -> None:
    """Each blob but the last ends with a seal naming the next one; nothing follows a seal."""
    per_blob: dict[str, list[_Entry]] = {}
    for e in entries:
        per_blob.setdefault(e.blob.name, []).append(e)
    for index, blob in enumerate(blobs):
        mine = per_blob.get(blob.name, [])
        seals = [i for i, e in enumerate(mine) if e.record.get("event") == SEAL_EVENT]
        if seals:
            for e in mine[seals[0] + 1 :]:
                if not e.moved:
                    checker.report("inserted", e.seq, e, f"a record after the seal of {blob.name}")
        nxt = blobs[index + 1] if index + 1 < len(blobs) else None
        seal = mine[seals[0]] if seals else None
        if nxt is None:
            # a seal naming a blob that was never created (the writer stopped) ends the chain;
            # a cut tail shows against expected heads (truncated)
            continue
        nxt_entries = per_blob.get(nxt.name, [])
        first_next = nxt_entries[0] if nxt_entries else None
        if seal is None:
            if first_next is not None and (not mine or first_next.seq == mine[-1].seq + 1):
                checker.report(
                    "inserted",
                    first_next.seq,
                    first_next,
                    f"{blob.name} has no seal, yet the chain continues in {nxt.name}",
                )
            continue
        if seal.record.get("next_blob") != nxt.name:
            named = str(seal.record.get("next_blob"))
            checker.report(
                "removed",
                seal.seq + 1,
                seal,
                f"the seal names {named}, which is not there; the chain continues in {nxt.name}",
            )


# ---------------------------------------------------------------------------------------------
# Reading Blob Storage


class TrailReader:
    """Reads the trail blobs of the pipeline's container and the people's container."""

    def __init__(
        self, service: BlobServiceClient, container: str, people_container: str | None = None
    ) -> None:
        self.container_name = container
        self.people_container_name = people_container
        #: which role's chains each container holds
        self.container_roles: dict[str, str] = {}
        if people_container and people_container != container:
            self.container_roles = {container: "pipeline", people_container: "person"}
        names = [container] + (
            [people_container] if people_container and people_container != container else []
        )
        self._containers: dict[str, ContainerClient] = {
            name: service.get_container_client(name) for name in names
        }

    def blobs(self) -> list[TrailBlob]:
        """Every trail blob of both containers, by chain, day and part.

        Raises:
            azure.core.exceptions.AzureError: listing failed (a missing people container is
                read as empty).
        """
        from azure.core.exceptions import ResourceNotFoundError

        found: list[TrailBlob] = []
        for container_name, client in self._containers.items():
            try:
                for item in client.list_blobs(name_starts_with=PREFIX):
                    blob = TrailBlob.of(container_name, item.name)
                    if blob is not None:
                        found.append(blob)
            except ResourceNotFoundError:
                if container_name == self.container_name:
                    raise
        return sorted(found, key=lambda b: (b.chain_id, b.day, b.part, b.container))

    def read_blob(self, blob: TrailBlob) -> bytes:
        """Raises: azure.core.exceptions.AzureError: the download failed."""
        client = self._containers[blob.container].get_blob_client(blob.name)
        return bytes(client.download_blob().readall())

    # the single-container view some callers use
    def blob_names(self) -> list[str]:
        return sorted(b.name for b in self.blobs())

    def read(self, name: str) -> bytes:
        """Raises: KeyError: no trail blob of that name; AzureError: storage failed."""
        for blob in self.blobs():
            if blob.name == name:
                return self.read_blob(blob)
        raise KeyError(name)

    def lines(self, names: Sequence[str]) -> list[Line]:
        """The stored lines of those blobs, in that order.

        Raises:
            KeyError: a name that is not a trail blob.
            azure.core.exceptions.AzureError: storage failed.
        """
        by_name = {b.name: b for b in self.blobs()}
        out: list[Line] = []
        for name in names:
            out.extend(split_lines(name, self.read_blob(by_name[name])))
        return out

    def verify(
        self,
        start: date | None = None,
        end: date | None = None,
        *,
        trust: Trust | None = None,
        fetch_key: KeyFetcher | Mapping[str, Any] | None = None,
        expected_heads: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[Report, list[TrailRecord]]:
        """Verify the days [start, end] (each bound optional) of every chain.

        With ``start``, a chain that began earlier is anchored on its last record before the
        range, and its signer read from its start record. ``expected_heads`` checks whole
        chains: it does not combine with a range.

        Raises:
            ValueError: ``expected_heads`` with a range.
            ConfigError: a trust entry's PEM cannot be loaded; an expected head is malformed.
            azure.core.exceptions.AzureError: storage failed.
            TransientError: ``fetch_key`` failed.
        """
        if expected_heads is not None and (start is not None or end is not None):
            raise ValueError("expected heads are checked over whole chains, not a range")
        every = self.blobs()
        chosen = [
            b for b in every if (start is None or b.day >= start) and (end is None or b.day <= end)
        ]
        contexts: dict[str, ChainContext] = {}
        if start is not None:
            chosen_chains = {b.chain_id for b in chosen}
            for chain_id in sorted(chosen_chains):
                before = [b for b in every if b.chain_id == chain_id and b.day < start]
                if before:
                    contexts[chain_id] = self._context(before)
        content = [(b, self.read_blob(b)) for b in chosen]
        return verify_blobs(
            content,
            trust=trust,
            fetch_key=fetch_key,
            expected_heads=expected_heads,
            contexts=contexts,
            container_roles=self.container_roles,
        )

    def _context(self, before: list[TrailBlob]) -> ChainContext:
        first = list(split_lines(before[0].where, self.read_blob(before[0])))
        anchor: Line | None = None
        for blob in reversed(before):
            lines = (
                first if blob == before[0] else list(split_lines(blob.where, self.read_blob(blob)))
            )
            if lines:
                anchor = lines[-1]
                break
        return ChainContext(start=first[0] if first else None, anchor=anchor)
