"""Durable key state: one JSON file per key name under ``DIR/keys``, loaded at start.

Memory holds the truth while the emulator runs; every change rewrites that name's file
atomically (temp file, fsync, rename, fsync directory) before the request is answered, and a
purge unlinks it and fsyncs the directory. Key material is stored only sealed (:mod:`.sealing`)
and unsealed lazily on first use. All access goes through :attr:`KeyStore.lock`.

Integrity: a key file (format 2) carries ``mac``, an HMAC (:meth:`.Sealer.record_mac`) over the
canonical JSON of everything else in it (name, versions with kty, key_ops, public JWK,
attributes, tags, origin, sealed material; deleted state). A file whose MAC does not match, or
that sits under another name, stops the emulator at start (reason ``key_file_tampered``).
Files of format 1 (no MAC, written before this check existed) are upgraded in place, once: the
first start that finds no ``keys/FORMAT`` marker trusts them as found, rewrites them with a MAC
and writes the marker; from then on a file without a MAC is refused like a tampered one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .datadir import DataDir, atomic_write, fsync_dir
from .errors import EmulatorError, StartupError
from .material import KeyMaterial, family_of
from .model import DeletedInfo, KeyAttributes, KeyRecord, KeyVersion
from .sealing import Sealer

LOG = logging.getLogger("managed_hsm_emulator")
FORMAT = 2
LEGACY_FORMAT = 1  # no MAC; upgraded once (see the module docstring)


class RecordIntegrityError(Exception):
    """A key file's MAC does not match its content, or the file holds another key's record."""


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


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


def record_to_json(record: KeyRecord, sealer: Sealer) -> bytes:
    """A key file: the record and a MAC over its canonical JSON."""
    doc: dict[str, Any] = {
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
    doc["mac"] = base64.b64encode(sealer.record_mac(_canonical(doc))).decode("ascii")
    return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")


def record_from_json(data: bytes, sealer: Sealer, *, file_name: str) -> tuple[KeyRecord, bool]:
    """Read a key file; returns the record and whether it is of the legacy format (no MAC).

    Raises:
        RecordIntegrityError: the MAC does not match, or ``file_name`` is not the record's file.
        ValueError, KeyError, TypeError: the file is not a key file.
    """
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise TypeError("a key file is a JSON object")
    fmt = doc.get("format")
    if fmt == FORMAT:
        mac_text = doc.pop("mac", None)
        try:
            mac = base64.b64decode(str(mac_text), validate=True)
        except (binascii.Error, ValueError):
            mac = b""
        if mac_text is None or not sealer.record_mac_ok(_canonical(doc), mac):
            raise RecordIntegrityError(
                "its MAC does not match its content (edited outside the emulator, or written "
                "under another master.key)"
            )
    elif fmt != LEGACY_FORMAT:
        raise ValueError("unknown key file format")
    name = str(doc["name"])
    if file_name != f"{name.lower()}.json":
        if fmt == FORMAT:
            raise RecordIntegrityError(f"it holds the record of key {name}, not of its own name")
        raise ValueError("the key file holds another key's record")
    deleted = doc.get("deleted")
    record = KeyRecord(
        name=name,
        versions=[_version_from_json(name, v) for v in doc["versions"]],
        deleted=None
        if deleted is None
        else DeletedInfo(int(deleted["deletedDate"]), int(deleted["scheduledPurgeDate"])),
    )
    return record, fmt == LEGACY_FORMAT


class KeyStore:
    """Key records by lower-case name (Key Vault names are case-insensitive)."""

    def __init__(self, paths: DataDir, sealer: Sealer) -> None:
        self._paths = paths
        self._sealer = sealer
        self._records: dict[str, KeyRecord] = {}
        self._seq = 0
        self.lock = threading.RLock()

    def load(self) -> None:
        """Read every key file, checking its MAC (legacy files: see the module docstring).

        Raises:
            StartupError: reason ``damaged_state`` naming an unreadable file,
                ``key_file_tampered`` naming a file that fails its integrity check.
        """
        with self.lock:
            strict = self._paths.key_format.exists()
            legacy: list[KeyRecord] = []
            for path in sorted(self._paths.keys_dir.glob("*.json")):
                record, is_legacy = self._load_file(path)
                if is_legacy and strict:
                    raise StartupError(
                        f"key file {path.name} carries no MAC (format {LEGACY_FORMAT}), but every "
                        f"key file in this data directory must ({self._paths.key_format.name}): "
                        "it was replaced or edited outside the emulator. Restore it from a "
                        "backup, or delete it (its key is then lost)",
                        reason="key_file_tampered",
                    )
                if is_legacy:
                    legacy.append(record)
                self._records[record.name.lower()] = record
                for v in record.versions:
                    self._seq = max(self._seq, v.seq)
            try:
                for record in legacy:
                    atomic_write(self._path(record.name), record_to_json(record, self._sealer))
                    LOG.warning(
                        "key file %s upgraded to format %d (integrity MAC added; its content "
                        "was trusted as found)",
                        self._path(record.name).name,
                        FORMAT,
                    )
                if not strict:
                    atomic_write(self._paths.key_format, f"{FORMAT}\n".encode(), mode=0o644)
            except OSError as exc:
                raise StartupError(
                    f"cannot write key files: {exc.strerror}", reason="data_dir"
                ) from None

    def _load_file(self, path: Path) -> tuple[KeyRecord, bool]:
        try:
            return record_from_json(path.read_bytes(), self._sealer, file_name=path.name)
        except RecordIntegrityError as exc:
            raise StartupError(
                f"key file {path.name} fails its integrity check: {exc}. Restore it from a "
                "backup, or delete it (its key is then lost)",
                reason="key_file_tampered",
            ) from None
        except (OSError, ValueError, KeyError, TypeError, EmulatorError) as exc:
            raise StartupError(
                f"key file {path.name} cannot be read ({type(exc).__name__})",
                reason="damaged_state",
            ) from None

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

    def count(self, predicate: Callable[[KeyRecord], bool]) -> int:
        """How many records satisfy ``predicate``."""
        with self.lock:
            return sum(1 for r in self._records.values() if predicate(r))

    def save(self, record: KeyRecord) -> None:
        """Persist a new or changed record (durable when this returns)."""
        with self.lock:
            atomic_write(self._path(record.name), record_to_json(record, self._sealer))
            self._records[record.name.lower()] = record

    def remove(self, name: str) -> None:
        """Forget a record and delete its file (purge; durable when this returns)."""
        with self.lock:
            self._records.pop(name.lower(), None)
            path = self._path(name)
            try:
                path.unlink()
            except FileNotFoundError:
                return
            fsync_dir(path.parent)

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
