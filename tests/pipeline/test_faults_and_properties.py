"""Faults injected in the emulator end imported; permanent refusals are not retried; arbitrary
and mutated packages always end in a typed outcome."""

from __future__ import annotations

import itertools
import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_support import Stack

from byok_pipeline.audit.events import utc_now
from byok_pipeline.core.errors import InProgress, TransientError
from byok_pipeline.core.reasons import REASONS
from offline_packager.package_format import b64url_encode, parse_package

pytestmark = pytest.mark.azurite


def _puts(stack: Stack, name: str, since: int) -> int:
    return sum(
        1
        for r in stack.hsm.requests_seen(since)
        if r["method"] == "PUT" and r["path"].startswith(f"/keys/{name}")
    )


@pytest.mark.parametrize(
    "faults",
    [
        [{"kind": "429", "method": "PUT", "path": "/keys/*", "count": 2, "retry_after": 1}],
        [{"kind": "503", "method": "GET", "path": "/keys/*", "count": 2}],
        [{"kind": "drop", "method": "PUT", "path": "/keys/*", "count": 1}],
        [{"kind": "drop", "method": "GET", "path": "/keys/*", "count": 2},
         {"kind": "503", "method": "PUT", "path": "/keys/*", "count": 1}],
        # the HSM imports, then the answer is lost: looking first finds the version
        [{"kind": "drop", "method": "PUT", "path": "/keys/*", "count": 1, "phase": "after"}],
        [{"kind": "503", "method": "PUT", "path": "/keys/*", "count": 1, "phase": "after"}],
    ],
    ids=["429-on-import", "503-on-get", "drop-on-import", "mixed", "done-then-dropped", "done-then-503"],
)  # fmt: skip
def test_faults_end_imported(
    stack: Stack, faults: list[dict[str, Any]], request: pytest.FixtureRequest
) -> None:
    pkg = stack.package("ec-p256", "fault-" + request.node.callspec.id)
    stack.drop_package(pkg)
    for rule in faults:
        stack.hsm.inject_fault(rule.pop("kind"), **rule)
    try:
        outcome = None
        for _ in range(stack.settings.max_attempts):
            try:
                outcome = stack.deliver(pkg.name)
                break
            except InProgress:  # a dropped PUT may still run: the platform comes back later
                stack.deps.clock = lambda: utc_now() + timedelta(seconds=120)
            except TransientError:
                continue
    finally:
        stack.hsm.clear_faults()
    assert outcome is not None
    assert outcome.state == "imported"
    versions = list(stack.hsm.key_client().list_properties_of_key_versions(pkg.name[:-5]))
    assert len(versions) == 1


def test_permanent_refusal_is_not_retried(stack: Stack) -> None:
    pkg = stack.package("oct-256", "tampered")
    ct = parse_package(pkg.data).ciphertext
    doc = json.loads(pkg.data)
    doc["ciphertext"] = b64url_encode(ct[:-1] + bytes([ct[-1] ^ 0x55]))
    meta = {k: v for k, v in pkg.options.to_metadata().items() if k != "byok_package_sha256"}
    stack.drop("tampered.byok", json.dumps(doc).encode(), meta)
    since = stack.hsm.last_request_seq()
    outcome = stack.deliver("tampered.byok")
    assert (outcome.state, outcome.reason_code) == ("rejected", "hsm_refused")
    assert _puts(stack, "tampered", since) == 1


_names = itertools.count()


def _mutations() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.binary(max_size=3000),
        st.tuples(st.integers(0, 2000), st.binary(min_size=1, max_size=8)),
        st.tuples(st.integers(0, 2000), st.integers(1, 64)),
        st.dictionaries(st.sampled_from(["schema_version", "header", "ciphertext", "generator", "x"]),
                        st.one_of(st.none(), st.integers(), st.text(max_size=50),
                                  st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
                        max_size=5),
        st.dictionaries(st.sampled_from(["byok_target_type", "byok_key_ops", "byok_tags", "byok_fingerprint",
                                         "byok_package_sha256", "byok_other"]),
                        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                        max_size=3),
    )  # fmt: skip


@pytest.fixture(scope="module")
def base_packages(stack_module: Stack) -> list[bytes]:
    return [stack_module.package(t, "base").data for t in ("oct-256", "ec-p256", "rsa-2048")]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation=_mutations(), which=st.integers(0, 2))
def test_arbitrary_and_mutated_packages_end_typed(
    stack_module: Stack, base_packages: list[bytes], mutation: Any, which: int
) -> None:
    stack = stack_module
    base = base_packages[which]
    meta: dict[str, str] = {}
    if isinstance(mutation, bytes):
        data = mutation
    elif isinstance(mutation, tuple) and isinstance(mutation[1], bytes):
        pos, chunk = mutation
        pos %= len(base)
        data = base[:pos] + chunk + base[pos + len(chunk) :]
    elif isinstance(mutation, tuple):
        pos, cut = mutation
        pos %= len(base)
        data = base[:pos] + base[pos + cut :]
    elif mutation and all(k.startswith("byok_") for k in mutation):
        # a fresh package (never a duplicate) with its genuine metadata, partly overridden
        fresh = stack.package(("oct-256", "ec-p256", "oct-128")[which], f"hm{next(_names)}")
        data, meta = fresh.data, {**fresh.options.to_metadata(), **mutation}
    else:
        data = json.dumps(mutation).encode()
    name = f"h{next(_names)}.byok" if not meta else f"hm{next(_names)}.byok"
    stack.drop(name, data, meta)
    outcome = None
    for _ in range(3):
        try:
            outcome = stack.deliver(name)
            break
        except InProgress:
            continue
    assert outcome is not None
    assert outcome.state in {"imported", "rejected", "verification_failed", "duplicate"}
    if outcome.state == "rejected":
        assert outcome.reason_code in REASONS
    assert stack.blobs(stack.settings.incoming_container) == []
