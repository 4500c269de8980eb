"""No secret anywhere: a full run of every type (plus refusals) is scanned for the target keys'
bytes in status blobs, audit events, log lines and exception texts."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from pipeline_support import Stack

from byok_pipeline.core.errors import PipelineError
from offline_packager.keytypes import TYPE_NAMES
from offline_packager.package_format import b64url_encode, parse_package

pytestmark = pytest.mark.azurite


def forms(secret: bytes) -> list[bytes]:
    """Raw, hex (both cases), base64 and base64url renderings; 12-byte windows catch fragments."""
    out = []
    for window in (secret[i : i + 12] for i in range(0, max(1, len(secret) - 11), 12)):
        out += [window, window.hex().encode(), window.hex().upper().encode()]
    out += [base64.b64encode(secret)[:16], base64.urlsafe_b64encode(secret)[:16]]
    return out


def test_scanner_finds_planted_secrets() -> None:
    secret = bytes(range(40))
    for planted in (
        secret,
        secret.hex().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
    ):
        assert any(f in b"prefix " + planted + b" suffix" for f in forms(secret))


def test_full_run_leaks_nothing(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: list[bytes] = []
    texts: list[bytes] = []
    # transient faults on the way, so error texts (last_error) are produced and scanned too
    stack.hsm.inject_fault("503", method="PUT", path="/keys/scan-rsa-2048", count=5)
    stack.hsm.inject_fault("drop", method="GET", path="/keys/scan-*", count=2)
    for type_name in TYPE_NAMES:
        pkg = stack.package(type_name, f"scan-{type_name}")
        secrets.append(pkg.target.plaintext.reveal())
        stack.drop_package(pkg)
        for _ in range(stack.settings.max_attempts):
            try:
                outcome = stack.deliver(pkg.name)
                break
            except PipelineError as exc:
                texts.append(str(exc).encode())
        assert outcome.state == "imported"
    stack.hsm.clear_faults()
    # refusals too: a tampered package and a wrong fingerprint carry messages
    bad = stack.package("ec-p521", "scan-bad")
    secrets.append(bad.target.plaintext.reveal())
    doc = json.loads(bad.data)
    ct = parse_package(bad.data).ciphertext
    doc["ciphertext"] = b64url_encode(ct[:-8] + bytes(8))
    stack.drop("scan-bad.byok", json.dumps(doc).encode(), {"byok_target_type": "ec-p521"})
    outcome = stack.deliver("scan-bad.byok")
    assert outcome.reason_code == "hsm_refused"
    assert outcome.doc is not None
    texts.append((outcome.doc.message or "").encode())
    try:
        from byok_pipeline.processing.processor import key_name_of

        key_name_of("bad name.byok")
    except PipelineError as exc:
        texts.append(str(exc).encode())

    texts += [json.dumps(d).encode() for d in stack.status_docs()]
    assert any(d.get("last_error") for d in stack.status_docs())  # the faults left error texts
    for container in (stack.settings.archive_container, stack.settings.quarantine_container):
        for blob in stack.blobs(container):
            props = stack.service.get_blob_client(container, blob).get_blob_properties()
            texts.append(json.dumps(props.metadata).encode())
    texts += [json.dumps(e).encode() for e in stack.audit.events]
    texts += [r.getMessage().encode() for r in caplog.records]
    texts.append(caplog.text.encode())
    assert len(texts) > 30
    haystack = b"\n".join(texts)
    for secret in secrets:
        for form in forms(secret):
            assert form not in haystack
