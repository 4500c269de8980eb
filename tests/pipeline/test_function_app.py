"""The Function app invoked in-process: the blob trigger with recorded Event Grid payloads
(duplicated and out of order), and the HTTP functions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import azure.functions as func
import pytest
from eventgrid_sim import deliver_all, event_for, input_stream, recorded
from pipeline_support import Stack

from byok_pipeline.core.events import BlobCreatedEvent, EventError
from byok_pipeline.processing import runtime

pytestmark = pytest.mark.azurite


@pytest.fixture(scope="module")
def functions() -> dict[str, Callable[..., Any]]:
    import function_app

    # app.get_functions() may be called only once per app
    return {
        str(f.get_function_name()): f.get_user_function() for f in function_app.app.get_functions()
    }


@pytest.fixture
def wired(stack: Stack) -> Iterator[Stack]:
    runtime.set_deps_factory(lambda: stack.deps)
    yield stack
    runtime.set_deps_factory(None)


def test_function_app_declares_the_triggers(functions: dict[str, Callable[..., Any]]) -> None:
    import function_app

    assert set(functions) == {
        "process_package",
        "list_packages",
        "get_package",
        "get_kek",
        "reconcile",
    }
    source = (function_app.__file__ and open(function_app.__file__).read()) or ""  # noqa: PTH123, SIM115  # read our own source
    assert "%BYOK_INCOMING_CONTAINER%/{name}" in source
    assert "source=func.BlobSource.EVENT_GRID" in source
    assert 'connection="BYOK_STORAGE"' in source


def test_recorded_payloads_parse() -> None:
    grid = BlobCreatedEvent.parse(recorded("blob_created.json"))
    assert (grid.container, grid.blob_name, grid.etag) == (
        "byok-incoming",
        "payments-2026.byok",
        "0x8DEC1A2B3C4D5E6",
    )
    cloud = BlobCreatedEvent.parse(recorded("blob_created_cloudevent.json"))
    assert cloud.blob_name == "signing-ec.byok"
    with pytest.raises(EventError):
        BlobCreatedEvent.parse(recorded("blob_deleted.json"))


def test_duplicated_and_reordered_events_import_each_package_once(
    wired: Stack, functions: dict[str, Callable[..., Any]]
) -> None:
    stack = wired
    trigger = functions["process_package"]
    packages = [stack.package(t, f"evt-{t}") for t in ("rsa-2048", "ec-p256k", "oct-192")]
    events = []
    for i, pkg in enumerate(packages):
        etag = stack.drop_package(pkg)
        template = "blob_created.json" if i % 2 else "blob_created_cloudevent.json"
        events.append(
            event_for(template, stack.settings.incoming_container, pkg.name, etag, len(pkg.data))
        )

    def invoke(event: dict[str, Any]) -> None:
        trigger(input_stream(event, None))

    stats = deliver_all(events, invoke, duplicates=3)
    assert stats["succeeded"] == 9
    docs = [d for d in stack.status_docs() if d["state"] == "imported"]
    assert sorted(d["blob_name"] for d in docs) == sorted(p.name for p in packages)
    assert all(d["fingerprint_result"] == "match" for d in docs)
    for pkg in packages:
        versions = list(stack.hsm.key_client().list_properties_of_key_versions(pkg.name[:-5]))
        assert len(versions) == 1
    assert stack.blobs(stack.settings.incoming_container) == []


def test_transient_failure_fails_the_invocation_for_redelivery(
    wired: Stack, functions: dict[str, Callable[..., Any]]
) -> None:
    stack = wired
    pkg = stack.package("oct-256", "evt-retry")
    etag = stack.drop_package(pkg)
    event = event_for(
        "blob_created.json", stack.settings.incoming_container, pkg.name, etag, len(pkg.data)
    )
    stack.hsm.inject_fault("503", method="GET", path="/keys/pipeline-kek/*", count=20)
    try:
        with pytest.raises(Exception, match="503"):
            functions["process_package"](input_stream(event, None))
    finally:
        stack.hsm.clear_faults()
    (doc,) = stack.status_docs()
    assert doc["state"] == "received"
    assert "503" in doc["last_error"]
    functions["process_package"](input_stream(event, None))  # the redelivery succeeds
    assert [d["state"] for d in stack.status_docs()] == ["imported"]


def _http(fn: Callable[..., Any], url: str, **route: str) -> tuple[int, Any]:
    params = {}
    if "?" in url:
        params = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    req = func.HttpRequest(method="GET", url=url, body=b"", params=params, route_params=route)
    resp = fn(req)
    return resp.status_code, json.loads(resp.get_body())


def test_http_functions(wired: Stack, functions: dict[str, Callable[..., Any]]) -> None:
    stack = wired
    ok = stack.package("ec-p384", "http-ok")
    stack.drop_package(ok)
    stack.deliver(ok.name)
    stack.drop("http-bad.byok", b"garbage")
    stack.deliver("http-bad.byok")

    status, body = _http(functions["list_packages"], "/api/packages")
    assert status == 200
    assert body["count"] == 2
    status, body = _http(functions["list_packages"], "/api/packages?state=rejected")
    assert [p["blob_name"] for p in body["packages"]] == ["http-bad.byok"]
    status, body = _http(functions["list_packages"], "/api/packages?state=bogus")
    assert status == 400

    status, body = _http(
        functions["get_package"], "/api/packages/http-ok.byok", name="http-ok.byok"
    )
    assert (status, body["state"], body["fingerprint_result"]) == (200, "imported", "match")
    assert "audited" not in json.dumps(body)
    status, body = _http(
        functions["get_package"], "/api/packages/http-bad.byok", name="http-bad.byok"
    )
    assert (body["reason_code"], body["reason"]) == (
        "malformed_package",
        "Not a strict JSON .byok document with the expected fields.",
    )
    status, _ = _http(functions["get_package"], "/api/packages/nope.byok", name="nope.byok")
    assert status == 404

    status, body = _http(functions["get_kek"], "/api/kek")
    assert status == 404  # BYOK_KEK_KID not configured
    from dataclasses import replace

    stack.deps.settings = replace(stack.settings, kek_kid=stack.kek_kid)
    status, body = _http(functions["get_kek"], "/api/kek")
    assert status == 200
    assert body["kid"] == stack.kek_kid
    assert body["public_key_pem"].encode() == stack.kek_pem
    from offline_packager.kek import load_kek_pem

    assert body["spki_sha256"] == load_kek_pem(stack.kek_pem).fingerprint
    assert body["key_ops"] == ["import"]


def test_settings_are_documented_everywhere() -> None:
    from testsupport import REPO

    from byok_pipeline.core.settings import DEFAULTS, SETTINGS_DOC

    readme = (REPO / "README.md").read_text()
    example = json.loads((REPO / "local.settings.example.json").read_text())["Values"]
    for name in SETTINGS_DOC:
        assert f"`{name}`" in readme, name
        assert name in example, name
    for name, default in DEFAULTS.items():
        assert example[name] == default, name
    host = json.loads((REPO / "host.json").read_text())
    assert host["extensionBundle"]["version"] == "[4.*, 5.0.0)"
    assert host["functionTimeout"]


def test_status_documents_match_their_schema(stack: Stack) -> None:
    import jsonschema
    from testsupport import REPO

    schema = json.loads((REPO / "byok_pipeline" / "schemas" / "status.schema.json").read_text())
    for type_name, name in (("oct-128", "schema-ok"), ("ec-p256", "schema-dup")):
        pkg = stack.package(type_name, name)
        stack.drop_package(pkg)
        stack.deliver(pkg.name)
    stack.drop_package(pkg)  # a duplicate drop
    stack.deliver(pkg.name)
    stack.drop("schema-bad.byok", b"x")
    stack.deliver("schema-bad.byok")
    stack.drop("big.byok", b" " * 70_000)
    stack.deliver("big.byok")
    docs = stack.status_docs()
    assert sorted(d["state"] for d in docs) == [
        "duplicate",
        "imported",
        "imported",
        "rejected",
        "rejected",
    ]
    for doc in docs:
        jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**docs[0], "d": "secret"}, schema)
