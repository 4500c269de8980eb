"""The Function app invoked in-process: the blob trigger with recorded Event Grid payloads
(duplicated and out of order), and the HTTP functions."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from eventgrid_sim import blob_client, deliver_all, event_for, recorded
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
def wired(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    # the app setting the trigger's `connection` names: the binding builds its client from it
    monkeypatch.setenv("BYOK_STORAGE", stack.azurite.connection_string)
    runtime.set_deps_factory(lambda: stack.deps)
    yield stack
    runtime.set_deps_factory(None)


def test_function_app_declares_the_triggers(functions: dict[str, Callable[..., Any]]) -> None:
    import function_app

    assert set(functions) == {
        "process_package",
        "process_approval",
        "list_packages",
        "get_package",
        "get_kek",
        "dashboard",
        "reconcile",
    }
    source = (function_app.__file__ and open(function_app.__file__).read()) or ""  # noqa: PTH123, SIM115  # read our own source
    assert "%BYOK_INCOMING_CONTAINER%/{name}" in source
    assert "%BYOK_APPROVALS_CONTAINER%/{name}" in source
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
        trigger(blob_client(event))

    stats = deliver_all(events, invoke, duplicates=3)
    assert stats["succeeded"] == 9
    docs = [d for d in stack.status_docs() if d["state"] == "imported"]
    assert sorted(d["blob_name"] for d in docs) == sorted(p.name for p in packages)
    assert all(d["fingerprint_result"] == "match" for d in docs)
    for pkg in packages:
        versions = list(stack.hsm.key_client().list_properties_of_key_versions(pkg.name[:-5]))
        assert len(versions) == 1
    assert stack.blobs(stack.settings.incoming_container) == []


def test_the_trigger_binds_a_blob_client_and_the_host_downloads_nothing(
    functions: dict[str, Callable[..., Any]],
) -> None:
    """The binding is the SDK type (the host passes model binding data, never the content)."""
    import inspect

    from azurefunctions.extensions.bindings.blob import BlobClient as BlobClientBinding

    params = inspect.signature(functions["process_package"]).parameters
    assert params["blob"].annotation is BlobClientBinding
    assert "azurefunctions-extensions-bindings-blob" in Path("requirements.txt").read_text()


def test_an_oversized_package_is_refused_before_any_download(
    wired: Stack, functions: dict[str, Callable[..., Any]]
) -> None:
    """The size cap applies before the content is read: only a ranged read of the cap is made
    (the pipeline's own read), never a download of the whole blob."""
    stack = wired
    limit = stack.settings.max_package_bytes
    name = "evt-oversize.byok"
    etag = stack.drop(name, b"{" + b" " * (limit + 1024) + b"}")
    event = event_for("blob_created.json", stack.settings.incoming_container, name, etag, limit)
    functions["process_package"](blob_client(event))
    (doc,) = stack.status_docs()
    assert doc["state"] == "rejected"
    assert doc["reason_code"] == "too_large"


def test_one_package_emits_no_azure_core_info_records(
    wired: Stack, functions: dict[str, Callable[..., Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """configure_logging (run when function_app loads) holds azure-core's per-request INFO
    lines back; the pipeline's own INFO record still flows. The control run without it shows
    that the check sees such lines when they are there."""
    from byok_pipeline.processing.runtime import QUIET_LOGGERS, configure_logging

    stack = wired

    def run(label: str) -> list[logging.LogRecord]:
        pkg = stack.package("oct-256", f"evt-quiet-{label}")
        etag = stack.drop_package(pkg)
        event = event_for(
            "blob_created.json", stack.settings.incoming_container, pkg.name, etag, len(pkg.data)
        )
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            functions["process_package"](blob_client(event))
        assert any(
            r.name == "byok_pipeline" and "imported" in r.getMessage() for r in caplog.records
        )
        return [r for r in caplog.records if r.name.startswith("azure") and r.levelno < 30]

    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        assert run("control"), "without configure_logging azure-core logs each request"
        configure_logging()
        assert run("quiet") == []
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


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
            functions["process_package"](blob_client(event))
    finally:
        stack.hsm.clear_faults()
    (doc,) = stack.status_docs()
    assert doc["state"] == "received"
    assert "503" in doc["last_error"]
    functions["process_package"](blob_client(event))  # the redelivery succeeds
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
    # the KEK's attestation, as the HSM answered it: it verifies offline (with the emulator's
    # TEST root) against the PEM the same answer carries
    from datetime import UTC, datetime

    from offline_packager.attestation import load_test_root, verify_kek_attestation
    from offline_packager.kid import parse_kid

    assert len(body["attestation_sha256"]) == 64
    root = load_test_root((stack.hsm.data_dir / "attestation-test-root.pem").read_bytes())
    result = verify_kek_attestation(
        json.dumps(body["attestation"]).encode(),
        load_kek_pem(body["public_key_pem"].encode()),
        now=datetime.now(UTC),
        kek_kid=parse_kid(stack.kek_kid),
        anchors=[root],
    )
    assert result.attested_key_id == stack.kek_kid


def test_settings_are_documented_everywhere() -> None:
    from testsupport import REPO

    from byok_pipeline.core.settings import DEFAULTS, SETTINGS_DOC

    readme = (REPO / "docs" / "reference.md").read_text()  # README "Reference" links it
    example = json.loads((REPO / "local.settings.example.json").read_text())["Values"]
    for name in SETTINGS_DOC:
        assert f"`{name}`" in readme, name
        assert name in example, name
    for name, default in DEFAULTS.items():
        assert example[name] == default, name
    host = json.loads((REPO / "host.json").read_text())
    assert host["extensionBundle"]["version"] == "[4.*, 5.0.0)"
    assert host["functionTimeout"]
    # host.json log levels name host categories; Python logger names have no effect there
    # (worker output is Function.<name>.User), so they are set in code instead
    for category in host["logging"]["logLevel"]:
        assert category == "default" or category.split(".")[0] in ("Host", "Function"), category


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


def test_the_dashboard_route_serves_the_page_byok_serve_serves(
    wired: Stack, functions: dict[str, Callable[..., Any]]
) -> None:
    """Function-key auth, and byte for byte the page (and security headers) of `byok serve`:
    both ask the same runtime function, here with one clock."""
    import threading
    import urllib.request
    from datetime import UTC, datetime

    import function_app
    from byok_pipeline.localdev.server import DashboardServer

    stack = wired
    stack.drop("<b>dash-fn</b>.byok", b"{}")  # refused for its name, shown escaped
    assert stack.deliver("<b>dash-fn</b>.byok").reason_code == "bad_key_name"
    stack.deps.clock = lambda: datetime(2026, 5, 14, 12, 0, tzinfo=UTC)

    source = Path(function_app.__file__ or "").read_text()
    assert (
        '@app.route(route="dashboard", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)'
        in source
    )
    req = func.HttpRequest(method="GET", url="/api/dashboard", body=b"")
    resp = functions["dashboard"](req)
    assert resp.status_code == 200
    page = resp.get_body()
    assert b"&lt;b&gt;dash-fn&lt;/b&gt;.byok" in page
    assert b"<b>" not in page

    server = DashboardServer("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"{server.url}api/dashboard", timeout=30) as served:  # noqa: S310  # our own loopback URL
            assert served.read() == page
            for name in ("Content-Security-Policy", "X-Content-Type-Options", "Content-Type"):
                assert served.headers[name] == resp.headers[name], name
    finally:
        server.shutdown()
        server.server_close()
