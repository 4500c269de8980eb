"""Shared test helpers (importable from any test: pytest's pythonpath includes tests/)."""

from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
SHARED_VECTORS = REPO.parent / "shared" / "vectors"
VENDOR_SAMPLE = REPO / "tests" / "vectors" / "securosys-primus-rsa4096.byok"


def write_kek(tmp: Path, key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
    """Write a KEK's public PEM and private PEM (for the OpenSSL CLI unwrap) into ``tmp``."""
    pub = tmp / f"kek{key.key_size}.pem"
    priv = tmp / f"kek{key.key_size}.key"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pub, priv


def make_kid(name: str = "kek", host: str = "contoso.managedhsm.azure.net") -> str:
    return f"https://{host}/keys/{name}/{secrets.token_hex(16)}"


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound once to find it free, then closed): a
    connection to it is refused at once, as to a stopped service."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def write_ec_key(path: Path) -> Path:
    """A fresh EC P-256 private key as unencrypted PKCS#8 PEM at ``path`` (a person's audit
    key, an approver's key)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


class FakeClock:
    """A monotonic clock (seconds) that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now
