"""Attacks on the stored trail, scripted against Azurite: each is reported with the exact chain,
kind and first bad sequence by ``TrailReader.verify``, and the standalone script gives the same
first bad sequence per chain on the exported blobs.

The honest trail (``test_verify.honest_world``), chain a: 1 start, day 1 [2-3] [4] [5-6], seal
[7]; day 2 [8-9] [10] [11-12], seal [13] (full blob); day 2 part 1 [14-16], seal [17]; day 3
[18-19] [20] [21-22]. Chain b: 1-6 on day 1 ([1-4] [5-6]), seal 7, 8-12 on day 2. Chain c
(the rotated key): [1-3] [4-6] on day 3. Chain d (alice, people's container): [1-2] [3] on day
1, seal 4, [5] on day 3."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from test_verify import (
    DAY2,
    DAY3,
    ChainWriter,
    Impostor,
    World,
    event,
    export_folder,
    file_signer,
    honest_world,
    kinds,
    new_containers,
    package_events,
    run_standalone,
    stamp,
    upload,
    verify_stored,
)

from byok_pipeline.audit.records import (
    TRAIL_FIELDS,
    Signer,
    build_batch,
    encode_line,
    seal_record,
)
from byok_pipeline.audit.verify import Trust, verify_blobs
from byok_pipeline.localdev.azurite import Azurite

LATE = DAY3 + timedelta(hours=6)


@pytest.fixture
def service(azurite: Azurite) -> Iterator[BlobServiceClient]:
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    yield client
    client.close()


@pytest.fixture
def containers(service: BlobServiceClient) -> tuple[str, str]:
    return new_containers(service)


@dataclass(frozen=True)
class Expected:
    chain: str
    kind: str
    sequence: int
    pinned: bool = False  # verified against the honest trail's heads


def _forged(w: ChainWriter, name: str = "byok.imported") -> dict[str, Any]:
    """A record after the chain's head with correct hashes, without a signature."""
    assert w.last is not None
    body = {
        **event(name, LATE, state="imported", key_name="payments", imported_kid="forged"),
        "chain_id": w.chain_id,
        "sequence": w.last["sequence"] + 1,
        "prev_sha256": w.last["record_sha256"],
        "recorded": stamp(LATE),
    }
    record = seal_record(body)
    w.trail.blobs[(w.container, w.blob)].append(encode_line(record))
    return record


def forged_append_unsigned_at_end(world: World) -> Expected:
    _forged(world.a)
    return Expected(world.a.chain_id, "unsigned", 23)


def forged_append_unsigned_then_real_batch(world: World) -> Expected:
    world.a.last = _forged(world.a)  # the real writer builds on top of it
    world.a.append(package_events("payments", 99, LATE)[:2], LATE + timedelta(seconds=1))
    return Expected(world.a.chain_id, "unsigned", 23)


def forged_append_signed_by_unknown_key(world: World) -> Expected:
    world.a.write(package_events("payments", 98, LATE)[3:], LATE, signer=file_signer())
    return Expected(world.a.chain_id, "unknown_signer", 23)


def forged_append_signed_by_another_chains_key(world: World) -> Expected:
    world.a.write(package_events("payments", 98, LATE)[3:], LATE, signer=world.p2)
    return Expected(world.a.chain_id, "bad_signature", 23)


def forged_append_signed_by_a_custodian_key(world: World) -> Expected:
    world.a.write(package_events("payments", 98, LATE)[3:], LATE, signer=world.alice)
    return Expected(world.a.chain_id, "wrong_role", 23)


def _rewrite(world: World, w: ChainWriter, start: int, signer: Signer) -> None:
    """Rewrite chain ``w`` from the batch starting at ``start``: contents changed, every hash
    recomputed, every batch signed again by ``signer``, each record where it was."""
    placed = [
        (where, i, r) for where, i, r in world.trail.lines_of(w.chain_id) if r["sequence"] >= start
    ]
    after: dict[str, Any] | None = world.trail.record(w.chain_id, start - 1)
    batch: list[tuple[tuple[str, str], int, dict[str, Any]]] = []
    for item in placed:
        batch.append(item)
        record = item[2]
        if "signature" not in record:
            continue
        events = [{k: v for k, v in r.items() if k not in TRAIL_FIELDS} for _, _, r in batch]
        for e in events:
            if e.get("key_name") == "payments":
                e["key_name"] = "payments-evil"
        rebuilt = build_batch(
            events, chain_id=w.chain_id, after=after, recorded=record["recorded"], signer=signer
        )
        for (where, i, _), new in zip(batch, rebuilt, strict=True):
            world.trail.blobs[where][i] = encode_line(new)
        after, batch = rebuilt[-1], []


def consistent_rewrite_signed_by_unknown_key(world: World) -> Expected:
    _rewrite(world, world.a, 10, file_signer())
    return Expected(world.a.chain_id, "unknown_signer", 10)


def consistent_rewrite_signed_under_the_real_kid(world: World) -> Expected:
    _rewrite(world, world.a, 10, Impostor(world.p1.kid))
    return Expected(world.a.chain_id, "bad_signature", 10)


def changed_record(world: World) -> Expected:
    where, i = world.trail.locate(world.a.chain_id, 11)
    line = world.trail.blobs[where][i]
    world.trail.blobs[where][i] = line.replace(b'"key_name":"payments"', b'"key_name":"payroll"')
    return Expected(world.a.chain_id, "changed", 11)


def removed_record(world: World) -> Expected:
    where, i = world.trail.locate(world.a.chain_id, 11)
    del world.trail.blobs[where][i]
    return Expected(world.a.chain_id, "removed", 11)


def removed_middle_blob(world: World) -> Expected:
    where, _ = world.trail.locate(world.a.chain_id, 14)
    assert where[1].endswith("/0001.jsonl")
    del world.trail.blobs[where]
    return Expected(world.a.chain_id, "removed", 14)


def reordered_records(world: World) -> Expected:
    where, i = world.trail.locate(world.a.chain_id, 14)
    lines = world.trail.blobs[where]
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return Expected(world.a.chain_id, "reordered", 14)


def replayed_copy(world: World) -> Expected:
    where, i = world.trail.locate(world.a.chain_id, 22)
    world.trail.blobs[where].append(world.trail.blobs[where][i])
    return Expected(world.a.chain_id, "inserted", 22)


def malformed_line(world: World) -> Expected:
    world.trail.blobs[(world.a.container, world.a.blob)].append(b'{"sequence": 23, "trunc\n')
    return Expected(world.a.chain_id, "malformed", 23)


def null_signature(world: World) -> Expected:
    """A record whose signature is present but null, without a batch start: malformed (it
    once passed the parse as unsigned, then stopped the verifier with a KeyError)."""
    assert world.a.last is not None
    body = {
        **event("byok.imported", LATE, state="imported", key_name="payments"),
        "chain_id": world.a.chain_id,
        "sequence": world.a.last["sequence"] + 1,
        "prev_sha256": world.a.last["record_sha256"],
        "recorded": stamp(LATE),
    }
    record = {**seal_record(body), "signature": None}
    world.trail.blobs[(world.a.container, world.a.blob)].append(encode_line(record))
    return Expected(world.a.chain_id, "malformed", 23)


def moved_to_the_day_before(world: World) -> Expected:
    """Day 3's first record put at the end of day 2 (after its seal)."""
    where, i = world.trail.locate(world.a.chain_id, 18)
    line = world.trail.blobs[where].pop(i)
    world.trail.blobs[world.trail.locate(world.a.chain_id, 17)[0]].append(line)
    return Expected(world.a.chain_id, "moved", 18)


def moved_to_the_day_after(world: World) -> Expected:
    """Day 1's last record before its seal put at the start of day 2."""
    where, i = world.trail.locate(world.a.chain_id, 6)
    line = world.trail.blobs[where].pop(i)
    world.trail.blobs[world.trail.locate(world.a.chain_id, 8)[0]].insert(0, line)
    return Expected(world.a.chain_id, "moved", 6)


def moved_to_another_chain(world: World) -> Expected:
    where, i = world.trail.locate(world.a.chain_id, 11)
    line = world.trail.blobs[where].pop(i)
    world.trail.blobs[(world.b.container, world.b.blob)].append(line)
    return Expected(world.a.chain_id, "moved", 11)


def truncated_tail(world: World) -> Expected:
    del world.trail.blobs[(world.b.container, world.b.blob)][-2:]  # its last batch, [11-12]
    return Expected(world.b.chain_id, "truncated", 11, pinned=True)


def truncated_to_its_seal(world: World) -> Expected:
    """Chain a's last blob deleted: a seal naming a blob that is not there ends it, cleanly."""
    del world.trail.blobs[(world.a.container, world.a.blob)]
    return Expected(world.a.chain_id, "truncated", 18, pinned=True)


def chain_removed(world: World) -> Expected:
    for where in world.trail.chain_blobs(world.b.chain_id):
        del world.trail.blobs[where]
    return Expected(world.b.chain_id, "missing_chain", 1, pinned=True)


def revoked_key_after_revocation(world: World) -> Expected:
    world.revoked[world.p2.kid] = stamp(DAY3 + timedelta(hours=1))
    return Expected(world.c.chain_id, "revoked_signer", 4)


def custodian_key_claims_pipeline(world: World) -> Expected:
    e = ChainWriter(world.trail, world.containers[0], "pipeline", world.alice, DAY2, "worker-9")
    e.append(package_events("payments", 50, DAY2)[:2], DAY2 + timedelta(minutes=40))
    return Expected(e.chain_id, "wrong_role", 1)


def chain_of_an_unknown_signer(world: World) -> Expected:
    e = ChainWriter(world.trail, world.containers[0], "pipeline", file_signer(), DAY2, "evil")
    e.append(package_events("payments", 51, DAY2)[:2], DAY2 + timedelta(minutes=41))
    return Expected(e.chain_id, "unknown_signer", 1)


def person_writes_a_pipeline_event(world: World) -> Expected:
    world.d.append([event("byok.awaiting_approval", LATE)], LATE)
    return Expected(world.d.chain_id, "wrong_role", 6)


ATTACKS: list[Callable[[World], Expected]] = [
    forged_append_unsigned_at_end,
    forged_append_unsigned_then_real_batch,
    forged_append_signed_by_unknown_key,
    forged_append_signed_by_another_chains_key,
    forged_append_signed_by_a_custodian_key,
    consistent_rewrite_signed_by_unknown_key,
    consistent_rewrite_signed_under_the_real_kid,
    changed_record,
    removed_record,
    removed_middle_blob,
    reordered_records,
    replayed_copy,
    malformed_line,
    null_signature,
    moved_to_the_day_before,
    moved_to_the_day_after,
    moved_to_another_chain,
    truncated_tail,
    truncated_to_its_seal,
    chain_removed,
    revoked_key_after_revocation,
    custodian_key_claims_pipeline,
    chain_of_an_unknown_signer,
    person_writes_a_pipeline_event,
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.__name__)
def test_attack_is_reported_with_its_first_bad_sequence(
    service: BlobServiceClient,
    containers: tuple[str, str],
    tmp_path: Path,
    attack: Callable[[World], Expected],
) -> None:
    world = honest_world(containers)
    honest, _ = verify_blobs(world.trail.as_blobs(), trust=world.trust())
    assert honest.ok, honest.breaks
    expected = attack(world)
    upload(service, world.trail)
    heads = honest.heads if expected.pinned else None
    report = verify_stored(service, world, heads=heads)
    assert (expected.chain, expected.kind, expected.sequence) in kinds(report), report.breaks
    assert report.first_bad() == {expected.chain: expected.sequence}, report.breaks
    assert not report.ok
    # the break names where the bad line is (a missing chain has no line)
    located = [b for b in report.breaks if b.kind == expected.kind]
    if expected.kind != "missing_chain":
        assert located[0].blob is not None
        assert located[0].blob.split("/", 1)[0] in containers
    # the standalone verifier agrees
    trust_file = world.write_trust(tmp_path / "trust.json")
    heads_file = None
    if heads is not None:
        heads_file = tmp_path / "heads.json"
        heads_file.write_text(json.dumps({"chains": heads}), encoding="utf-8")
    folder = export_folder(service, containers, tmp_path / "export")
    code, bad, out = run_standalone(folder, trust_file, heads_file)
    assert (code, bad) == (2, report.first_bad()), out


def test_truncation_is_invisible_without_pinned_heads(
    service: BlobServiceClient, containers: tuple[str, str]
) -> None:
    """What the signatures cannot show: a clean cut at a batch boundary. Pinned heads do."""
    world = honest_world(containers)
    truncated_tail(world)
    upload(service, world.trail)
    assert verify_stored(service, world).ok


def test_revoked_key_is_accepted_before_its_revocation(
    service: BlobServiceClient, containers: tuple[str, str], tmp_path: Path
) -> None:
    world = honest_world(containers)
    world.revoked[world.p2.kid] = stamp(DAY3 + timedelta(hours=3))  # after c's last batch
    upload(service, world.trail)
    report = verify_stored(service, world)
    assert report.ok, report.breaks
    folder = export_folder(service, containers, tmp_path / "export")
    code, bad, out = run_standalone(folder, world.write_trust(tmp_path / "trust.json"))
    assert (code, bad) == (0, {}), out


def test_signing_key_rotation_keeps_old_chains_valid(
    service: BlobServiceClient, containers: tuple[str, str]
) -> None:
    """Chains signed by the old version verify as long as its kid stays in the trust file; the
    old kid dropped from it makes them unknown."""
    world = honest_world(containers)
    upload(service, world.trail)
    doc = world.trust_doc()
    doc["signers"] = [s for s in doc["signers"] if s["kid"] != world.p1.kid]
    report = verify_stored(service, world, trust=Trust.from_dict(doc))
    assert kinds(report) == {
        (world.a.chain_id, "unknown_signer", 1),
        (world.b.chain_id, "unknown_signer", 1),
    }


def test_a_chain_in_the_other_roles_container_is_reported(
    service: BlobServiceClient, containers: tuple[str, str]
) -> None:
    """A person chain in the pipeline's container (custodians cannot write there; whoever
    could put it there is not its signer), and a chain whose id names another role."""
    world = honest_world(containers)
    e = ChainWriter(world.trail, containers[0], "person", world.alice, DAY2, "alice")
    e.append([event("byok.kek.downloaded", DAY2, kek_kid="k")], DAY2 + timedelta(minutes=5))
    upload(service, world.trail)
    report = verify_stored(service, world)
    assert kinds(report) == {(e.chain_id, "wrong_role", 1)}
    assert "is not a pipeline chain" in report.breaks[0].detail
