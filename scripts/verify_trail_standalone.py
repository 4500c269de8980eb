#!/usr/bin/env python3
"""Verify an exported BYOK audit trail without trusting the BYOK tool (Python 3.11+ standard
library and ``cryptography`` only; it imports nothing of the project).

    az storage blob download-batch -s byok-audit -d export/byok-audit --pattern 'trail/*'
    az storage blob download-batch -s byok-audit-people -d export/byok-audit-people --pattern 'trail/*'
    python verify_trail_standalone.py export trust.json [--expect-heads heads.json]

Every ``trail/YYYY/MM/DD/<chain>/NNNN.jsonl`` file under the folder is read. Per chain (its files
in day and part order), each line must be the canonical JSON of a record whose
``record_sha256`` is the SHA-256 of the record without ``record_sha256`` and ``signature``, of
this chain and recorded on the file's day (a seal: on the day of the file it names); sequences
run 1, 2, 3, ... with ``prev_sha256`` the previous record's hash; record 1 is
``byok.trail.started`` naming the writer's role and signing key, which the trust file must list
with that role; every file but the last ends with a ``byok.trail.sealed`` record naming the
next; each record is in exactly one batch (``batch_start`` .. the signed record) whose ES256
signature, by the chain's key, verifies and is not recorded after the key's ``revoked_after``;
each event is one the role may write. With ``--expect-heads`` ({"chains": {id: {"sequence",
"record_sha256"}}}) each pinned record must be there. Prints one line per chain, OK or the first
bad sequence; exits 0 (all OK), 2 (something is broken) or 1 (bad input).

The trust file: {"signers": [{"kid", "spki_sha256", "role", "public_key_pem", ...}]}; this
script needs ``public_key_pem`` for every signer (for a Managed HSM key: ``az keyvault key
download --hsm-name HSM --name NAME --version VERSION --encoding PEM --file key.pem``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

GENESIS = "0" * 64
START, SEAL = "byok.trail.started", "byok.trail.sealed"
# Which events each writer role may write (besides START and SEAL).
ROLE_EVENTS = {
    "pipeline": {
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
    },
    "person": {
        "byok.kek.created",
        "byok.kek.downloaded",
        "byok.policy.changed",
        "byok.received",
        "byok.validated",
        "byok.importing",
        "byok.imported",
        "byok.verified",
        "byok.rejected",
        "byok.verification_failed",
        "byok.duplicate",
    },
}
NAME = re.compile(
    r"(trail/(\d{4})/(\d{2})/(\d{2})/([a-z]{1,16}-\d{8}T\d{6}Z-[0-9a-f]{12})/(\d{4})\.jsonl)$"
)


class Broken(Exception):
    """The first bad sequence of a chain."""

    def __init__(self, sequence: int, kind: str, detail: str) -> None:
        super().__init__(f"sequence {sequence}: {kind}: {detail}")
        self.sequence = sequence


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def utc(text: object) -> datetime | None:
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    offset = value.utcoffset()
    return value if offset is not None and not offset.total_seconds() else None


def spki_sha256(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_trust(path: Path) -> dict[str, dict[str, Any]]:
    """kid -> {"role", "key" (or None), "revoked_after" (or None)}.

    Raises:
        ValueError: a PEM that does not match its pinned SPKI SHA-256, or a bad entry.
    """
    out: dict[str, dict[str, Any]] = {}
    for entry in json.loads(path.read_text(encoding="utf-8"))["signers"]:
        key = None
        if entry.get("public_key_pem"):
            key = serialization.load_pem_public_key(entry["public_key_pem"].encode())
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                key.curve, ec.SECP256R1
            ):
                raise ValueError(f"{entry['kid']}: not an EC P-256 public key")
            if spki_sha256(key) != entry["spki_sha256"].lower():
                raise ValueError(f"{entry['kid']}: the PEM does not have the pinned SPKI SHA-256")
        revoked = entry.get("revoked_after")
        out[entry["kid"]] = {
            "spki": entry["spki_sha256"].lower(),
            "role": entry["role"],
            "key": key,
            "revoked_after": utc(revoked) if revoked else None,
        }
    return out


def printable(text: str) -> str:
    """Escape what a terminal would act on or cannot print (ESC, CR, lone surrogates): folder
    names and record fields are chosen by whoever wrote the files."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def verify_signature(key: ec.EllipticCurvePublicKey, digest_hex: str, value_b64: str) -> bool:
    import base64

    raw = base64.urlsafe_b64decode(value_b64 + "==")
    if len(raw) != 64:
        return False
    der = utils.encode_dss_signature(
        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    )
    try:
        key.verify(der, bytes.fromhex(digest_hex), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


class Chain:
    """One chain, walked in order; every check raises Broken at the first problem."""

    def __init__(self, chain: str, trust: dict[str, dict[str, Any]], foreign: dict[str, int]):
        self.chain, self.trust, self.foreign = chain, trust, foreign
        self.expect, self.prev, self.covered = 1, GENESIS, 0
        self.signer: dict[str, Any] | None = None
        self.kid: object = None
        self.role: object = None
        self.hashes: dict[int, str] = {}  # sequence -> record_sha256
        self.last: dict[str, Any] | None = None

    def walk(self, files: list[tuple[str, date, Path]]) -> dict[int, str]:
        for index, (name, day, path) in enumerate(files):
            sealed_before = True
            if index and self.last is not None:
                if self.last.get("event") == SEAL and self.last.get("next_blob") != name:
                    named = self.last.get("next_blob")
                    raise Broken(self.expect, "removed", f"the seal names {named}, not {name}")
                sealed_before = self.last.get("event") == SEAL
            sealed = False
            for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
                record = self.parse(raw, f"{name}:{number}")
                if record is None:
                    continue  # another chain's record
                seq = record["sequence"]
                self.check_day(record, day, f"{name}:{number}")
                if sealed:
                    raise Broken(seq, "inserted", f"{name}:{number}: after the seal")
                if not sealed_before and seq == self.expect:
                    raise Broken(seq, "inserted", f"{name}:{number}: the file before has no seal")
                sealed_before = True
                self.check_link(record, f"{name}:{number}")
                if "signature" in record:
                    self.check_batch(record, f"{name}:{number}")
                sealed = record.get("event") == SEAL
                self.hashes[seq] = record["record_sha256"]
                self.expect, self.prev, self.last = seq + 1, record["record_sha256"], record
        if self.covered + 1 < self.expect:
            raise Broken(self.covered + 1, "unsigned", "the last records are in no signed batch")
        return self.hashes

    def parse(self, raw: bytes, where: str) -> dict[str, Any] | None:
        try:
            record = json.loads(raw)
            seq = record["sequence"]
        except (ValueError, KeyError, TypeError):
            raise Broken(self.expect, "malformed", where) from None
        body = {k: v for k, v in record.items() if k not in ("record_sha256", "signature")}
        digest = hashlib.sha256(canonical(body)).hexdigest()
        if canonical(record) != raw or digest != record.get("record_sha256"):
            raise Broken(seq, "changed", where)
        if record.get("chain_id") != self.chain:
            other = str(record.get("chain_id"))
            self.foreign[other] = min(self.foreign.get(other, seq), seq)
            return None
        return dict(record)

    @staticmethod
    def check_day(record: dict[str, Any], day: date, where: str) -> None:
        recorded = utc(record.get("recorded"))
        named = NAME.fullmatch(str(record.get("next_blob")))
        if record.get("event") == SEAL and named is not None:  # written on the next file's day
            next_day = date(int(named[2]), int(named[3]), int(named[4]))
            day_ok = recorded is not None and recorded.date() == next_day >= day
        else:
            day_ok = recorded is not None and recorded.date() == day
        if not day_ok:
            raise Broken(record["sequence"], "moved", f"{where} recorded {record.get('recorded')}")

    def check_link(self, record: dict[str, Any], where: str) -> None:
        seq = record["sequence"]
        if seq > self.expect:  # missing here: removed, or stored later (reordered)
            raise Broken(self.expect, "removed", f"{where} holds sequence {seq}")
        if seq < self.expect:  # again: a copy, or stored out of order
            copy = self.hashes.get(seq) == record["record_sha256"]
            raise Broken(seq, "inserted" if copy else "reordered", f"{where}: sequence {seq}")
        if record.get("prev_sha256") != self.prev:
            raise Broken(seq, "inserted", f"{where}: prev_sha256 does not match")
        if seq == 1:
            if record.get("event") != START:
                raise Broken(1, "inserted", "the chain does not start with byok.trail.started")
            self.kid, self.role = record.get("signer_kid"), record.get("writer_role")
            self.signer = self.trust.get(str(self.kid))
            if self.signer is None or self.signer["key"] is None:
                raise Broken(
                    1, "unknown_signer", f"{self.kid} is not in the trust file (with a PEM)"
                )
            if self.signer["spki"] != record.get("signer_spki_sha256"):
                raise Broken(1, "unknown_signer", f"{self.kid}: not the key pinned")
            if self.signer["role"] != self.role or not self.chain.startswith(f"{self.role}-"):
                raise Broken(
                    1, "wrong_role", f"a {self.signer['role']} key writes a {self.role} chain"
                )
        elif str(record.get("event")) not in ROLE_EVENTS.get(str(self.role), set()) | {SEAL}:
            raise Broken(
                seq, "wrong_role", f"{where}: {record.get('event')} in a {self.role} chain"
            )

    def check_batch(self, record: dict[str, Any], where: str) -> None:
        seq, start = record["sequence"], record.get("batch_start")
        if not isinstance(start, int) or start > seq:
            raise Broken(seq, "malformed", f"{where}: batch_start {start}")
        if start > self.covered + 1:
            raise Broken(self.covered + 1, "unsigned", f"{where}: before it, records no one signed")
        if start <= self.covered:
            raise Broken(seq, "inserted", f"{where}: its batch overlaps the one before")
        sig = record["signature"]
        if sig.get("kid") != self.kid:
            other = self.trust.get(str(sig.get("kid")))
            kind = "unknown_signer" if other is None else "bad_signature"
            if other is not None and other["role"] != self.role:
                kind = "wrong_role"
            raise Broken(start, kind, f"{where} signed by {sig.get('kid')}")
        assert self.signer is not None  # noqa: S101  # record 1 set it, with this kid
        if not verify_signature(self.signer["key"], record["record_sha256"], str(sig.get("value"))):
            raise Broken(start, "bad_signature", where)
        revoked, recorded = self.signer["revoked_after"], utc(record.get("recorded"))
        if revoked is not None and (recorded is None or recorded > revoked):
            raise Broken(start, "revoked_signer", f"{where} recorded after {revoked}")
        self.covered = seq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the exported trail (both containers)")
    parser.add_argument("trust", type=Path, help="the trust file (signers with public_key_pem)")
    parser.add_argument("--expect-heads", type=Path, help="pinned heads (byok audit verify --json)")
    args = parser.parse_args(argv)
    try:
        trust = load_trust(args.trust)
        heads = (
            json.loads(args.expect_heads.read_text(encoding="utf-8"))["chains"]
            if args.expect_heads
            else {}
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(printable(f"cannot read the input: {exc}"), file=sys.stderr)
        return 1
    chains: dict[str, list[tuple[str, date, Path]]] = {}
    for path in sorted(args.folder.rglob("*.jsonl")):
        match = NAME.search(path.as_posix())
        if match:
            try:
                day = date(int(match[2]), int(match[3]), int(match[4]))
            except ValueError:  # not a date: not a trail file
                print(printable(f"ignored (not a day folder): {path}"), file=sys.stderr)
                continue
            chains.setdefault(match[5], []).append((match[1], day, path))
    first_bad: dict[str, tuple[int, str]] = {}
    foreign: dict[str, int] = {}
    for chain, files in sorted(chains.items()):
        files.sort(key=lambda f: (f[1], f[0]))
        walker = Chain(chain, trust, foreign)
        try:
            seen = walker.walk(files)
        except Broken as exc:
            first_bad[chain] = (exc.sequence, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001  # hostile bytes: a finding, never a crash
            seq = walker.expect
            first_bad[chain] = (seq, f"sequence {seq}: malformed: {type(exc).__name__}")
            continue
        pin = heads.get(chain)
        if pin is not None and seen.get(pin["sequence"]) != pin["record_sha256"]:
            last = max(seen, default=0)
            if last < pin["sequence"]:
                first_bad[chain] = (
                    last + 1,
                    f"sequence {last + 1}: truncated: pinned {pin['sequence']}",
                )
            else:
                first_bad[chain] = (
                    pin["sequence"],
                    f"sequence {pin['sequence']}: changed: not the pinned record",
                )
    for chain, seq in foreign.items():
        if seq < first_bad.get(chain, (seq + 1, ""))[0]:
            first_bad[chain] = (seq, f"sequence {seq}: moved: found in another chain's file")
    for chain in heads:
        if chain not in chains and chain not in first_bad:
            first_bad[chain] = (1, "sequence 1: missing_chain: no file of it")
    for chain in sorted(set(chains) | set(first_bad)):
        line = f"BROKEN {chain} {first_bad[chain][1]}" if chain in first_bad else f"OK {chain}"
        print(printable(line))
    print("BROKEN" if first_bad else "OK")
    return 2 if first_bad else 0


if __name__ == "__main__":
    sys.exit(main())
