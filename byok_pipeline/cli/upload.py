"""``byok upload``: drop a package with its import options as blob metadata."""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

from byok_pipeline.adapters.blobstore import BlobStore
from byok_pipeline.cli.files import read_local
from byok_pipeline.core.errors import Rejected
from byok_pipeline.core.metadata import ImportOptions, options_from_manifest
from offline_packager.manifest import parse_manifest
from offline_packager.package_format import load_json_strict


def default_uploader() -> str:
    """``user@host`` of the person running the CLI (self-declared, recorded for the audit)."""
    return f"{getpass.getuser()}@{socket.gethostname()}"[:256]


#: A manifest larger than this is not a byok-package manifest.
MAX_MANIFEST_BYTES = 1024 * 1024


def read_manifest_file(path: Path | None) -> tuple[Path, bytes] | None:
    """A manifest's path and exact bytes (None: no manifest).

    Raises:
        Rejected: ``file_not_found``, ``unreadable_input``, ``plaintext_key``,
            ``bad_metadata`` (over 1 MiB).
    """
    if path is None:
        return None
    return path, read_local(
        path, what="manifest", limit=MAX_MANIFEST_BYTES, too_large="bad_metadata"
    )


def read_manifest(path: Path, raw: bytes) -> tuple[dict[str, Any], str]:
    """A manifest (read from ``path``) and the SHA-256 of its bytes.

    Raises:
        Rejected: ``bad_metadata`` if it is not a byok-package manifest.
    """
    try:
        doc = parse_manifest(load_json_strict(raw, what="manifest"))
    except Exception as exc:  # noqa: BLE001  # any parse failure is the same refusal
        raise Rejected("bad_metadata", f"{path} is not a byok-package manifest: {exc}") from None
    return doc, hashlib.sha256(raw).hexdigest()


def options_for(
    package: bytes, manifest: tuple[Path, bytes] | None, uploader: str | None
) -> ImportOptions:
    """Import options for a package: from its manifest when given (checked to describe it).

    Raises:
        Rejected: ``bad_metadata`` (not a manifest), ``manifest_mismatch`` when the manifest
            describes other bytes.
    """
    if manifest is None:
        return ImportOptions(uploader=uploader)
    manifest_path, raw = manifest
    doc, manifest_sha = read_manifest(manifest_path, raw)
    options = options_from_manifest(doc, manifest_sha)
    if options.package_sha256 != hashlib.sha256(package).hexdigest():
        raise Rejected(
            "manifest_mismatch", f"{manifest_path} describes another package (SHA-256 differs)"
        )
    return ImportOptions(**{**options.__dict__, "uploader": uploader})


def upload(
    store: BlobStore, blob_name: str, package: bytes, options: ImportOptions
) -> dict[str, Any]:
    """Upload into the incoming container; never replaces a waiting blob."""
    etag = store.upload_incoming(blob_name, package, options.to_metadata())
    return {
        "blob_name": blob_name,
        "container": store.settings.incoming_container,
        "etag": etag,
        "package_sha256": hashlib.sha256(package).hexdigest(),
        "metadata": options.to_metadata(),
    }


def manifest_json(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()
