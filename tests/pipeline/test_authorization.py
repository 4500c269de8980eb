"""Import authorization through the real pipeline (Azurite + the emulator): the import policy,
protection of existing keys, and M-of-N signed approvals (dual control)."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_support import Package, Stack

from byok_pipeline.adapters import authorization_store
from byok_pipeline.cli.upload import manifest_json
from byok_pipeline.core.errors import InProgress, TransientError
from byok_pipeline.core.metadata import META_MANIFEST_SHA256
from byok_pipeline.processing import processor
from byok_pipeline.processing.authorize import check_existing
from byok_pipeline.processing.processor import Outcome
from offline_packager.approval import sign_approval, software_signer

pytestmark = pytest.mark.azurite


@pytest.fixture
def uid() -> str:
    """The emulator lives for the whole session: each test's key names are its own."""
    return secrets.token_hex(3)


APPROVERS = ("alice", "bob", "carol")


def _pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def approver_keys() -> dict[str, Any]:
    return {name: ec.generate_private_key(ec.SECP256R1()) for name in APPROVERS}


def _policy(keys: dict[str, Any], *rules: dict[str, Any], hours: int = 72) -> dict[str, Any]:
    return {
        "policy_version": 1,
        "approval_deadline_hours": hours,
        "approver_groups": {
            "custodians": {
                "approvers": [{"id": n, "public_key_pem": _pem(k)} for n, k in keys.items()]
            }
        },
        "rules": list(rules),
    }


def _set_policy(stack: Stack, doc: dict[str, Any] | bytes) -> None:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    stack.deps.authorization.put_policy(data)


def _drop_with_manifest(stack: Stack, pkg: Package) -> bytes:
    """What `byok upload` does: the package with its options, and the manifest's bytes."""
    manifest = manifest_json(pkg.manifest)
    sha = hashlib.sha256(pkg.data).hexdigest()
    meta = pkg.options.to_metadata()
    meta[META_MANIFEST_SHA256] = hashlib.sha256(manifest).hexdigest()
    stack.deps.authorization.put_attachment(sha, "manifest.json", manifest)
    stack.drop(pkg.name, pkg.data, meta)
    return manifest


def _approve(
    stack: Stack,
    pkg: Package,
    manifest: bytes,
    who: str,
    key: Any,
    *,
    key_name: str | None = None,
    not_after: datetime | None = None,
    store: bool = True,
) -> bytes:
    now = datetime.now(UTC)
    approval = sign_approval(
        manifest=manifest,
        approver_id=who,
        key_name=key_name or pkg.name.removesuffix(".byok"),
        not_after=not_after or now + timedelta(days=1),
        signer=software_signer(key),
        now=now,
    )
    if store:
        _store_approval(stack, pkg, f"approval-{who}.json", approval)
    return approval


def _store_approval(stack: Stack, pkg: Package, leaf: str, data: bytes) -> None:
    sha = hashlib.sha256(pkg.data).hexdigest()
    stack.deps.authorization.put_attachment(sha, leaf, data)


def _deliver(stack: Stack, name: str) -> Outcome:
    for _ in range(10):
        try:
            return stack.deliver(name)
        except TransientError:
            continue
    raise AssertionError("never settled")


def _versions(stack: Stack, name: str) -> int:
    return len(list(stack.hsm.key_client().list_properties_of_key_versions(name)))


# -- safe defaults, no policy ------------------------------------------------------------------


def test_a_key_the_pipeline_did_not_create_is_protected(stack: Stack, uid: str) -> None:
    client = stack.hsm.key_client()
    client.create_ec_key(f"prod-signing-{uid}", curve="P-256", hardware_protected=True)
    pkg = stack.package("ec-p256", f"prod-signing-{uid}")
    stack.drop_package(pkg)
    outcome = _deliver(stack, pkg.name)
    assert outcome.doc is not None
    assert (outcome.state, outcome.reason_code) == ("rejected", "existing_key_protected")
    assert _versions(stack, f"prod-signing-{uid}") == 1
    assert outcome.doc.policy_sha256 is None


def test_a_package_never_becomes_a_version_of_a_kek(stack: Stack, uid: str) -> None:
    """Named after the configured KEK: key_name_not_allowed before any HSM call; named after
    another import-only key: existing_key_protected."""
    stack.deps.settings = replace(stack.settings, kek_kid=stack.kek_kid)
    kek_name = stack.kek_kid.split("/")[-2]
    pkg = stack.package("oct-256", kek_name)
    stack.drop_package(pkg)
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "key_name_not_allowed")

    other = stack.hsm.key_client().create_rsa_key(
        f"other-kek-{uid}", size=2048, key_operations=["import"], hardware_protected=True
    )
    pkg2 = stack.package("oct-256", f"other-kek-{uid}")
    stack.drop_package(pkg2)
    outcome2 = _deliver(stack, pkg2.name)
    assert (outcome2.state, outcome2.reason_code) == ("rejected", "existing_key_protected")
    assert _versions(stack, f"other-kek-{uid}") == 1
    assert str(other.id).split("/")[-1] in stack.hsm.key_client().get_key(f"other-kek-{uid}").id


def test_without_a_policy_a_pipeline_key_may_rotate(stack: Stack, uid: str) -> None:
    first = stack.package("oct-256", f"rot-default-{uid}")
    stack.drop_package(first)
    assert _deliver(stack, first.name).state == "imported"
    second = stack.package("oct-256", f"rot-default-{uid}")
    stack.drop_package(second)
    assert _deliver(stack, second.name).state == "imported"
    assert _versions(stack, f"rot-default-{uid}") == 2


# -- the policy --------------------------------------------------------------------------------


def test_names_and_types_follow_the_policy(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(
        stack,
        _policy(approver_keys, {"prefix": f"app{uid}-", "target_types": ["oct-256"]}),
    )
    unknown = stack.package("oct-256", f"random-name-{uid}")
    stack.drop_package(unknown)
    outcome = _deliver(stack, unknown.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "key_name_not_allowed")
    assert outcome.doc is not None
    assert outcome.doc.policy_sha256 is not None

    wrong_type = stack.package("ec-p256", f"app{uid}-ec")
    stack.drop_package(wrong_type)
    outcome = _deliver(stack, wrong_type.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "target_type_not_allowed_for_name")

    # the type inferred from the length (no metadata) is checked too, after the KEK checks
    inferred = stack.package("oct-128", f"app{uid}-infer")
    stack.drop_package(inferred, with_manifest=False)
    outcome = _deliver(stack, inferred.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "target_type_not_allowed_for_name")

    ok = stack.package("oct-256", f"app{uid}-ok")
    stack.drop_package(ok)
    outcome = _deliver(stack, ok.name)
    assert outcome.state == "imported"
    policy_sha = outcome.doc.policy_sha256 if outcome.doc else None
    events = [e for e in stack.audit.events if e.get("key_name") == f"app{uid}-ok"]
    assert events
    assert {e["policy_sha256"] for e in events} == {policy_sha}

    # a policy without allow_new_version protects even the pipeline's own keys
    again = stack.package("oct-256", f"app{uid}-ok")
    stack.drop_package(again)
    outcome = _deliver(stack, again.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "existing_key_protected")
    assert _versions(stack, f"app{uid}-ok") == 1


@pytest.mark.parametrize("lie", [False, True], ids=["true-check-value", "another-keys"])
def test_an_approved_check_value_the_hsm_cannot_compute_is_refused(
    stack: Stack, uid: str, approver_keys: dict[str, Any], *, lie: bool
) -> None:
    """Approvers sign that the package holds the AES key with this check value; a wrap-only
    key's check value cannot be computed in the HSM (no encrypt), so it would be imported
    enabled and `unverified` even when the manifest names another key's (review finding)."""
    _set_policy(
        stack,
        _policy(
            approver_keys,
            {"prefix": f"wrap{uid}-", "approvals": {"group": "custodians", "required": 2}},
        ),
    )
    pkg = stack.package("oct-256", f"wrap{uid}-k", key_ops=("wrapKey", "unwrapKey"))
    if lie:
        other = stack.package("oct-256", f"other{uid}", key_ops=("wrapKey", "unwrapKey"))
        pkg.manifest["target"]["fingerprint"] = other.manifest["target"]["fingerprint"]
    manifest = _drop_with_manifest(stack, pkg)
    for who in ("alice", "bob"):
        _approve(stack, pkg, manifest, who, approver_keys[who])
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "fingerprint_unverifiable")
    assert outcome.doc is not None
    assert outcome.doc.message is not None
    assert "encrypt" in outcome.doc.message
    assert f"wrap{uid}-k" not in {k.name for k in stack.hsm.key_client().list_properties_of_keys()}


def _during_first_check(monkeypatch: pytest.MonkeyPatch, during: Callable[[], None]) -> None:
    """Run ``during`` once, right after the first existing-key check of the test: that record
    holds its key name and is about to import. ``_undo_check`` puts the real check back."""
    ran: list[bool] = []

    def hooked(*args: Any, **kwargs: Any) -> Any:
        checked = check_existing(*args, **kwargs)
        if not ran:
            ran.append(True)
            during()
        return checked

    monkeypatch.setattr(processor, "check_existing", hooked)


def _undo_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processor, "check_existing", check_existing)


def test_two_packages_for_one_protected_name_import_one_at_a_time(
    stack: Stack, uid: str, approver_keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two different packages for one new key name (in two cases: Managed HSM's names are
    case-insensitive) under a rule that allows no new version: the second may not run its
    existing-key check while the first may still import (review finding: both saw no key,
    both imported, the second as a new version of a protected key)."""
    _set_policy(stack, _policy(approver_keys, {"prefix": f"race{uid}-"}))
    first = stack.package("oct-256", f"race{uid}-k")
    second = stack.package("oct-256", f"RACE{uid}-K")
    stack.drop_package(first)
    stack.drop_package(second)
    inner: list[BaseException | Outcome] = []

    def second_comes() -> None:
        try:
            inner.append(stack.deliver(second.name))
        except (InProgress, TransientError) as exc:
            inner.append(exc)

    _during_first_check(monkeypatch, second_comes)
    assert _deliver(stack, first.name).state == "imported"
    (waited,) = inner
    assert isinstance(waited, InProgress), waited
    assert "is being imported" in str(waited)
    _undo_check(monkeypatch)
    waiting = stack.deps.store.status_by_name(second.name)
    assert waiting is not None
    assert (waiting.state, waiting.attempts) == ("received", 0)  # waiting is not an attempt
    outcome = _deliver(stack, second.name)  # the first has finished: the claim passes on
    assert (outcome.state, outcome.reason_code) == ("rejected", "existing_key_protected")
    assert _versions(stack, f"race{uid}-k") == 1


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (b"{not json", "not strict JSON"),
        (b'{"policy_version": 1, "rules": [{"name": "x", "bogus": 1}]}', "rules[0]"),
        (b'{"policy_version": 1, "rules": [{"name": "x", "target_types": ["rsa-1024"]}]}',
         "rules[0].target_types[0]"),
        (
            (
                b'{"policy_version": 1, "rules": [{"name": "x", "approvals": {"group": "nobody", '
                b'"required": 1}}]}'
            ),
            "rules[0].approvals.group",
        ),
    ],
)  # fmt: skip
def test_an_invalid_policy_stops_every_import(
    stack: Stack, uid: str, policy: bytes, field: str
) -> None:
    _set_policy(stack, policy)
    pkg = stack.package("oct-256", f"x-{uid}")
    stack.drop_package(pkg)
    outcome = _deliver(stack, pkg.name)
    assert outcome.doc is not None
    assert (outcome.state, outcome.reason_code) == ("rejected", "policy_invalid")
    assert field in (outcome.doc.message or "")
    with pytest.raises(Exception, match=r"KeyNotFound|not found"):
        stack.hsm.key_client().get_key(f"x-{uid}")


def test_the_policy_change_applies_to_the_next_package(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    """The ETag cache never serves a replaced policy."""
    _set_policy(stack, _policy(approver_keys, {"name": f"first-{uid}"}))
    pkg = stack.package("oct-256", f"second-{uid}")
    stack.drop_package(pkg)
    assert _deliver(stack, pkg.name).reason_code == "key_name_not_allowed"
    _set_policy(stack, _policy(approver_keys, {"name": f"first-{uid}"}, {"name": f"third-{uid}"}))
    pkg3 = stack.package("oct-256", f"third-{uid}")
    stack.drop_package(pkg3)
    assert _deliver(stack, pkg3.name).state == "imported"


# -- approvals ---------------------------------------------------------------------------------


def _two_of_three(keys: dict[str, Any], uid: str, **extra: Any) -> dict[str, Any]:
    rule = {"name": f"pay-key-{uid}", "approvals": {"group": "custodians", "required": 2}, **extra}
    return _policy(keys, rule)


def test_two_of_three_waits_then_imports(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    _approve(stack, pkg, manifest, "alice", approver_keys["alice"])

    waiting = _deliver(stack, pkg.name)
    assert waiting.state == "awaiting_approval"
    doc = waiting.doc
    assert doc is not None
    assert doc.attempts == 0  # waiting for people is not an attempt
    assert doc.approvals is not None
    assert doc.approvals["missing"] == 1
    assert [g["approver_id"] for g in doc.approvals["given"]] == ["alice"]
    assert doc.approvals["waiting_for"] == ["bob", "carol"]
    assert doc.approval_deadline
    assert stack.blobs(stack.settings.incoming_container) == [pkg.name]
    with pytest.raises(Exception, match=r"KeyNotFound|not found"):
        stack.hsm.key_client().get_key(f"pay-key-{uid}")
    # a redelivery while still short changes nothing and audits nothing new
    assert _deliver(stack, pkg.name).state == "awaiting_approval"
    assert [e["event"] for e in stack.audit.events if e.get("key_name") == f"pay-key-{uid}"].count(
        "byok.awaiting_approval"
    ) == 1

    _approve(stack, pkg, manifest, "carol", approver_keys["carol"])
    done = _deliver(stack, pkg.name)
    assert done.state == "imported"
    assert done.doc is not None
    assert done.doc.fingerprint_result == "match"
    assert _versions(stack, f"pay-key-{uid}") == 1
    imported = [e for e in stack.audit.events if e["event"] == "byok.imported"]
    assert [sorted(a["id"] for a in e["approvers"]) for e in imported] == [["alice", "carol"]]
    spki = {a["spki_sha256"] for e in imported for a in e["approvers"]}
    assert len(spki) == 2
    # every event and status document (awaiting_approval and approvals included) fits its schema
    import jsonschema
    from testsupport import REPO

    schemas = REPO / "byok_pipeline" / "schemas"
    event_schema = json.loads((schemas / "audit-event.schema.json").read_text())
    for event in stack.audit.events:
        jsonschema.validate(event, event_schema)
    status_schema = json.loads((schemas / "status.schema.json").read_text())
    for status in stack.status_docs():
        jsonschema.validate(status, status_schema)
    # no signature, no manifest bytes in any event
    text = json.dumps(stack.audit.events)
    assert (
        json.loads(_approve(stack, pkg, manifest, "bob", approver_keys["bob"], store=False))[
            "signature"
        ]
        not in text
    )


def test_junk_approval_files_hide_no_approval_and_their_reads_are_bounded(
    stack: Stack, uid: str, approver_keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may write the approvals container can add files that sort before the real
    approvals: each file read is checked (the tally once stopped at 64 by name, so 64 junk files
    hid both approvals), and the reads stop at MAX_APPROVAL_FILES, the rest named in the status
    as not read."""
    monkeypatch.setattr(authorization_store, "MAX_APPROVAL_FILES", 80)  # the bound, kept small here
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    for i in range(70):  # sort before approval-alice.json / approval-bob.json
        _store_approval(stack, pkg, f"approval-0{i:03d}.json", b"junk")
    _approve(stack, pkg, manifest, "alice", approver_keys["alice"])
    _approve(stack, pkg, manifest, "bob", approver_keys["bob"])
    outcome = _deliver(stack, pkg.name)
    assert outcome.state == "imported"
    assert outcome.doc is not None
    assert outcome.doc.approvals is not None
    assert sorted(a["approver_id"] for a in outcome.doc.approvals["given"]) == ["alice", "bob"]

    other = stack.package("ec-p256", f"pay-key-{uid}x")  # no rule: not the point, just a sha
    for i in range(90):
        _store_approval(stack, other, f"approval-0{i:03d}.json", b"junk")
    found = stack.deps.authorization.attachments(hashlib.sha256(other.data).hexdigest())
    assert (len(found.approvals), found.unread) == (80, 10)


def test_an_idle_owner_of_a_key_name_does_not_block_it(
    stack: Stack, uid: str, approver_keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package that claimed its key name and then failed a try, whose drop was withdrawn and
    replaced by a corrected one: the new package takes the claim (no worker holds the first
    record and no PUT of it can land) instead of waiting forever (review finding). The first,
    coming back, meets the new key and is refused."""
    _set_policy(stack, _policy(approver_keys, {"prefix": f"idle{uid}-"}))
    first = stack.package("oct-256", f"idle{uid}-k")
    stack.drop_package(first)

    def hsm_down(*args: Any, **kwargs: Any) -> Any:
        raise TransientError("the HSM is unreachable", reason="transient")

    monkeypatch.setattr(processor, "check_existing", hsm_down)
    with pytest.raises(TransientError):
        stack.deliver(first.name)  # claimed the name, then failed: received, idle
    _undo_check(monkeypatch)
    held = stack.deps.store.status_by_name(first.name)
    assert held is not None
    assert held.state == "received"
    first_bytes = (
        stack.service.get_blob_client(stack.settings.incoming_container, first.name)
        .download_blob()
        .readall()
    )
    stack.service.get_blob_client(stack.settings.incoming_container, first.name).delete_blob()

    corrected = stack.package("oct-256", f"idle{uid}-k")  # the same name, other bytes
    stack.drop_package(corrected)
    outcome = _deliver(stack, corrected.name)
    assert outcome.state == "imported"
    assert _versions(stack, f"idle{uid}-k") == 1

    # the first drop comes back (uploaded again): its record claims again, meets the key
    stack.drop(first.name, first_bytes, first.options.to_metadata())
    again = _deliver(stack, first.name)
    assert (again.state, again.reason_code) == ("rejected", "existing_key_protected")
    assert _versions(stack, f"idle{uid}-k") == 1


def test_an_owner_whose_lease_ran_out_sends_no_put_once_its_name_passed_on(
    stack: Stack, uid: str, approver_keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner of a key name pauses past its lease after its existing-key check (a stalled
    worker, a slow HSM read); another record finds it idle and imports. The owner, resuming,
    must not renew its lease and import on its old check (review finding: it did, two
    versions): the other record leased its status as a fence before taking the name."""
    settings = replace(stack.deps.settings, lease_seconds=15)  # Azure's shortest lease
    stack.deps.settings = stack.deps.store.settings = settings
    stack.deps.hsm.settings = replace(stack.deps.hsm.settings, lease_seconds=15)
    _set_policy(stack, _policy(approver_keys, {"prefix": f"exp{uid}-"}))
    first = stack.package("oct-256", f"exp{uid}-k")
    second = stack.package("oct-256", f"EXP{uid}-K")
    stack.drop_package(first)
    stack.drop_package(second)
    inner: list[str] = []

    def stalls() -> None:
        inner.append("stalled")
        time.sleep(16)  # the first's lease runs out
        inner.append(_deliver(stack, second.name).state)

    _during_first_check(monkeypatch, stalls)
    with pytest.raises(InProgress):  # its lease is gone: it stops before any PUT
        stack.deliver(first.name)
    _undo_check(monkeypatch)
    assert inner == ["stalled", "imported"]
    assert _versions(stack, f"exp{uid}-k") == 1
    again = _deliver(stack, first.name)
    assert (again.state, again.reason_code) == ("rejected", "existing_key_protected")
    assert _versions(stack, f"exp{uid}-k") == 1


def test_a_waiting_package_says_what_it_waits_for(
    stack: Stack, uid: str, approver_keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the owner of its key name is at work, `byok status` of the other package names
    the one it waits for; waiting is not an attempt."""
    _set_policy(stack, _policy(approver_keys, {"prefix": f"says{uid}-"}))
    first = stack.package("oct-256", f"says{uid}-k")
    second = stack.package("oct-256", f"SAYS{uid}-K")
    stack.drop_package(first)
    stack.drop_package(second)
    seen: list[Any] = []

    def second_comes() -> None:
        with pytest.raises(InProgress):
            stack.deliver(second.name)
        seen.append(stack.deps.store.status_by_name(second.name))

    _during_first_check(monkeypatch, second_comes)
    assert _deliver(stack, first.name).state == "imported"
    (waiting,) = seen
    assert waiting is not None
    assert waiting.attempts == 0
    assert first.name in (waiting.last_error or "")


def test_an_approval_by_the_same_approver_counts_once(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    _approve(stack, pkg, manifest, "alice", approver_keys["alice"])
    again = _approve(stack, pkg, manifest, "alice", approver_keys["alice"], store=False)
    _store_approval(stack, pkg, "approval-alice-2.json", again)
    outcome = _deliver(stack, pkg.name)
    assert outcome.state == "awaiting_approval"
    assert outcome.doc is not None
    assert outcome.doc.approvals is not None
    assert outcome.doc.approvals["missing"] == 1


def test_without_its_manifest_a_package_needing_approvals_is_refused(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    stack.drop_package(pkg)  # options as metadata, but no manifest stored
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "approval_invalid")


def test_the_signed_manifest_decides_not_the_upload_metadata(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    """An uploader who rewrites the metadata (key ops, type) after the approvals cannot change
    what is imported: the options come from the manifest the approvers signed."""
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    stack.deps.store.service.get_blob_client(
        stack.settings.incoming_container, pkg.name
    ).set_blob_metadata(
        {**pkg.options.to_metadata(), "byok_key_ops": "verify",
         META_MANIFEST_SHA256: hashlib.sha256(manifest).hexdigest()}
    )  # fmt: skip
    for who in ("alice", "bob"):
        _approve(stack, pkg, manifest, who, approver_keys[who])
    outcome = _deliver(stack, pkg.name)
    assert outcome.state == "imported", outcome.doc.message if outcome.doc else None
    key = stack.hsm.key_client().get_key(f"pay-key-{uid}")
    assert sorted(str(o) for o in key.key_operations or []) == sorted(
        pkg.manifest["target"]["key_ops"]
    )


def test_the_approval_deadline_rejects_a_package_still_short(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid, allow_new_version=False))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    _approve(stack, pkg, manifest, "alice", approver_keys["alice"])
    assert _deliver(stack, pkg.name).state == "awaiting_approval"
    later = datetime.now(UTC) + timedelta(hours=73)
    stack.deps.clock = lambda: later
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "approval_expired")
    assert stack.blobs(stack.settings.incoming_container) == []


def test_rotation_allowed_by_policy_imports_a_new_version_with_its_approvals(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid, allow_new_version=True))
    for round_ in range(2):
        pkg = stack.package("ec-p256", f"pay-key-{uid}")
        manifest = _drop_with_manifest(stack, pkg)
        signers = ("alice", "bob") if round_ == 0 else ("bob", "carol")
        for who in signers:
            _approve(stack, pkg, manifest, who, approver_keys[who])
        assert _deliver(stack, pkg.name).state == "imported"
    assert _versions(stack, f"pay-key-{uid}") == 2
    imported = [e for e in stack.audit.events if e["event"] == "byok.imported"]
    assert [sorted(a["id"] for a in e["approvers"]) for e in imported] == [
        ["alice", "bob"],
        ["bob", "carol"],
    ]


def _forgeries(
    stack: Stack, pkg: Package, manifest: bytes, keys: dict[str, Any], uid: str
) -> dict[str, tuple[bytes, str]]:
    """Crafted bad approvals: file content and the reason each must be refused with."""
    good = _approve(stack, pkg, manifest, "bob", keys["bob"], store=False)
    doc = json.loads(good)
    flipped = bytearray(good)
    flipped[good.index(b'"signature":"') + 20] ^= 0x01
    other_pkg = stack.package("ec-p256", f"pay-key-{uid}")
    other_manifest = manifest_json(other_pkg.manifest)
    mallory = ec.generate_private_key(ec.SECP256R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    return {
        "flipped": (bytes(flipped), "approval_invalid"),
        "other-package": (
            _approve(stack, other_pkg, other_manifest, "bob", keys["bob"], store=False),
            "approval_wrong_package",
        ),
        "other-key-name": (
            _approve(
                stack, pkg, manifest, "bob", keys["bob"], key_name=f"pay-other-{uid}", store=False
            ),
            "approval_wrong_package",
        ),
        "expired": (
            sign_approval(
                manifest=manifest,
                approver_id="bob",
                key_name=f"pay-key-{uid}",
                not_after=now - timedelta(hours=1),
                signer=software_signer(keys["bob"]),
                now=now - timedelta(days=1),
            ),
            "approval_expired",
        ),
        "unknown": (
            _approve(stack, pkg, manifest, "mallory", mallory, store=False),
            "approval_unknown_approver",
        ),
        "impostor": (  # claims to be bob, signed by mallory's key
            _approve(stack, pkg, manifest, "bob", mallory, store=False),
            "approval_invalid",
        ),
        "wrong-alg": (
            _approve(stack, pkg, manifest, "bob", ed, store=False),
            "approval_invalid",
        ),
        "truncated": (good[: len(good) // 2], "approval_invalid"),
        "oversized": (good[:-2] + b" " * 20_000 + b"}\n", "approval_invalid"),
        "payload-attached": (
            json.dumps({**doc, "payload": "e30"}).encode(),
            "approval_invalid",
        ),
    }


def test_forged_and_mutated_approvals_never_count(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    _approve(stack, pkg, manifest, "alice", approver_keys["alice"])
    forged = _forgeries(stack, pkg, manifest, approver_keys, uid)
    for label, (data, _) in forged.items():
        _store_approval(stack, pkg, f"approval-{label}.json", data)
    outcome = _deliver(stack, pkg.name)
    assert outcome.doc is not None
    assert outcome.doc.approvals is not None
    assert outcome.state == "awaiting_approval", outcome.doc.approvals
    refused = {r["file"]: r["reason"] for r in outcome.doc.approvals["refused"]}
    assert refused == {f"approval-{label}.json": reason for label, (_, reason) in forged.items()}
    assert outcome.doc.approvals["missing"] == 1
    with pytest.raises(Exception, match=r"KeyNotFound|not found"):
        stack.hsm.key_client().get_key(f"pay-key-{uid}")
    # the deadline then names what was refused
    later = datetime.now(UTC) + timedelta(hours=73)
    stack.deps.clock = lambda: later
    final = _deliver(stack, pkg.name)
    assert (final.state, final.reason_code) == ("rejected", "approval_expired")
    assert final.doc is not None
    message = final.doc.message or ""
    assert "approval_invalid (approval-flipped.json" in message
    assert "approval_unknown_approver (approval-unknown.json)" in message


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_mutations_of_an_approval_never_count_nor_crash(
    stack: Stack, uid: str, approver_keys: dict[str, Any], data: st.DataObject
) -> None:
    """Bytes of a valid approval mutated at random: the tally refuses them with a typed reason
    and never raises; only the unmutated file counts."""
    from byok_pipeline.core.approvals import tally
    from byok_pipeline.core.policy import ApprovalRequirement, load_policy

    policy = load_policy(json.dumps(_two_of_three(approver_keys, uid)).encode())
    pkg = _cached_package(stack, uid)
    manifest = manifest_json(pkg.manifest)
    good = _approve(stack, pkg, manifest, "bob", approver_keys["bob"], store=False)
    mutated = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if kind == "flip" and mutated:
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del mutated[pos : pos + data.draw(st.integers(1, 40))]
        else:
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
    if bytes(mutated) == good:
        return
    result = tally(
        ApprovalRequirement("custodians", 2),
        policy.groups["custodians"],
        [("approval-x.json", bytes(mutated))],
        manifest=manifest,
        key_name=f"pay-key-{uid}",
        package_sha256=hashlib.sha256(pkg.data).hexdigest(),
        now=datetime.now(UTC),
    )
    if result.given:  # a mutation that keeps the signature valid must keep the same claims
        assert json.loads(bytes(mutated))["signature"] == json.loads(good)["signature"]
    else:
        assert result.refused[0].reason.startswith("approval_")


_CACHE: dict[str, Package] = {}


def _cached_package(stack: Stack, uid: str) -> Package:
    if "pkg" not in _CACHE:
        _CACHE["pkg"] = stack.package("ec-p256", f"pay-key-{uid}")
    return _CACHE["pkg"]


def test_two_approvals_arriving_at_once_import_exactly_once(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    """Both approvals land together and each triggers a delivery (the approvals container's
    events), concurrently: one import, one imported record."""
    from byok_pipeline.processing import runtime

    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("oct-256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    assert _deliver(stack, pkg.name).state == "awaiting_approval"
    for who in ("alice", "bob"):
        _approve(stack, pkg, manifest, who, approver_keys[who])
    sha = hashlib.sha256(pkg.data).hexdigest()
    runtime.set_deps_factory(lambda: stack.deps)
    results: list[str] = []
    errors: list[BaseException] = []

    def arrive(who: str) -> None:
        for _ in range(30):
            try:
                outcome = runtime.handle_approval(f"{sha}/approval-{who}.json")
            except Exception as exc:  # noqa: BLE001  # InProgress/transient: the platform redelivers
                errors.append(exc)
                continue
            results.append(outcome.state if outcome else "nothing")
            return
        results.append("gave up")

    try:
        threads = [threading.Thread(target=arrive, args=(w,)) for w in ("alice", "bob")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        runtime.set_deps_factory(None)
    assert "gave up" not in results
    assert "imported" in results
    assert _versions(stack, f"pay-key-{uid}") == 1
    imported = [e for e in stack.audit.events if e["event"] == "byok.imported"]
    assert len(imported) == 1
    assert all(type(e).__name__ in ("InProgress", "StatusConflict") for e in errors)


# -- review regressions ------------------------------------------------------------------------


def _once(stage_wanted: str) -> Any:
    """A fault hook that fails the named stage once, as a transient error."""
    fired: list[str] = []

    def hook(stage: str) -> None:
        if stage == stage_wanted and not fired:
            fired.append(stage)
            raise TransientError(f"injected at {stage}")

    return hook


def test_a_case_variant_of_a_guarded_name_needs_its_approvals(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    """Key names are case-insensitive in Managed HSM: PAY-KEY is pay-key, and its rule (2 of 3)
    applies, not a looser prefix rule."""
    doc = _two_of_three(approver_keys, uid, allow_new_version=True)
    doc["rules"].append({"prefix": "pay-", "allow_new_version": True})
    _set_policy(stack, doc)
    pkg = stack.package("oct-256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    for who in ("alice", "bob"):
        _approve(stack, pkg, manifest, who, approver_keys[who])
    assert _deliver(stack, pkg.name).state == "imported"
    rogue = stack.package("oct-256", f"PAY-KEY-{uid}")
    _drop_with_manifest(stack, rogue)
    assert _deliver(stack, rogue.name).state == "awaiting_approval"
    assert _versions(stack, f"pay-key-{uid}") == 1


def test_a_resumed_import_verifies_against_the_signed_fingerprint(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    """The manifest the approvers signed says fingerprint F; the upload metadata carries the
    wrapped key's real one. Verified after a transient failure past the import, the package is
    still checked against F: verification_failed, the version disabled."""
    from byok_pipeline.core.metadata import META_FINGERPRINT

    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("ec-p256", f"pay-key-{uid}")
    real = pkg.manifest["target"]["fingerprint"]["value"]
    pkg.manifest["target"]["fingerprint"]["value"] = "ab" * 32  # what the approvers signed
    manifest = _drop_with_manifest(stack, pkg)
    client = stack.deps.store.service.get_blob_client(stack.settings.incoming_container, pkg.name)
    meta = dict(client.get_blob_properties().metadata or {})
    meta[META_FINGERPRINT] = f"spki-sha256:{real}"
    client.set_blob_metadata(meta)
    for who in ("alice", "bob"):
        _approve(stack, pkg, manifest, who, approver_keys[who])
    stack.deps.fault = _once("after_import")
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("verification_failed", "fingerprint_mismatch")
    key = stack.hsm.key_client().get_key(f"pay-key-{uid}")
    assert key.properties.enabled is False


def test_approvals_short_after_validation_end_rejected_not_stuck(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("oct-256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    for who in ("alice", "bob"):
        _approve(stack, pkg, manifest, who, approver_keys[who])
    stack.deps.fault = _once("before_import")
    with pytest.raises(TransientError):
        stack.deliver(pkg.name)
    raised = _two_of_three(approver_keys, uid)
    raised["rules"][0]["approvals"]["required"] = 3
    _set_policy(stack, raised)
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "approval_expired")
    with pytest.raises(Exception, match=r"KeyNotFound|not found"):
        stack.hsm.key_client().get_key(f"pay-key-{uid}")


def test_empty_blobs_are_refusals_not_failures(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("oct-256", f"pay-key-{uid}")
    manifest = _drop_with_manifest(stack, pkg)
    _store_approval(stack, pkg, "approval-empty.json", b"")
    for who in ("alice", "bob"):
        _approve(stack, pkg, manifest, who, approver_keys[who])
    outcome = _deliver(stack, pkg.name)
    assert outcome.state == "imported"
    assert outcome.doc is not None
    assert outcome.doc.approvals is not None
    assert [r["reason"] for r in outcome.doc.approvals["refused"]] == ["approval_invalid"]
    _set_policy(stack, b"")
    other = stack.package("oct-256", f"x-{uid}")
    stack.drop_package(other)
    assert _deliver(stack, other.name).reason_code == "policy_invalid"


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["target"].update(fingerprint="x"),
        lambda m: m["target"].update(fingerprint=["a"]),
        lambda m: m["target"].update(key_ops=[1, 2]),
        lambda m: m.update(package=[]),
    ],
)
def test_a_hostile_signed_manifest_is_a_typed_refusal(
    stack: Stack, uid: str, approver_keys: dict[str, Any], edit: Any
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("oct-256", f"pay-key-{uid}")
    edit(pkg.manifest)
    manifest = manifest_json(pkg.manifest)
    sha = hashlib.sha256(pkg.data).hexdigest()
    stack.deps.authorization.put_attachment(sha, "manifest.json", manifest)
    meta = {META_MANIFEST_SHA256: hashlib.sha256(manifest).hexdigest()}
    stack.drop(pkg.name, pkg.data, meta)
    outcome = _deliver(stack, pkg.name)
    assert outcome.state == "rejected"
    assert outcome.reason_code in ("bad_metadata", "manifest_mismatch")
    assert outcome.doc is not None
    assert outcome.doc.attempts == 1


def test_many_long_refused_file_names_stay_bounded(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    _set_policy(stack, _two_of_three(approver_keys, uid))
    pkg = stack.package("oct-256", f"pay-key-{uid}")
    _drop_with_manifest(stack, pkg)
    for i in range(70):
        _store_approval(stack, pkg, f"approval-{i:03d}" + "z" * 900 + ".json", b"{}")
    later = datetime.now(UTC) + timedelta(hours=73)
    stack.deps.clock = lambda: later
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "approval_expired")
    assert outcome.doc is not None
    assert len(outcome.doc.message or "") < 2000
    rejected = [e for e in stack.audit.events if e["event"] == "byok.rejected"]
    assert len(rejected) == 1
    assert len(json.dumps(rejected[0])) < 8000


def test_a_required_policy_that_is_missing_stops_every_import(stack: Stack, uid: str) -> None:
    """BYOK_POLICY_REQUIRED (set in Azure): a deleted or never-set policy is policy_invalid,
    never the safe defaults."""
    stack.deps.settings = replace(stack.settings, policy_required=True)
    stack.deps.authorization.settings = stack.deps.settings
    pkg = stack.package("oct-256", f"x-{uid}")
    stack.drop_package(pkg)
    outcome = _deliver(stack, pkg.name)
    assert (outcome.state, outcome.reason_code) == ("rejected", "policy_invalid")
    assert outcome.doc is not None
    assert "BYOK_POLICY_REQUIRED" in (outcome.doc.message or "")


def test_setting_the_policy_never_loses_a_concurrent_change(
    stack: Stack, uid: str, approver_keys: dict[str, Any]
) -> None:
    """`byok policy set` writes only over the policy it read: a policy set by someone else in
    between is refused (run again), so the audit event's old SHA-256 is always the right one."""
    from byok_pipeline.core.errors import Rejected

    authz = stack.deps.authorization
    first = json.dumps(_policy(approver_keys, {"name": f"a-{uid}"})).encode()
    authz.put_policy(first, replaces=None)
    with pytest.raises(Rejected):  # someone created it first
        authz.put_policy(first, replaces=None)
    found = authz.policy_bytes()
    assert found is not None
    read_etag = found[1]
    authz.put_policy(json.dumps(_policy(approver_keys, {"name": f"b-{uid}"})).encode())
    with pytest.raises(Rejected) as stale:
        authz.put_policy(first, replaces=read_etag)
    assert stale.value.reason == "policy_invalid"
    current = authz.policy_bytes()
    assert current is not None
    assert f"b-{uid}".encode() in current[0]
