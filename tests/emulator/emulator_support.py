"""Helpers for the emulator tests: packaging targets three ways and checking imported keys."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from azure.keyvault.keys import JsonWebKey, KeyClient, KeyVaultKey
from azure.keyvault.keys.crypto import EncryptionAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from managed_hsm_emulator.testing import EmulatorHandle
from managed_hsm_emulator.tls import client_context
from managed_hsm_emulator.tokens import SCOPE
from offline_packager.keytypes import TYPE_NAMES, TargetType
from offline_packager.package_format import b64url_encode, encode_package
from offline_packager.secret import SecretBytes
from offline_packager.target_keys import TargetKey, generate_target
from offline_packager.wrap import wrap_target

REPO = Path(__file__).resolve().parents[2]
ALL_TYPES = TYPE_NAMES  # the ten target types


@dataclass(frozen=True)
class Kek:
    """A KEK created in the emulator: its kid (with version), public key and PEM file."""

    key: KeyVaultKey
    kid: str
    public_key: rsa.RSAPublicKey
    pem_path: Path


def jwk_int(key: KeyVaultKey, field: str) -> int:
    """A big-endian integer field (``n``, ``e``, ``x``, ``y``) of a key's JWK."""
    value = getattr(key.key, field)
    assert isinstance(value, bytes), f"JWK has no {field}"
    return int.from_bytes(value, "big")


def create_kek(
    hsm: EmulatorHandle, client: KeyClient, name: str, tmp: Path, size: int = 2048
) -> Kek:
    """Create an import-only KEK and "download" its public key as PEM."""
    key = client.create_rsa_key(name, size=size, key_operations=["import"])
    assert key.id is not None
    public = rsa.RSAPublicNumbers(jwk_int(key, "e"), jwk_int(key, "n")).public_key()
    pem = tmp / f"{name}-{key.properties.version}.pem"
    pem.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Kek(key, key.id, public, pem)


def package_with_cli(kek: Kek, target: TargetKey, tmp: Path, name: str) -> bytes:
    """Package ``target`` with the offline packager's CLI (``byok-package wrap --key``)."""
    key_file = tmp / f"{name}.key"
    key_file.write_bytes(target.plaintext.reveal())
    out = tmp / f"{name}.byok"
    args = [sys.executable, "-m", "offline_packager", "wrap", "--kek", str(kek.pem_path)]
    args += ["--kek-kid", kek.kid, "--key", str(key_file), "--out", str(out), "--force"]
    if target.type.family == "oct":
        args += ["--key-type", "oct"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(args, check=True, capture_output=True, env=env, timeout=60)
    key_file.unlink()
    return out.read_bytes()


def package_in_process(kek_public: rsa.RSAPublicKey, kid: str, plaintext: bytes) -> bytes:
    """Package arbitrary plaintext with the library (for refusal cases the CLI would refuse)."""
    ciphertext = wrap_target(kek_public, SecretBytes(plaintext))
    return encode_package(kid, ciphertext, "emulator tests")


def openssl_package(kek: Kek, plaintext: bytes, tmp: Path) -> bytes:
    """Build a package with the OpenSSL CLI only (byok-facts.md section 2)."""
    aes = tmp / "aes.bin"
    aes.write_bytes(os.urandom(32))
    target = tmp / "target.der"
    target.write_bytes(plaintext)
    rsa_part = subprocess.run(
        ["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", str(kek.pem_path),
         "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1",
         "-pkeyopt", "rsa_mgf1_md:sha1", "-in", str(aes)],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    kwp_part = subprocess.run(
        ["openssl", "enc", "-id-aes256-wrap-pad", "-iv", "A65959A6",
         "-K", aes.read_bytes().hex(), "-in", str(target)],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    aes.unlink()
    target.unlink()
    doc = {
        "schema_version": "1.0.0",
        "header": {"kid": kek.kid, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
        "ciphertext": b64url_encode(rsa_part + kwp_part),
        "generator": "openssl cli",
    }
    return json.dumps(doc, indent=2).encode()


def jwk_for(target_type: TargetType, package: bytes) -> JsonWebKey:
    """The JWK the SDK sends for a BYOK import of ``package`` as ``target_type``."""
    return JsonWebKey(
        kty=target_type.kty,
        crv=target_type.crv,
        key_ops=list(target_type.default_key_ops),
        t=package,
    )


def kcv_block(aes_key: bytes) -> bytes:
    """AES-ECB(key, zero block) = AES-CBC(key, zero IV, zero block): the full check block."""
    enc = Cipher(algorithms.AES(aes_key), modes.CBC(bytes(16))).encryptor()
    return enc.update(bytes(16)) + enc.finalize()


def assert_is_packaged_key(hsm: EmulatorHandle, imported: KeyVaultKey, target: TargetKey) -> None:
    """Prove the HSM key is the packaged one (public numbers + a signature, or the KCV)."""
    ttype = target.type
    assert imported.key_type == ttype.kty
    crypto = hsm.crypto_client(imported)
    if ttype.family == "oct":
        alg = EncryptionAlgorithm(f"A{ttype.key_size}CBC")
        result = crypto.encrypt(alg, bytes(16), iv=bytes(16))
        assert result.ciphertext == kcv_block(target.plaintext.reveal())
        return
    digest = hashlib.sha256(b"proof of possession").digest()
    public = target.public_key
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        assert jwk_int(imported, "n") == numbers.n
        assert jwk_int(imported, "e") == numbers.e
        sig = crypto.sign(SignatureAlgorithm.rs256, digest).signature
        public.verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers_ec = public.public_numbers()
    assert jwk_int(imported, "x") == numbers_ec.x
    assert jwk_int(imported, "y") == numbers_ec.y
    alg_name, hash_alg = {
        "P-256": ("ES256", hashes.SHA256()),
        "P-384": ("ES384", hashes.SHA384()),
        "P-521": ("ES512", hashes.SHA512()),
        "P-256K": ("ES256K", hashes.SHA256()),
    }[str(ttype.crv)]
    h = hashes.Hash(hash_alg)
    h.update(b"proof of possession")
    ec_digest = h.finalize()
    sig = crypto.sign(SignatureAlgorithm(alg_name), ec_digest).signature
    size = len(sig) // 2
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
    )
    public.verify(der, ec_digest, ec.ECDSA(utils.Prehashed(hash_alg)))


def secret_encodings(secret: bytes) -> dict[str, bytes]:
    """The ways a secret could leak into a text file: raw, hex, base64, base64url."""
    b64 = base64.b64encode(secret)
    return {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": b64.rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(secret).rstrip(b"="),
    }


def scan_for(paths: list[Path], secret: bytes) -> list[str]:
    """Files (and encodings) in which ``secret`` appears."""
    found = []
    for path in paths:
        data = path.read_bytes()
        for how, needle in secret_encodings(secret).items():
            if needle in data:
                found.append(f"{path.name}:{how}")
    return found


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def make_targets() -> dict[str, TargetKey]:
    """One target of each of the ten types (RSA generation is slow: call once)."""
    return {name: generate_target(name) for name in ALL_TYPES}


def error_of(exc: Any) -> tuple[int, str, str]:
    """(status, code, message) of an ``HttpResponseError``."""
    err = exc.value if hasattr(exc, "value") else exc
    body = err.response.json()
    return err.status_code, body["error"]["code"], body["error"]["message"]


# --- ports, addresses and raw HTTP ------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None if it has none."""
    candidates: list[str] = []
    with contextlib.suppress(OSError):
        candidates.append(socket.gethostbyname(socket.gethostname()))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("192.0.2.1", 9))  # UDP connect only picks a route: nothing is sent
        candidates.append(udp.getsockname()[0])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
        candidates += re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    for candidate in candidates:
        with contextlib.suppress(ValueError):
            addr = ipaddress.ip_address(candidate)
            if not addr.is_loopback and not addr.is_unspecified:
                return candidate
    return None


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]  # lower-case names (the last value of a repeated header)
    body: Any  # parsed JSON, or None


def bearer(hsm: EmulatorHandle) -> str:
    return f"Bearer {hsm.credential().get_token(SCOPE).token}"


@contextlib.contextmanager
def tls_connection(
    hsm: EmulatorHandle, address: str = "127.0.0.1", timeout: float = 10.0
) -> Iterator[ssl.SSLSocket]:
    """One TLS connection to the emulator (the certificate is checked as ``localhost``)."""
    ctx = client_context(str(hsm.ca))
    with (
        socket.create_connection((address, hsm.port), timeout=timeout) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        yield tls


def read_reply(fp: IO[bytes]) -> RawReply:
    """Read one HTTP/1.1 response with a Content-Length body from ``fp``."""
    status_line = fp.readline()
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", status_line)
    assert match, f"not an HTTP response: {status_line[:60]!r}"
    headers: dict[str, str] = {}
    while (line := fp.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    data = fp.read(int(headers.get("content-length", "0")))
    return RawReply(int(match.group(1)), headers, json.loads(data) if data else None)


def server_closed(tls: ssl.SSLSocket, fp: IO[bytes], wait: float = 3.0) -> bool:
    """Whether the server closed the connection (EOF) within ``wait`` seconds."""
    tls.settimeout(wait)
    try:
        return fp.read(1) == b""
    except TimeoutError:
        return False
    except (ConnectionResetError, ssl.SSLError):
        return True


def exchange(
    hsm: EmulatorHandle,
    data: bytes,
    *,
    replies: int,
    address: str = "127.0.0.1",
    close_wait: float | None = 3.0,
) -> tuple[list[RawReply], bool]:
    """Send raw bytes on one connection, read ``replies`` responses; also report whether the
    server then closed the connection within ``close_wait`` seconds (False: still open; None:
    do not wait, report False). The emulator closes right after the reply when it closes at
    all, so a short ``close_wait`` suffices to show a connection stays open."""
    with tls_connection(hsm, address) as tls:
        tls.sendall(data)
        fp = tls.makefile("rb")
        out = [read_reply(fp) for _ in range(replies)]
        return out, close_wait is not None and server_closed(tls, fp, close_wait)


def http_request(
    method: str, target: str, headers: dict[str, str] | list[tuple[str, str]], body: bytes = b""
) -> bytes:
    """The bytes of one HTTP/1.1 request, headers exactly as given (nothing added)."""
    items = headers.items() if isinstance(headers, dict) else headers
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in items)
    return head.encode("latin-1") + b"\r\n" + body
