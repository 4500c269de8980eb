"""Import options carried as blob metadata (written by ``byok upload``), strictly parsed."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from byok_pipeline.core.errors import Rejected
from offline_packager.guard import refuses
from offline_packager.keytypes import TARGET_TYPES, TargetType
from offline_packager.package_format import shown
from offline_packager.target_keys import Fingerprint

PREFIX = "byok_"
META_TARGET_TYPE = "byok_target_type"
META_KEY_OPS = "byok_key_ops"
META_TAGS = "byok_tags"
META_FINGERPRINT = "byok_fingerprint"
META_PACKAGE_SHA256 = "byok_package_sha256"
META_MANIFEST_SHA256 = "byok_manifest_sha256"
META_UPLOADER = "byok_uploader"
META_KEK_SHA256 = "byok_kek_sha256"
KNOWN = frozenset(
    {
        META_TARGET_TYPE,
        META_KEY_OPS,
        META_TAGS,
        META_FINGERPRINT,
        META_PACKAGE_SHA256,
        META_MANIFEST_SHA256,
        META_UPLOADER,
        META_KEK_SHA256,
    }
)
# fullmatch only (``$`` matches before a final newline)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KCV = re.compile(r"[0-9A-F]{6}")
_MAX_TAGS_TEXT = 8192  # ten tags of 256 + 256 characters, JSON-quoted, fit easily
# the tags the pipeline writes on an imported version (adapters.keyvault): what finds a version
# again (exactly-once, take-over), never from an uploader (any case: a reader may fold it)
_RESERVED_TAGS = frozenset({"byok-package-sha256", "byok-package-id", "byok-kek-kid"})
MAX_TAGS = 10
_KNOWN_KEY_OPS = frozenset(op for t in TARGET_TYPES.values() for op in t.allowed_key_ops)


@dataclass(frozen=True)
class ImportOptions:
    """What the uploader stated; every field optional (a plain vendor .byok has none)."""

    target_type: TargetType | None = None
    key_ops: tuple[str, ...] | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    fingerprint: Fingerprint | None = None
    package_sha256: str | None = None
    manifest_sha256: str | None = None
    uploader: str | None = None
    kek_spki_sha256: str | None = None  # the KEK the manifest says the package was wrapped under

    def to_metadata(self) -> dict[str, str]:
        """The blob metadata that carries these options."""
        meta: dict[str, str] = {}
        if self.target_type is not None:
            meta[META_TARGET_TYPE] = self.target_type.name
        if self.key_ops is not None:
            meta[META_KEY_OPS] = ",".join(self.key_ops)
        if self.tags:
            meta[META_TAGS] = json.dumps(dict(self.tags), ensure_ascii=True, sort_keys=True)
        if self.fingerprint is not None:
            meta[META_FINGERPRINT] = f"{self.fingerprint.kind}:{self.fingerprint.value}"
        if self.package_sha256:
            meta[META_PACKAGE_SHA256] = self.package_sha256
        if self.manifest_sha256:
            meta[META_MANIFEST_SHA256] = self.manifest_sha256
        if self.uploader:
            meta[META_UPLOADER] = self.uploader
        if self.kek_spki_sha256:
            meta[META_KEK_SHA256] = self.kek_spki_sha256
        return meta


def _bad(message: str) -> Rejected:
    return Rejected("bad_metadata", message)


def _flat_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of the tags JSON; a tag named twice is refused (not silently the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad("tags name a tag twice")
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise _bad(f"tags hold the invalid JSON constant {name}")


def _no_number(_text: str) -> None:
    raise _bad("tag values must be strings, not numbers")


@refuses(_bad)
def parse_fingerprint(text: str) -> Fingerprint:
    """``spki-sha256:<64 hex>`` or ``kcv:<6 hex>``.

    Raises:
        Rejected: reason ``bad_metadata``.
    """
    kind, _, value = text.partition(":")
    if kind == "spki-sha256" and _HEX64.fullmatch(value.lower()):
        return Fingerprint(kind, value.lower())
    if kind == "kcv" and _KCV.fullmatch(value.upper()):
        return Fingerprint(kind, value.upper())
    raise _bad("fingerprint must be spki-sha256:<64 hex> or kcv:<6 hex>")


@refuses(_bad)
def parse_tags(text: str) -> dict[str, str]:
    """A JSON object of at most 10 string tags, none of the pipeline's reserved names.

    Raises:
        Rejected: reason ``bad_metadata``.
    """
    if len(text) > _MAX_TAGS_TEXT:
        raise _bad(f"tags are over {_MAX_TAGS_TEXT} characters")
    try:
        tags: Any = json.loads(
            text,
            object_pairs_hook=_flat_object,
            parse_constant=_no_constant,
            parse_int=_no_number,
            parse_float=_no_number,
        )
    except (ValueError, RecursionError):
        raise _bad("tags must be a JSON object") from None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 256 and len(v) <= 256
        for k, v in tags.items()
    ):
        raise _bad("tags must be a JSON object of short strings")
    if len(tags) > MAX_TAGS:
        raise _bad(f"at most {MAX_TAGS} tags")
    if _RESERVED_TAGS & {name.casefold() for name in tags}:
        raise _bad(f"tag names {sorted(_RESERVED_TAGS)} are reserved for the pipeline")
    return tags


@refuses(_bad)
def parse_metadata(meta: Mapping[str, str]) -> ImportOptions:
    """Parse blob metadata (case-insensitive names; unknown ``byok_`` names are refused).

    Raises:
        Rejected: reason ``bad_metadata``.
    """
    lower = {k.lower(): v for k, v in meta.items()}
    unknown = [k for k in lower if k.startswith(PREFIX) and k not in KNOWN]
    if unknown:
        raise _bad(f"unknown metadata: {shown(unknown)}")
    target: TargetType | None = None
    if META_TARGET_TYPE in lower:
        target = TARGET_TYPES.get(lower[META_TARGET_TYPE].lower())
        if target is None:
            raise _bad(f"unknown target type {shown([lower[META_TARGET_TYPE]])}")
    key_ops: tuple[str, ...] | None = None
    if META_KEY_OPS in lower:
        key_ops = tuple(
            dict.fromkeys(o.strip(" ") for o in lower[META_KEY_OPS].split(",") if o.strip(" "))
        )
        if not key_ops:
            raise _bad("key ops is empty")
        unknown_ops = [o for o in key_ops if o not in _KNOWN_KEY_OPS]
        if unknown_ops:
            raise _bad(f"unknown key operations {shown(unknown_ops)}")
        if target is not None:
            bad = [o for o in key_ops if o not in target.allowed_key_ops]
            if bad:
                raise _bad(f"key ops {shown(bad)} not allowed for {target.name}")
    for name in (META_PACKAGE_SHA256, META_MANIFEST_SHA256, META_KEK_SHA256):
        if name in lower and not _HEX64.fullmatch(lower[name]):
            raise _bad(f"{name} must be 64 lower-case hex digits")
    fingerprint = parse_fingerprint(lower[META_FINGERPRINT]) if META_FINGERPRINT in lower else None
    if fingerprint is not None and target is not None:
        expected_kind = "kcv" if target.family == "oct" else "spki-sha256"
        if fingerprint.kind != expected_kind:
            raise _bad(f"a {target.name} key is checked by {expected_kind}, not {fingerprint.kind}")
    uploader = lower.get(META_UPLOADER)
    if uploader is not None and len(uploader) > 256:
        raise _bad("uploader is too long")
    return ImportOptions(
        target_type=target,
        key_ops=key_ops,
        tags=parse_tags(lower[META_TAGS]) if META_TAGS in lower else {},
        fingerprint=fingerprint,
        package_sha256=lower.get(META_PACKAGE_SHA256),
        manifest_sha256=lower.get(META_MANIFEST_SHA256),
        uploader=uploader,
        kek_spki_sha256=lower.get(META_KEK_SHA256),
    )


@refuses(_bad)
def options_from_manifest(
    manifest: Mapping[str, Any], manifest_sha256: str | None = None
) -> ImportOptions:
    """Import options from a byok-package manifest (``byok upload/import --manifest``).

    Raises:
        Rejected: reason ``bad_metadata`` when the manifest's values are invalid.
    """
    target = manifest.get("target", {})
    fp = target.get("fingerprint") or {}
    meta = {
        META_TARGET_TYPE: str(target.get("type", "")),
        META_KEY_OPS: ",".join(target.get("key_ops") or []),
        META_FINGERPRINT: f"{fp.get('kind')}:{fp.get('value')}",
        META_PACKAGE_SHA256: str(manifest.get("package", {}).get("sha256", "")),
        META_KEK_SHA256: str(manifest.get("kek", {}).get("spki_sha256", "")),
    }
    if manifest_sha256:
        meta[META_MANIFEST_SHA256] = manifest_sha256
    return parse_metadata({k: v for k, v in meta.items() if v})
