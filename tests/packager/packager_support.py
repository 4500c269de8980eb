"""Helpers for packager tests: key files in every input format, and the OpenSSL CLI unwrap."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from offline_packager.package_format import b64url_encode, parse_package


def pkcs8(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _int(n: int) -> str:
    return b64url_encode(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))


def jwk_of(key: PrivateKeyTypes) -> dict[str, str]:
    if isinstance(key, rsa.RSAPrivateKey):
        priv = key.private_numbers()
        pub = priv.public_numbers
        return {
            "kty": "RSA", "n": _int(pub.n), "e": _int(pub.e), "d": _int(priv.d),
            "p": _int(priv.p), "q": _int(priv.q), "dp": _int(priv.dmp1),
            "dq": _int(priv.dmq1), "qi": _int(priv.iqmp),
        }  # fmt: skip
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    nums = key.private_numbers()
    size = (key.curve.key_size + 7) // 8
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521",
           "secp256k1": "P-256K"}[key.curve.name]  # fmt: skip
    return {
        "kty": "EC",
        "crv": crv,
        "x": b64url_encode(nums.public_numbers.x.to_bytes(size, "big")),
        "y": b64url_encode(nums.public_numbers.y.to_bytes(size, "big")),
        "d": b64url_encode(nums.private_value.to_bytes(size, "big")),
    }


def write_key_file(path: Path, key: PrivateKeyTypes, fmt: str, passphrase: bytes = b"") -> None:
    """Write ``key`` as pkcs8-pem, pkcs8-der, traditional-pem (PKCS#1/SEC1), traditional-der,
    encrypted-pem or jwk."""
    enc = serialization.Encoding
    pf = serialization.PrivateFormat
    none = serialization.NoEncryption()
    if fmt == "pkcs8-pem":
        path.write_bytes(key.private_bytes(enc.PEM, pf.PKCS8, none))
    elif fmt == "pkcs8-der":
        path.write_bytes(key.private_bytes(enc.DER, pf.PKCS8, none))
    elif fmt == "traditional-pem":
        path.write_bytes(key.private_bytes(enc.PEM, pf.TraditionalOpenSSL, none))
    elif fmt == "traditional-der":
        path.write_bytes(key.private_bytes(enc.DER, pf.TraditionalOpenSSL, none))
    elif fmt == "encrypted-pem":
        algo = serialization.BestAvailableEncryption(passphrase)
        path.write_bytes(key.private_bytes(enc.PEM, pf.PKCS8, algo))
    elif fmt == "jwk":
        path.write_text(json.dumps(jwk_of(key)))
    else:
        raise ValueError(fmt)


def plaintext_forms(secret: bytes) -> list[bytes]:
    """Encodings under which key material could leak into an output: raw, hex, base64(url)."""
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def openssl_unwrap(package: Path, kek_private_pem: Path, modulus_bytes: int, work: Path) -> bytes:
    """Unwrap a package with the OpenSSL CLI alone: pkeyutl OAEP-SHA1, then id-aes256-wrap-pad."""
    ciphertext = parse_package(package.read_bytes()).ciphertext
    (work / "rsa.bin").write_bytes(ciphertext[:modulus_bytes])
    (work / "kwp.bin").write_bytes(ciphertext[modulus_bytes:])
    subprocess.run(
        ["openssl", "pkeyutl", "-decrypt", "-inkey", str(kek_private_pem),
         "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1",
         "-pkeyopt", "rsa_mgf1_md:sha1",
         "-in", str(work / "rsa.bin"), "-out", str(work / "aes.bin")],
        check=True, capture_output=True,
    )  # fmt: skip
    aes_hex = (work / "aes.bin").read_bytes().hex()
    subprocess.run(
        ["openssl", "enc", "-d", "-id-aes256-wrap-pad", "-iv", "A65959A6", "-K", aes_hex,
         "-in", str(work / "kwp.bin"), "-out", str(work / "plain.bin")],
        check=True, capture_output=True,
    )  # fmt: skip
    plain = (work / "plain.bin").read_bytes()
    for name in ("rsa.bin", "kwp.bin", "aes.bin", "plain.bin"):
        (work / name).unlink()
    return plain


# --- signed approvals (tests/packager/test_approvals.py, tests/softhsm/test_approval_pkcs11.py) ---

DOCS_APPROVALS = Path(__file__).resolve().parents[2] / "docs" / "approvals.md"


def public_pem(key: Any) -> str:
    """SubjectPublicKeyInfo PEM of a private or public ``cryptography`` key (any type)."""
    public = key.public_key() if hasattr(key, "public_key") else key
    pem: bytes = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")


def doc_block(marker: str, doc: Path = DOCS_APPROVALS) -> str:
    """The fenced ```bash block of ``doc`` whose first line is exactly ``marker``."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in doc.read_text(encoding="utf-8").splitlines():
        if current is None:
            if line.strip() == "```bash":
                current = []
        elif line.strip() == "```":
            blocks.append("\n".join(current) + "\n")
            current = None
        else:
            current.append(line)
    found = [b for b in blocks if b.splitlines() and b.splitlines()[0] == marker]
    if len(found) != 1:
        raise LookupError(f"{len(found)} bash blocks of {doc} start with {marker!r}")
    return found[0]


def ecdsa_der_to_raw(der: bytes, size: int) -> bytes:
    """An ECDSA signature from DER (as OpenSSL writes it) to JWS's raw r||s, by hand."""
    if der[0] != 0x30:
        raise ValueError("not a DER SEQUENCE")
    pos = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        if der[pos] != 0x02:
            raise ValueError("not a DER INTEGER")
        length = der[pos + 1]
        value = der[pos + 2 : pos + 2 + length].lstrip(b"\x00")
        out += value.rjust(size, b"\x00")
        pos += 2 + length
    return out
