"""A KEK's public facts for custodians: kid, PEM, SPKI SHA-256, size, operations, validity."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from byok_pipeline.adapters.keyvault import HsmAdapter
from byok_pipeline.audit.events import utc_now
from byok_pipeline.core.validation import check_kek_facts
from offline_packager.kek import Kek
from offline_packager.kid import KeyId


def kek_info(hsm: HsmAdapter, kid: KeyId, *, request_id: str) -> dict[str, Any]:
    """Read the KEK by exact version and check it is usable.

    Raises:
        Rejected: missing, disabled, expired, not RSA, wrong size, not import-only.
        TransientError: the HSM call failed.
    """
    facts = hsm.get_kek(kid, request_id=request_id)
    kek: Kek = check_kek_facts(facts, utc_now())
    return {
        "kid": facts.kid,
        "key_size": kek.key_size,
        "key_ops": list(facts.key_ops),
        "spki_sha256": kek.fingerprint,
        "public_key_pem": kek.pem().decode("ascii"),
        "enabled": facts.enabled,
        "not_before": facts.not_before.isoformat() if facts.not_before else None,
        "expires_on": facts.expires_on.isoformat() if facts.expires_on else None,
    }


def kek_attestation(hsm: HsmAdapter, kid: KeyId, *, request_id: str) -> dict[str, Any]:
    """The KEK's attestation as the HSM answered it (``bytes``) and its SHA-256, for custodians
    to verify offline (``byok-package verify-kek-attestation``).

    Raises:
        Rejected: ``kek_missing``, ``hsm_refused``.
        TransientError: the HSM call failed.
    """
    body = hsm.key_attestation(kid, request_id=request_id)
    return {
        "bytes": body,
        "sha256": hashlib.sha256(body).hexdigest(),
        "document": json.loads(body),
    }
