"""All ten target types go through the whole pipeline: imported, verified, archived."""

from __future__ import annotations

import pytest
from pipeline_support import Stack

from offline_packager.keytypes import TYPE_NAMES


@pytest.mark.azurite
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_type_imports_and_verifies(stack: Stack, type_name: str) -> None:
    pkg = stack.package(type_name)
    stack.drop_package(pkg)
    outcome = stack.deliver(pkg.name)
    assert outcome.state == "imported", (outcome.reason_code, outcome.doc and outcome.doc.message)
    doc = outcome.doc
    assert doc is not None
    assert doc.fingerprint_result == "match"
    assert doc.target_type == type_name
    assert doc.imported_kid is not None
    assert doc.imported_kid.startswith(f"{stack.hsm.url}/keys/{type_name}/")
    assert [h.state for h in doc.history] == ["received", "validated", "importing", "imported"]
    assert stack.blobs(stack.settings.incoming_container) == []
    assert stack.blobs(stack.settings.archive_container) == [
        f"{type_name}/{doc.package_sha256}.byok"
    ]
    events = [e["event"] for e in stack.audit.events]
    assert events == [
        "byok.received",
        "byok.validated",
        "byok.importing",
        "byok.imported",
        "byok.verified",
    ]
    versions = list(stack.hsm.key_client().list_properties_of_key_versions(type_name))
    assert len(versions) == 1
