"""``byok audit init``: create the pipeline's audit signing key inside the Managed HSM.

An EC P-256 ``EC-HSM`` key whose only operations are ``sign`` and ``verify``; it is never
exportable. The Function identity then gets a role that lets it sign with this key and nothing
else (``infra/assign-hsm-roles.sh --audit-key NAME``). The command prints the versioned kid (the
Function's ``BYOK_AUDIT_SIGNING_KID``) and the trust-file entry an auditor pins
(``byok audit verify --trust FILE``). Needs keys/create on the HSM (an HSM administrator).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from byok_pipeline.core.errors import Rejected

DEFAULT_NAME = "byok-audit-signer"


def add_init_parser(audit_sub: Any, common: argparse.ArgumentParser) -> None:
    init = audit_sub.add_parser(
        "init",
        parents=[common],
        help="create the pipeline's audit signing key (EC P-256, sign only) in the HSM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--name", default=DEFAULT_NAME, help=f"key name (default {DEFAULT_NAME})")
    init.add_argument(
        "--new-version",
        action="store_true",
        help="rotate: add a version to an existing signing key (old kids stay in the trust file)",
    )


def trust_entry(kid: str, public_key: Any, role: str, name: str | None = None) -> dict[str, Any]:
    """One signer of a trust file (``byok audit verify --trust``)."""
    from cryptography.hazmat.primitives import serialization

    from byok_pipeline.audit.signers import spki_sha256

    entry: dict[str, Any] = {
        "kid": kid,
        "spki_sha256": spki_sha256(public_key),
        "role": role,
        "public_key_pem": public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
    }
    if name:
        entry["name"] = name
    return entry


def cmd_init(args: argparse.Namespace, *, hsm: Any, out: Any) -> int:
    """Raises: Rejected (``kek_exists``-like ``audit_key_exists``), TransientError."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    from byok_pipeline.adapters.keyvault import translate
    from byok_pipeline.audit.signers import p256_public_key

    client = hsm.client
    try:
        client.get_key(args.name)
        exists = True
    except ResourceNotFoundError:
        exists = False
    except AzureError as exc:
        raise translate(exc, "reading the audit signing key") from None
    if exists and not args.new_version:
        raise Rejected(
            "audit_key_exists",
            f"a key named {args.name} exists; pass --new-version to rotate it",
        )
    try:
        key = client.create_ec_key(
            args.name,
            curve="P-256",
            key_operations=["sign", "verify"],
            hardware_protected=True,
        )
    except AzureError as exc:
        raise translate(exc, "creating the audit signing key") from None
    jwk: Any = key.key  # JsonWebKey sets its fields dynamically
    public = p256_public_key(jwk)
    entry = trust_entry(str(key.id), public, "pipeline", "pipeline")
    out(
        args,
        {"kid": str(key.id), "trust_entry": entry},
        f"created audit signing key {key.id}\n"
        f"  set BYOK_AUDIT_SIGNING_KID={key.id} on the Function\n"
        f"  trust-file entry (byok audit verify --trust FILE):\n"
        + json.dumps({"signers": [entry]}, indent=2),
    )
    return 0
