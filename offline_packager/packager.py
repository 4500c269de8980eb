"""Assemble a package and its manifest from a wrapped target (software or token path)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import TOOL_NAME, __version__
from .errors import ByokError
from .kek import Kek
from .keytypes import TargetType
from .kid import KEY_NAME_RE, KeyId
from .manifest import build_manifest
from .package_format import encode_package
from .target_keys import TargetPublic

_OUT_RE = re.compile(r"(?P<name>.+)\.byok")


@dataclass(frozen=True)
class BuiltPackage:
    """The package bytes and manifest, ready to be written."""

    package_bytes: bytes
    manifest: dict[str, Any]


def key_name_from_output(out: Path) -> str:
    """The key name a package file stands for (``NAME.byok``).

    Raises:
        ByokError: reason ``bad_output_name``.
    """
    match = _OUT_RE.fullmatch(out.name)
    if match is None or not KEY_NAME_RE.fullmatch(match["name"]):
        raise ByokError(
            "the output must be named NAME.byok, NAME being the key name to import "
            "(1-127 of 0-9 a-z A-Z -)",
            reason="bad_output_name",
        )
    return match["name"]


def resolve_key_ops(target: TargetType, ops_text: str | None) -> tuple[str, ...]:
    """Parse ``--key-ops`` (comma separated) against what the key family allows.

    Raises:
        ByokError: reason ``bad_key_ops``.
    """
    if ops_text is None:
        return target.default_key_ops
    ops = tuple(dict.fromkeys(o.strip() for o in ops_text.split(",") if o.strip()))
    if not ops:
        raise ByokError("--key-ops is empty", reason="bad_key_ops")
    bad = [o for o in ops if o not in target.allowed_key_ops]
    if bad:
        raise ByokError(
            f"key operation(s) {', '.join(bad)} not allowed for {target.name}; "
            f"allowed: {', '.join(sorted(target.allowed_key_ops))}",
            reason="bad_key_ops",
        )
    return ops


def generator_text(key_source: Mapping[str, str]) -> str:
    """The package's informational ``generator`` field: tool, version and key source."""
    kind = key_source.get("kind", "software")
    if kind == "pkcs11":
        detail = " ".join(
            v for v in (key_source.get("manufacturer"), key_source.get("token_model")) if v
        )
        firmware = key_source.get("firmware")
        source = f"PKCS#11 {detail}" + (f" firmware {firmware}" if firmware else "")
    else:
        source = kind
    return f"{TOOL_NAME} {__version__}; key source: {source}"


def build_package(
    *,
    kek: Kek,
    kek_kid: KeyId,
    ciphertext: bytes,
    target: TargetPublic,
    key_ops: Sequence[str],
    key_source: Mapping[str, str],
    package_name: str,
    created: datetime,
    kek_attestation: Mapping[str, Any] | None = None,
) -> BuiltPackage:
    """Encode the package and describe it in a manifest."""
    package_bytes = encode_package(kek_kid.kid, ciphertext, generator_text(key_source))
    manifest = build_manifest(
        created=created,
        kek=kek,
        kek_kid=kek_kid,
        target=target,
        key_ops=key_ops,
        key_source=key_source,
        package_name=package_name,
        package_bytes=package_bytes,
        kek_attestation=kek_attestation,
    )
    return BuiltPackage(package_bytes, manifest)
