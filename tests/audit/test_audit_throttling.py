"""The audit trail's own throttling (its HSM signature, its storage append) is throttling too:
never an attempt, never a `failed` package, and nothing imported until the trail records."""

from __future__ import annotations

from dataclasses import replace

import pytest
from audit_support import Audited
from azure.core.exceptions import ResourceNotFoundError

from byok_pipeline.core.errors import TransientError
from byok_pipeline.processing.processor import process_blob


def test_a_throttled_audit_signature_is_not_an_attempt(audited: Audited) -> None:
    stack = audited.stack
    stack.deps.settings = replace(stack.deps.settings, max_attempts=1)
    pkg = stack.package("ec-p256", "signer-throttled")
    stack.drop_package(pkg)
    stack.hsm.inject_fault("429", method="POST", path="/keys/byok-audit-signer/*/sign",
                           retry_after=0)  # fmt: skip
    try:
        for _ in range(3):  # three times the attempts allowed
            with pytest.raises(TransientError) as caught:
                process_blob(pkg.name, stack.deps)
            assert caught.value.throttled, caught.value.message
    finally:
        stack.hsm.clear_faults()
    doc = stack.deps.store.status_by_name(pkg.name)
    assert doc is not None
    assert (doc.state, doc.attempts) == ("importing", 0)
    assert doc.throttled_until is not None
    with pytest.raises(ResourceNotFoundError):  # nothing imported while the trail cannot record
        stack.hsm.key_client().get_key(pkg.name[:-5])
    outcome = process_blob(pkg.name, stack.deps)
    assert outcome.state == "imported"
    assert outcome.doc is not None
    assert outcome.doc.attempts == 1
