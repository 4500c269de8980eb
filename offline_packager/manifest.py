"""The package manifest: public facts about a package, for import and later verification.

Schema: ``offline_packager/schemas/manifest.schema.json``. Holds no secret.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from . import TOOL_NAME, __version__
from .errors import PackageFormatError
from .kek import Kek
from .kid import KeyId
from .target_keys import TargetPublic

MANIFEST_VERSION = "1.0"
SCHEMA_FILE = "schemas/manifest.schema.json"


def build_manifest(
    *,
    created: datetime,
    kek: Kek,
    kek_kid: KeyId,
    target: TargetPublic,
    key_ops: Sequence[str],
    key_source: Mapping[str, str],
    package_name: str,
    package_bytes: bytes,
    kek_attestation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest document for one package (``kek_attestation``: the verified
    attestation's record, :meth:`~.attestation.AttestationResult.to_manifest`)."""
    t = target.type
    target_doc: dict[str, Any] = {"type": t.name, "kty": t.kty}
    if t.key_size is not None:
        target_doc["key_size"] = t.key_size
    if t.crv is not None:
        target_doc["crv"] = t.crv
    target_doc["key_ops"] = list(key_ops)
    target_doc["fingerprint"] = {"kind": target.fingerprint.kind, "value": target.fingerprint.value}
    pem = target.public_pem()
    if pem is not None:
        target_doc["public_key_pem"] = pem
    kek_doc: dict[str, Any] = {
        "kid": kek_kid.kid,
        "spki_sha256": kek.fingerprint,
        "key_size": kek.key_size,
    }
    if kek_attestation is not None:
        kek_doc["attestation"] = dict(kek_attestation)
    return {
        "schema_version": MANIFEST_VERSION,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generator": {"tool": TOOL_NAME, "version": __version__, "key_source": dict(key_source)},
        "kek": kek_doc,
        "target": target_doc,
        "package": {
            "file_name": package_name,
            "sha256": hashlib.sha256(package_bytes).hexdigest(),
            "size": len(package_bytes),
        },
    }


def parse_manifest(doc: object) -> dict[str, Any]:
    """Minimal structural check of a manifest read back (the JSON Schema is the full contract).

    Raises:
        PackageFormatError: reason ``bad_manifest``.
    """
    if not isinstance(doc, dict) or doc.get("schema_version") != MANIFEST_VERSION:
        raise PackageFormatError(
            "not a byok-package manifest (schema_version 1.0)", reason="bad_manifest"
        )
    for section in ("kek", "target", "package"):
        if not isinstance(doc.get(section), dict):
            raise PackageFormatError(
                f"manifest lacks the {section!r} section", reason="bad_manifest"
            )
    return doc
