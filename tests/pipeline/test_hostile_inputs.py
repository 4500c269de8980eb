"""Issue 15: every hostile input ends in a typed refusal at once, on the local stack.

One test per reproduced case (numbered as in the issue); each failed on the code before it.
A refusal is asserted as: the reason, one attempt (never retried), the package out of incoming.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from pipeline_support import Package, Stack

from byok_pipeline.adapters.blobstore import BlobStore
from byok_pipeline.cli.main import main
from byok_pipeline.core.errors import InProgress
from byok_pipeline.core.metadata import META_TAGS
from byok_pipeline.processing.processor import Outcome
from offline_packager.package_format import b64url_encode, parse_package

pytestmark = pytest.mark.azurite

HUGE_INT = "9" * 5000  # over Python's 4,300-digit int-string limit


def _refused(stack: Stack, outcome: Outcome, reason: str) -> None:
    assert (outcome.state, outcome.reason_code) == ("rejected", reason)
    assert outcome.doc is not None
    assert outcome.doc.attempts == 1  # refused at once, never retried
    assert stack.blobs(stack.settings.incoming_container) == []
    assert len(stack.blobs(stack.settings.quarantine_container)) == 1


def _versions(stack: Stack, name: str) -> int:
    try:
        return len(list(stack.hsm.key_client().list_properties_of_key_versions(name)))
    except ResourceNotFoundError:
        return 0


def _edit(data: bytes, edit: Any) -> bytes:
    doc = json.loads(data)
    edit(doc)
    return json.dumps(doc).encode()


# -- 1. a JSON integer of more than 4,300 digits ------------------------------------------------
@pytest.mark.parametrize("where", ["top", "header", "generator"])
def test_1_huge_integer_is_malformed_package(stack: Stack, where: str) -> None:
    pkg = stack.package("oct-256", f"huge-{where}")
    text = pkg.data.decode()
    if where == "top":
        text = text[:-1] + f',"x":{HUGE_INT}}}'
    elif where == "header":
        text = text.replace('"alg":"dir"', f'"alg":{HUGE_INT}')
    else:
        text = text.replace('"generator":', f'"generator":{HUGE_INT},"g2":')
    stack.drop(pkg.name, text.encode())
    _refused(stack, stack.deliver(pkg.name), "malformed_package")


def test_1_emulator_answers_400_to_a_package_with_a_huge_integer(stack: Stack) -> None:
    pkg = stack.package("oct-256", "huge-put")
    bad = pkg.data.decode()[:-1] + f',"x":{HUGE_INT}}}'
    body = {
        "key": {"kty": "oct-HSM", "key_ops": ["encrypt"], "key_hsm": b64url_encode(bad.encode())}
    }
    reply = stack.hsm.request("PUT", "/keys/huge-put?api-version=7.4", body)
    assert reply.status == 400
    assert reply.body["error"]["code"] == "BadParameter"


def test_1_inspect_refuses_with_exit_2(
    stack: Stack, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from offline_packager.cli import main as package_main

    pkg = stack.package("oct-256", "huge-inspect")
    path = tmp_path / "huge-inspect.byok"
    path.write_bytes(pkg.data[:-1] + f',"x":{HUGE_INT}}}'.encode())
    assert package_main(["inspect", str(path), "--json"]) == 2
    assert "malformed_package" in capsys.readouterr().out


# -- 2. byok_tags nested 3,000 deep -------------------------------------------------------------
@pytest.mark.parametrize(("nest", "depth"), [('{"":', 1500), ("[", 3000)])
def test_2_deeply_nested_tags_are_bad_metadata(stack: Stack, nest: str, depth: int) -> None:
    # (as deep as a metadata header Azurite accepts allows: RecursionError starts near 1,000)
    pkg = stack.package("oct-256", "deep-tags")
    closing = {"{": "}", "[": "]"}[nest[0]]
    meta = pkg.options.to_metadata()
    meta[META_TAGS] = nest * depth + "1" + closing * depth
    stack.drop(pkg.name, pkg.data, meta)
    _refused(stack, stack.deliver(pkg.name), "bad_metadata")


# -- 3. a kid urlsplit refuses --------------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    ["[127.0.0.1", "127.0.0.1\uff03x", "127.0.0.1\u2100x"],
    ids=["bracket", "nfkc-hash", "nfkc-slash"],
)
def test_3_kid_urlsplit_refuses_is_bad_kid(stack: Stack, host: str) -> None:
    pkg = stack.package("oct-256", "odd-host")
    version = stack.kek_kid.rsplit("/", 1)[1]
    data = _edit(pkg.data, lambda d: d["header"].update(kid=f"https://{host}/keys/k/{version}"))
    stack.drop(pkg.name, data)
    _refused(stack, stack.deliver(pkg.name), "bad_kid")


# -- 4. "x.byok\n" ------------------------------------------------------------------------------
def test_4_trailing_newline_name_is_refused_not_imported(stack: Stack) -> None:
    pkg = stack.package("oct-256", "nl4")
    stack.drop("nl4.byok\n", pkg.data, pkg.options.to_metadata())
    _refused(stack, stack.deliver("nl4.byok\n"), "bad_key_name")
    assert _versions(stack, "nl4") == 0


# -- 5. CR/LF in the blob name --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cr\r5.byok", "l\nf5.byok", "tab\t5.byok", "bell\x075.byok"])
def test_5_control_characters_in_the_name_leave_incoming(stack: Stack, name: str) -> None:
    pkg = stack.package("oct-256", "ctl5")
    stack.drop(name, pkg.data, pkg.options.to_metadata())
    outcome = stack.deliver(name)
    _refused(stack, outcome, "bad_key_name")
    (moved,) = stack.blobs(stack.settings.quarantine_container)
    meta = (
        stack.service.get_blob_client(stack.settings.quarantine_container, moved)
        .get_blob_properties()
        .metadata
    )
    assert meta["original_name"].isprintable()
    assert meta["original_name"] == name.encode("unicode_escape").decode()


# -- 6. refused as r5a, imported as r5b -------------------------------------------------------------
def test_6_a_name_refused_then_imported_under_another_keeps_its_record(stack: Stack) -> None:
    pkg = stack.package("oct-256", "r5a")
    stack.drop("r5a.byok", pkg.data, {"byok_target_type": "nonsense"})
    assert stack.deliver("r5a.byok").reason_code == "bad_metadata"
    stack.drop("r5b.byok", pkg.data, pkg.options.to_metadata())
    assert stack.deliver("r5b.byok").state == "imported"
    store = stack.deps.store
    first, second = store.status_by_name("r5a.byok"), store.status_by_name("r5b.byok")
    assert first is not None
    assert second is not None
    assert (first.blob_name, first.state, first.reason_code) == (
        "r5a.byok",
        "rejected",
        "bad_metadata",
    )
    assert (second.blob_name, second.state) == ("r5b.byok", "imported")


# -- 7. a worker dying between the claim and the name index -----------------------------------------
class _Died(BaseException):
    """A worker killed at this point: nothing after it runs (not even ``except Exception``)."""


@pytest.mark.parametrize("at", ["after_claim", "after_lease"])
def test_7_claimed_package_is_always_findable_by_name(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    """The name index is written before the claim (``BlobStore.create_status``): a worker
    dying right after the claim or the lease leaves a record ``byok status NAME`` finds, and
    redelivery finishes it."""
    pkg = stack.package("oct-256", f"die-{at.replace('_', '-')}")
    stack.drop_package(pkg)
    real_create, real_lease = BlobStore.create_status, BlobStore.lease

    def dying_create(self: BlobStore, *args: Any, **kwargs: Any) -> str | None:
        real_create(self, *args, **kwargs)
        raise _Died

    def dying_lease(self: BlobStore, *args: Any, **kwargs: Any) -> Any:
        real_lease(self, *args, **kwargs)
        raise _Died

    if at == "after_claim":
        monkeypatch.setattr(BlobStore, "create_status", dying_create)
    else:
        monkeypatch.setattr(BlobStore, "lease", dying_lease)
    with pytest.raises(_Died):
        stack.deliver(pkg.name)
    monkeypatch.setattr(BlobStore, "create_status", real_create)
    monkeypatch.setattr(BlobStore, "lease", real_lease)
    claimed = stack.deps.store.status_by_name(pkg.name)
    assert claimed is not None
    assert claimed.state == "received"
    outcome = deliver_until_leased(stack, pkg.name)
    assert outcome.state == "imported"
    found = stack.deps.store.status_by_name(pkg.name)
    assert found is not None
    assert found.state == "imported"


def deliver_until_leased(stack: Stack, name: str) -> Any:
    """A dead worker's lease runs out (15 s in these stacks): redeliver until then."""
    deadline = time.monotonic() + 40
    while True:
        try:
            return stack.deliver(name)
        except InProgress:
            assert time.monotonic() < deadline
            time.sleep(0.5)


# -- 8. kids with a tab or a control character; ciphertext with padding and a newline ---------------
@pytest.mark.parametrize(
    "spoil",
    [
        lambda kid: kid.replace("/keys/", "/keys/p\t"),  # urlsplit drops tabs: it became "p..."
        lambda kid: kid.replace("/keys/", "/ke\rys/"),
        lambda kid: kid.replace("/keys/", "/keys/\n"),
        lambda kid: kid + "\n",
        lambda kid: kid.replace("/keys/", "/keys/\x7f"),
    ],
    ids=["tab", "cr", "lf", "trailing-lf", "del"],
)
def test_8_kid_with_a_control_character_is_bad_kid(stack: Stack, spoil: Any) -> None:
    pkg = stack.package("oct-256", "ctl-kid")
    kid = spoil(stack.kek_kid)
    stack.drop(pkg.name, _edit(pkg.data, lambda d: d["header"].update(kid=kid)))
    _refused(stack, stack.deliver(pkg.name), "bad_kid")


@pytest.mark.parametrize("tail", ["=\n", "==\n", "\n", " "])
def test_8_ciphertext_with_padding_and_a_newline_is_bad_base64(stack: Stack, tail: str) -> None:
    # oct-128: a 408-byte ciphertext, 544 base64url characters (no padding due), which the
    # old rule decoded with "=\n" or "==\n" appended
    pkg = stack.package("oct-128", "nl-ct")
    stack.drop(pkg.name, _edit(pkg.data, lambda d: d.update(ciphertext=d["ciphertext"] + tail)))
    _refused(stack, stack.deliver(pkg.name), "bad_base64")


# -- 9. a reformatted copy is the same package ------------------------------------------------------
def _reformatted(pkg: Package, how: str) -> bytes:
    doc = json.loads(pkg.data)
    ct = parse_package(pkg.data).ciphertext
    if how == "padding":
        doc["ciphertext"] = b64url_encode(ct) + "=" * (-len(b64url_encode(ct)) % 4)
        if doc["ciphertext"] == b64url_encode(ct):  # no padding is due: change the generator
            doc["generator"] = "another tool 1.0"
        return json.dumps(doc).encode()
    if how == "bom":
        return b"\xef\xbb\xbf" + pkg.data
    if how == "pretty":
        return json.dumps(doc, indent=4).replace("\n", "\r\n").encode() + b"\r\n"
    if how == "order":
        return json.dumps(dict(reversed(list(doc.items())))).encode()
    if how == "kek-name-case":  # key names are case-insensitive: the same KEK (found by make fuzz)
        name = doc["header"]["kid"].split("/")[-2]
        doc["header"]["kid"] = doc["header"]["kid"].replace(f"/{name}/", f"/{name.upper()}/")
        return json.dumps(doc).encode()
    doc["generator"] = "re-saved by an editor"
    return json.dumps(doc, separators=(", ", ": ")).encode()


@pytest.mark.parametrize("how", ["padding", "bom", "pretty", "order", "generator", "kek-name-case"])
def test_9_reformatted_copy_is_a_duplicate_not_a_new_version(stack: Stack, how: str) -> None:
    pkg = stack.package("ec-p256", f"fmt-{how}")
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).state == "imported"
    copy = _reformatted(pkg, how)
    assert copy != pkg.data
    stack.drop(pkg.name, copy)  # the same name: it would become a second version
    outcome = stack.deliver(pkg.name)
    assert outcome.state == "duplicate"
    assert outcome.doc is not None
    assert outcome.doc.duplicate_of is not None
    stack.drop(f"other-{how}.byok", copy)  # another name: the same key material again
    assert stack.deliver(f"other-{how}.byok").state == "duplicate"
    assert _versions(stack, pkg.name[:-5]) == 1
    assert _versions(stack, f"other-{how}") == 0
    assert stack.blobs(stack.settings.incoming_container) == []


def test_9_a_refused_first_copy_gives_way_to_a_reformatted_one(stack: Stack) -> None:
    pkg = stack.package("oct-256", "fmt-retry")
    # refused after its identity was claimed (the stated type cannot fit the length)
    stack.drop(pkg.name, pkg.data, {"byok_target_type": "rsa-2048"})
    assert stack.deliver(pkg.name).reason_code == "target_type_mismatch"
    stack.drop(pkg.name, _reformatted(pkg, "pretty"))
    assert stack.deliver(pkg.name).state == "imported"
    stack.drop(pkg.name, _reformatted(pkg, "order"))
    assert stack.deliver(pkg.name).state == "duplicate"
    assert _versions(stack, "fmt-retry") == 1


# -- 10. name before duplicate; exact status lookup; a KEK of the wrong size -------------------------
def test_10_invalid_name_of_imported_bytes_is_bad_key_name(stack: Stack) -> None:
    pkg = stack.package("oct-256", "dup10")
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).state == "imported"
    stack.drop("dup 10.byok", pkg.data, pkg.options.to_metadata())
    outcome = stack.deliver("dup 10.byok")
    assert (outcome.state, outcome.reason_code) == ("rejected", "bad_key_name")
    assert stack.blobs(stack.settings.incoming_container) == []


def test_10_status_lookup_is_exact(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = stack.settings
    for key, value in {
        "BYOK_STORAGE": stack.azurite.connection_string,
        "BYOK_INCOMING_CONTAINER": s.incoming_container,
        "BYOK_STATUS_CONTAINER": s.status_container,
        "BYOK_ARCHIVE_CONTAINER": s.archive_container,
        "BYOK_QUARANTINE_CONTAINER": s.quarantine_container,
        "BYOK_AUDIT_CONTAINER": s.audit_container,
    }.items():
        monkeypatch.setenv(key, value)
    pkg = stack.package("oct-256", "nosuffix")
    stack.drop("nosuffix", pkg.data)
    assert stack.deliver("nosuffix").reason_code == "bad_key_name"
    listed = _status_json(capsys, "status")
    assert [d["blob_name"] for d in listed] == ["nosuffix"]
    shown = _status_json(capsys, "status", "nosuffix")
    assert (shown["blob_name"], shown["state"]) == ("nosuffix", "rejected")
    assert main(["status", "nosuffix.byok", "--json"]) == 2  # no such drop: nothing guessed
    capsys.readouterr()


def _status_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_10_kek_of_another_size_is_a_kek_refusal(stack: Stack) -> None:
    small = stack.hsm.key_client().create_rsa_key(
        "kek-2048-10", size=2048, key_operations=["import"], hardware_protected=True
    )
    # wrapped under the stack's RSA-3072 KEK, but the kid names the real RSA-2048 KEK
    for type_name in ("oct-256", "ec-p256", "rsa-2048"):
        pkg = stack.package(type_name, f"size10-{type_name}", kid=str(small.id))
        stack.drop(pkg.name, pkg.data)
        outcome = stack.deliver(pkg.name)
        assert (outcome.state, outcome.reason_code) == ("rejected", "kek_mismatch"), type_name
