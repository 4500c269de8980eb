"""Assemble a package and its manifest from a wrapped target (software or token path), and
write them: the per-key steps ``wrap`` and ``wrap-batch`` share."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import TOOL_NAME, __version__
from .atomic import write_files_atomically
from .errors import ByokError
from .kek import Kek
from .keytypes import TargetType
from .kid import KEY_NAME_RE, KeyId
from .manifest import build_manifest
from .package_format import encode_package
from .target_keys import TargetKey, TargetPublic
from .wrap import wrap_target

_OUT_RE = re.compile(r"(?P<name>.+)\.byok")


@dataclass(frozen=True)
class BuiltPackage:
    """The package bytes and manifest, ready to be written."""

    package_bytes: bytes
    manifest: dict[str, Any]


@dataclass(frozen=True)
class KekContext:
    """The KEK a run wraps under, loaded and checked once: the key, its versioned kid and the
    manifest record of its verified attestation (None: no attestation was given)."""

    kek: Kek
    kid: KeyId
    attestation: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Outputs:
    """Where one key's package and manifest go; ``key_name`` is the name it imports under."""

    key_name: str
    package: Path
    manifest: Path

    @classmethod
    def for_package(cls, package: Path, manifest: Path | None = None) -> Outputs:
        """``NAME.byok`` and, unless given, ``NAME.manifest.json`` beside it.

        Raises:
            ByokError: reason ``bad_output_name``.
        """
        name = key_name_from_output(package)
        return cls(name, package, manifest or package.with_name(f"{name}.manifest.json"))


@dataclass(frozen=True)
class Wrapped:
    """A target wrapped under the KEK (RSA-OAEP block || AES-KWP), with its public facts, the
    key operations it imports with and where it came from. Holds no secret."""

    ciphertext: bytes
    target: TargetPublic
    key_ops: tuple[str, ...]
    key_source: Mapping[str, str]


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


def wrap_software(
    kek: Kek, key: TargetKey, *, key_ops: str | None, key_source: Mapping[str, str]
) -> Wrapped:
    """Wrap an in-memory target under ``kek`` with a fresh AES key; the target's plaintext is
    wiped when this returns or raises.

    Raises:
        ByokError: reason ``bad_key_ops``.
    """
    with key.plaintext:
        ops = resolve_key_ops(key.type, key_ops)
        ciphertext = wrap_target(kek.public_key, key.plaintext)
    return Wrapped(ciphertext, key.public, ops, key_source)


def write_package(
    ctx: KekContext,
    outputs: Outputs,
    wrapped: Wrapped,
    *,
    created: datetime,
    force: bool,
    sync_folder: bool = True,
) -> BuiltPackage:
    """Build the package and its manifest and write both atomically: both files or neither,
    an existing file replaced only with ``force`` (``sync_folder``: as
    :func:`~.atomic.write_files_atomically`).

    Raises:
        OutputError: ``output_exists``, ``output_unwritable``.
    """
    built = build_package(
        kek=ctx.kek,
        kek_kid=ctx.kid,
        ciphertext=wrapped.ciphertext,
        target=wrapped.target,
        key_ops=wrapped.key_ops,
        key_source=wrapped.key_source,
        package_name=outputs.package.name,
        created=created,
        kek_attestation=ctx.attestation,
    )
    manifest_bytes = (json.dumps(built.manifest, indent=2) + "\n").encode()
    write_files_atomically(
        [(outputs.package, built.package_bytes), (outputs.manifest, manifest_bytes)],
        force=force,
        sync_folder=sync_folder,
    )
    return built


def package_facts(outputs: Outputs, wrapped: Wrapped, built: BuiltPackage) -> dict[str, Any]:
    """What a written package is, for a command's result: files, SHA-256, target, key ops."""
    return {
        "package": str(outputs.package),
        "manifest": str(outputs.manifest),
        "package_sha256": built.manifest["package"]["sha256"],
        "key_name": outputs.key_name,
        "target_type": wrapped.target.type.name,
        "key_ops": list(wrapped.key_ops),
        "fingerprint": built.manifest["target"]["fingerprint"],
    }
