"""Durable key state: one JSON file per key name under ``DIR/keys``, loaded at start.

Memory holds the truth while the emulator runs; every change rewrites that name's file
atomically (temp file, fsync, rename, fsync directory) before the request is answered. Key
material is stored only sealed (:mod:`.sealing`) and unsealed lazily on first use.
All access goes through :attr:`KeyStore.lock`.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .datadir import DataDir, atomic_write
from .errors import StartupError
from .material import KeyMaterial, family_of
from .model import DeletedInfo, KeyAttributes, KeyRecord, KeyVersion
from .sealing import Sealer

FORMAT = 1


def _version_to_json(v: KeyVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "seq": v.seq,
        "kty": f"{v.family}-HSM",
        "key_ops": list(v.key_ops),
        "attributes": v.attributes.to_json(),
        "tags": v.tags,
        "public": v.public,
        "origin": v.origin,
        "sealed": base64.b64encode(v.sealed).decode("ascii"),
    }


def _version_from_json(name: str, d: dict[str, Any]) -> KeyVersion:
    return KeyVersion(
        name=name,
        version=str(d["version"]),
        seq=int(d["seq"]),
        family=family_of(d["kty"]),
        key_ops=tuple(d["key_ops"]),
        attributes=KeyAttributes.from_json(d["attributes"]),
        tags=dict(d["tags"]),
        public=dict(d["public"]),
        sealed=base64.b64decode(d["sealed"]),
        origin=d["origin"],
    )


def record_to_json(record: KeyRecord) -> bytes:
    doc = {
        "format": FORMAT,
        "name": record.name,
        "deleted": None
        if record.deleted is None
        else {
            "deletedDate": record.deleted.deleted_date,
            "scheduledPurgeDate": record.deleted.scheduled_purge_date,
        },
        "versions": [_version_to_json(v) for v in record.versions],
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")


def record_from_json(data: bytes) -> KeyRecord:
    doc = json.loads(data)
    if doc.get("format") != FORMAT:
        raise ValueError("unknown key file format")
    name = str(doc["name"])
    deleted = doc.get("deleted")
    return KeyRecord(
        name=name,
        versions=[_version_from_json(name, v) for v in doc["versions"]],
        deleted=None
        if deleted is None
        else DeletedInfo(int(deleted["deletedDate"]), int(deleted["scheduledPurgeDate"])),
    )


class KeyStore:
    """Key records by lower-case name (Key Vault names are case-insensitive)."""

    def __init__(self, paths: DataDir, sealer: Sealer) -> None:
        self._paths = paths
        self._sealer = sealer
        self._records: dict[str, KeyRecord] = {}
        self._seq = 0
        self.lock = threading.RLock()

    def load(self) -> None:
        """Read every key file.

        Raises:
            StartupError: reason ``damaged_state`` naming the unreadable file.
        """
        with self.lock:
            for path in sorted(self._paths.keys_dir.glob("*.json")):
                try:
                    record = record_from_json(path.read_bytes())
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise StartupError(
                        f"key file {path.name} cannot be read ({type(exc).__name__})",
                        reason="damaged_state",
                    ) from None
                self._records[record.name.lower()] = record
                for v in record.versions:
                    self._seq = max(self._seq, v.seq)

    def next_seq(self) -> int:
        with self.lock:
            self._seq += 1
            return self._seq

    def get(self, name: str) -> KeyRecord | None:
        with self.lock:
            return self._records.get(name.lower())

    def records(self) -> Iterator[KeyRecord]:
        """All records sorted by lower-case name (a snapshot)."""
        with self.lock:
            items = sorted(self._records.items())
        return iter([r for _, r in items])

    def save(self, record: KeyRecord) -> None:
        """Persist a new or changed record (durable when this returns)."""
        with self.lock:
            atomic_write(self._path(record.name), record_to_json(record))
            self._records[record.name.lower()] = record

    def remove(self, name: str) -> None:
        """Forget a record and delete its file (purge)."""
        with self.lock:
            self._records.pop(name.lower(), None)
            self._path(name).unlink(missing_ok=True)

    def material(self, v: KeyVersion) -> KeyMaterial:
        """The key material of a version, unsealed on first use and cached.

        Raises:
            SealError: the sealed blob cannot be opened.
        """
        if v.material is None:
            with self._sealer.open(v.sealed, name=v.name, version=v.version) as plain:
                v.material = KeyMaterial.from_storage(v.family, plain)
        return v.material

    def seal(self, material: KeyMaterial, *, name: str, version: str) -> bytes:
        with material.to_storage() as plain:
            return self._sealer.seal(plain, name=name, version=version)

    def _path(self, name: str) -> Path:
        return self._paths.keys_dir / f"{name.lower()}.json"
