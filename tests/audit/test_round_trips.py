"""Round trips per package on the happy path, counted at the HTTP layer with the production
audit sink (issue 12: 12 storage requests, audit included, 13 when the policy protects the name;
on the HSM the existing-key read, the import PUT, and the trail's two signatures). A change that adds a request fails here;
the benchmark (benchmarks/throughput_bench.py) prints the same figures."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import SplitResult, urlsplit

import pytest
from audit_support import Audited

from byok_pipeline.localdev.http_count import counting_requests
from byok_pipeline.processing.processor import process_blob


def _classifier(ports: dict[int, str]) -> Callable[[str, SplitResult], str]:
    def classify(method: str, url: SplitResult) -> str:
        kind = ports.get(url.port or 443, "other")
        if kind == "hsm" and url.path.endswith("/sign"):
            return "audit signature"
        if kind == "hsm":
            return f"hsm {method} {url.path.split('/')[1]}"
        return kind

    return classify


@pytest.mark.parametrize("protected", [False, True], ids=["no-policy", "protecting-policy"])
def test_happy_path_round_trips(audited: Audited, *, protected: bool) -> None:
    """With a policy whose rule allows no new version of the name, one storage request more:
    the record claims the key name before the existing-key check (one import per name)."""
    stack = audited.stack
    stack.deps.settings = replace(stack.deps.settings, policy_cache_seconds=5.0)
    stack.deps.authorization.settings = stack.deps.settings  # the production policy cache
    if protected:
        policy = {"policy_version": 1, "rules": [{"prefix": "rt-"}]}
        stack.deps.authorization.put_policy(json.dumps(policy).encode())
    ports = {
        urlsplit(stack.azurite.blob_url).port or 443: "storage",
        urlsplit(stack.hsm.url).port or 443: "hsm",
    }
    tag = secrets.token_hex(3)  # the emulator outlives the test: names of its own
    packages = [stack.package("ec-p256", f"rt-{tag}-{i}") for i in range(4)]
    for pkg in packages:
        stack.drop_package(pkg)
    assert process_blob(packages[0].name, stack.deps).state == "imported"  # clients, tokens
    with counting_requests(_classifier(ports)) as counts:
        for pkg in packages[1:]:
            assert process_blob(pkg.name, stack.deps).state == "imported"
    n = len(packages) - 1
    per_package = {kind: total / n for kind, total in counts.items()}
    assert per_package == {
        # drop, name index, claim, lease, identity, (key name), importing, append, outcome,
        # append, marks, copy, delete
        "storage": 13 if protected else 12,
        "hsm GET keys": 1,  # the existing key (import authorization); the KEK comes from cache
        "hsm PUT keys": 1,  # the import
        "audit signature": 2,  # one per signed append
    }, per_package


def test_a_settled_record_keeps_its_lease_and_a_redrop_is_a_duplicate_without_it(
    audited: Audited,
) -> None:
    stack = audited.stack
    pkg = stack.package("oct-256", "settled")
    stack.drop_package(pkg)
    first = process_blob(pkg.name, stack.deps)
    assert first.state == "imported"
    assert first.status_path is not None
    status_blob = stack.service.get_blob_client(stack.settings.status_container, first.status_path)
    assert status_blob.get_blob_properties().lease.state == "leased"  # not released: runs out
    stack.drop_package(pkg)  # the custodian uploads the same file again at once
    again = process_blob(pkg.name, stack.deps)
    assert (again.state, again.reason_code) == ("duplicate", None)
    assert again.doc is not None
    assert again.doc.duplicate_of == first.status_path
    assert stack.blobs(stack.settings.incoming_container) == []
    events = [r["event"] for r in audited.trail_records()]
    assert events.count("byok.imported") == 1
    assert events.count("byok.duplicate") == 1
