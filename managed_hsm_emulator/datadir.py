"""The emulator's data directory: file layout, atomic writes and secret files.

Layout (all created on first start)::

    DIR/ca.pem, ca.key             the emulator's own CA (clients trust ca.pem)
    DIR/server.pem, server.key     the HTTPS certificate (SAN 127.0.0.1, ::1, localhost)
    DIR/token.key                  HMAC key that signs and checks access tokens (0600)
    DIR/master.key                 AES-256 key that encrypts key material at rest (0600)
    DIR/keys/<name>.json           one file per key name: versions, attributes, sealed material,
                                   and a MAC over the whole record (format 2)
    DIR/keys/FORMAT                "2": every key file here must carry its MAC
    DIR/identity.json              the port this emulator's kids carry (see identity.py)
    DIR/requests.jsonl             request log: method, path, status, client request id
    DIR/endpoint.json              {"url": ..., "ca": ...} while the emulator runs
    DIR/emulator.lock              held while an emulator serves this directory
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import StartupError


@dataclass(frozen=True)
class DataDir:
    """Paths inside one emulator data directory."""

    root: Path

    @property
    def ca_pem(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_pem(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def token_key(self) -> Path:
        return self.root / "token.key"

    @property
    def master_key(self) -> Path:
        return self.root / "master.key"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def key_format(self) -> Path:
        return self.keys_dir / "FORMAT"

    @property
    def identity(self) -> Path:
        return self.root / "identity.json"

    @property
    def request_log(self) -> Path:
        return self.root / "requests.jsonl"

    @property
    def endpoint(self) -> Path:
        return self.root / "endpoint.json"

    @property
    def lock(self) -> Path:
        return self.root / "emulator.lock"

    @property
    def attestation_test_root(self) -> Path:
        """The TEST root that signs the emulator's key attestations (``--trust-test-root``)."""
        return self.root / "attestation-test-root.pem"

    @property
    def attestation_chain(self) -> Path:
        return self.root / "attestation-chain.pem"

    @property
    def attestation_partition_key(self) -> Path:
        return self.root / "attestation-partition.key"

    def create(self) -> None:
        """Create the directory tree (mode 0700 for new directories).

        Raises:
            StartupError: reason ``data_dir`` if it cannot be created.
        """
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create data directory {self.root}: {exc.strerror}", reason="data_dir"
            ) from None


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (best effort where unsupported)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the directory.

    Readers see the old content or the new one, never a mix. Raises ``OSError`` on failure
    (the temp file is removed).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_or_create_secret(path: Path, nbytes: int) -> bytes:
    """Read a secret key file, creating it (0600, random bytes) if it does not exist.

    Raises:
        StartupError: reason ``secret_file`` if it has the wrong length or is readable by
            others (group/other permission bits set).
    """
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # lost a race with another writer
            atomic_write(path, secrets.token_bytes(nbytes), mode=0o600)
    st = path.stat()
    if st.st_mode & 0o077:
        raise StartupError(
            f"{path.name} is accessible by other users (mode {st.st_mode & 0o777:o}); "
            "it must be 0600",
            reason="secret_file",
        )
    data = path.read_bytes()
    if len(data) != nbytes:
        raise StartupError(
            f"{path.name} has {len(data)} bytes, expected {nbytes}; it is damaged",
            reason="secret_file",
        )
    return data
