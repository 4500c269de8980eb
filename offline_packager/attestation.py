"""Offline verification of a Managed HSM key attestation for the KEK (no network, no azure.*).

What is checked, in this order (each failure raises :class:`AttestationError` with its reason):

1. The file: strict JSON in the shape ``GET {hsm}/keys/{name}/{version}/attestation`` returns
   (the key bundle, or its ``attributes``, or the bare ``attestation`` object), attestation
   ``version`` ``MRVL-1``, base64url fields (``attestation_format_unsupported``).
2. The chain (``attestation_chain_invalid``): a certificate in ``certificatePemFile`` issued by a
   trusted root (the pinned Marvell LiquidSecurity LS1/LS2 roots, or a test root given by
   name), and the partition certificate issued by that one; every certificate in the path valid
   now; a root's directory-name constraints honoured. The partition owner's (Microsoft's)
   self-signed root in the bundle must issue a certificate for the same partition key.
3. The signature (``attestation_signature_invalid``): the blob is ``data || signature``, the
   signature RSA PKCS#1 v1.5 by the partition key over ``data`` (Marvell firmware 3.x). The
   firmware 2.x "raw padding" form is recognised and refused as unsupported.
4. The key (``attestation_key_mismatch``): the signed attributes hold an RSA key whose modulus
   and exponent give exactly the KEK PEM's SubjectPublicKeyInfo; the attested key id names the
   KEK's name and version; the service's unsigned JSON agrees (same key, operations only
   ``import``).
5. The attributes (``attestation_key_extractable``): the private key is not extractable, was
   never extractable, and was generated inside the HSM (``CKA_LOCAL``).

The layout facts, their sources and what is unconfirmed: ``docs/kek-attestation.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.utils import CryptographyDeprecationWarning

from .errors import AttestationError, PackageFormatError
from .kek import Kek
from .kid import KeyId
from .package_format import b64url_decode, load_json_strict

CHAIN = "attestation_chain_invalid"
SIGNATURE = "attestation_signature_invalid"
MISMATCH = "attestation_key_mismatch"
EXTRACTABLE = "attestation_key_extractable"
UNSUPPORTED = "attestation_format_unsupported"
REASONS: dict[str, str] = {
    CHAIN: "The attestation's certificates do not chain to a trusted root (pinned Marvell "
    "LiquidSecurity root, or the test root given with --trust-test-root). Download the "
    "attestation again from the HSM (byok kek attest); never trust another root to make it pass.",
    SIGNATURE: "The attestation blob's signature does not verify under its partition "
    "certificate: the file was altered. Download it again; if it persists, stop the ceremony.",
    MISMATCH: "The attestation is about another key than this KEK PEM (SPKI, name/version or "
    "operations differ). Download the KEK and its attestation together (byok kek download "
    "--attestation) and check the kid.",
    EXTRACTABLE: "The attested attributes allow the KEK's private key to leave the HSM, or say "
    "it was not generated inside it. Do not wrap under this KEK: create a new one with byok kek "
    "create.",
    UNSUPPORTED: "The attestation uses a format, version or attribute layout this verifier does "
    "not understand; it refuses rather than guesses. See docs/kek-attestation.md.",
}

SUPPORTED_VERSION = "MRVL-1"
MAX_FILE_BYTES = 1024 * 1024
MAX_BLOB_BYTES = 64 * 1024
MAX_CERTIFICATES = 16
MAX_ATTRIBUTES = 256
_RESPONSE_HEADER = struct.Struct(">IIII")  # response code, flags, total size, buffer size
_KEY_INFO = struct.Struct(">HHHH")  # version, flags, first object offset, second object offset
_OBJECT_HEADER = struct.Struct(">III")  # (unconfirmed), attribute count, (unconfirmed)
_TLV = struct.Struct(">II")  # attribute type, value length

# PKCS#11 attribute numbers, as Marvell's attestation uses them (OBJ_ATTR_*).
ATTR_CLASS = 0x0000
ATTR_KEY_TYPE = 0x0100
ATTR_ID = 0x0102
ATTR_SENSITIVE = 0x0103
ATTR_MODULUS = 0x0120
ATTR_PUBLIC_EXPONENT = 0x0122
ATTR_EXTRACTABLE = 0x0162
ATTR_LOCAL = 0x0163
ATTR_NEVER_EXTRACTABLE = 0x0164
USAGE_ATTRS = {
    "encrypt": 0x0104,
    "decrypt": 0x0105,
    "wrap": 0x0106,
    "unwrap": 0x0107,
    "sign": 0x0108,
    "verify": 0x010A,
    "derive": 0x010C,
}
CKO_PUBLIC_KEY = 2
CKO_PRIVATE_KEY = 3
CKK_RSA = 0

# The pinned vendor roots: file under offline_packager/roots/ and its SHA-256 (DER).
PINNED_ROOTS: dict[str, tuple[str, str]] = {
    "marvell-ls1": (
        "marvell-liquidsecurity-ls1-root.pem",
        "230143df00e0b452743e068a5b3fc08df8f06cefc4854ea627aeb7ebd70ee2f4",
    ),
    "marvell-ls2": (
        "marvell-liquidsecurity-ls2-root.pem",
        "17644de0d33bc73b2f4ef4c20a11f6c8cc1f723a4cd83ee600361cbb24d8d2e5",
    ),
}


@dataclass(frozen=True)
class TrustAnchor:
    """A root the chain may start from: a pinned vendor root or an explicitly named test root."""

    label: str
    certificate: x509.Certificate = field(repr=False)
    sha256: str
    test: bool = False


@dataclass(frozen=True)
class AttestationResult:
    """What a verified attestation established, for the manifest and the custodian."""

    sha256: str
    version: str
    trust_anchor: str
    trust_anchor_sha256: str
    partition_certificate_sha256: str
    attested_key_id: str | None
    kek_spki_sha256: str
    attributes: dict[str, bool]

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``kek.attestation`` section (approvers sign over it)."""
        return {
            "sha256": self.sha256,
            "result": "verified",
            "version": self.version,
            "trust_anchor": self.trust_anchor,
            "trust_anchor_sha256": self.trust_anchor_sha256,
            "partition_certificate_sha256": self.partition_certificate_sha256,
            "attested_key_id": self.attested_key_id,
            "attributes": dict(self.attributes),
        }


def _load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """PEM certificates; Marvell's roots have serial number 0, which ``cryptography`` warns
    about (RFC 5280 wants it positive) but still parses: the warning is silenced here only.

    Raises:
        ValueError: no PEM certificate in ``data``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_pem_x509_certificates(data)


def _sha256_der(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


#: Where Marvell publishes the roots (the certificate files are not part of this repository:
#: a custodian installs them once, see offline_packager/roots/README.md).
ROOT_SOURCES = {
    "marvell-ls1": "https://www.marvell.com/content/dam/marvell/en/public-collateral/"
    "security-solutions/liquid_security_certificate.zip",
    "marvell-ls2": "https://www.marvell.com/products/security-solutions/nitrox-hs-adapters/"
    "liquidsecurity2-certificate-ls2-g-axxx-mi-f-bo-v2.html",
}


def roots_dir() -> Any:
    """Where the vendor roots are installed: ``$BYOK_VENDOR_ROOTS``, else the package's
    ``roots/`` folder."""
    folder = os.environ.get("BYOK_VENDOR_ROOTS")
    return Path(folder) if folder else resources.files(__package__) / "roots"


def pinned_roots(*, require_all: bool = True) -> tuple[TrustAnchor, ...]:
    """The Marvell LiquidSecurity roots installed (see :func:`roots_dir`), each checked against
    its pinned SHA-256. With ``require_all=False`` a root that is not installed is left out.

    Raises:
        AttestationError: ``attestation_chain_invalid`` if a root file is missing (with
            ``require_all``), does not parse, or differs from its pinned SHA-256.
    """
    anchors = []
    folder = roots_dir()
    for label, (file_name, pinned) in PINNED_ROOTS.items():
        try:
            data = (folder / file_name).read_bytes()
        except OSError:
            if not require_all:
                continue
            raise AttestationError(
                f"the vendor root {file_name} is not installed in {folder}: download it from "
                f"{ROOT_SOURCES[label]}, check that its SHA-256 (DER) is {pinned}, and put it "
                "there (or in $BYOK_VENDOR_ROOTS)",
                reason=CHAIN,
            ) from None
        try:
            (cert,) = _load_pem_certificates(data)
        except ValueError:
            raise AttestationError(
                f"the vendor root {file_name} is not one PEM certificate", reason=CHAIN
            ) from None
        actual = _sha256_der(cert)
        if not hmac.compare_digest(actual, pinned):
            raise AttestationError(
                f"the vendor root {file_name} has SHA-256 {actual}, not {pinned}: "
                "this installation was altered",
                reason=CHAIN,
            )
        anchors.append(TrustAnchor(label, cert, actual))
    return tuple(anchors)


def load_test_root(data: bytes) -> TrustAnchor:
    """A test root to trust in addition to the pinned ones (``--trust-test-root``).

    Only a self-signed CA certificate with a critical NameConstraints extension and ``TEST`` in
    its common name is accepted: this option cannot be used to trust a real-looking root.

    Raises:
        AttestationError: ``attestation_chain_invalid``.
    """
    try:
        (cert,) = _load_pem_certificates(data)
    except ValueError:
        raise AttestationError("the test root is not one PEM certificate", reason=CHAIN) from None
    common_names = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ]
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints, basic = None, None
    if (
        cert.subject != cert.issuer
        or basic is None
        or not basic.ca
        or constraints is None
        or not constraints.critical
        or not any("TEST" in cn for cn in common_names)
    ):
        raise AttestationError(
            "a test root must be a self-signed CA named TEST with critical name constraints "
            "(the emulator's attestation-test-root.pem)",
            reason=CHAIN,
        )
    return TrustAnchor("test-root", cert, _sha256_der(cert), test=True)


# -- the file --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Document:
    version: str
    certificates: list[x509.Certificate]
    private_blob: bytes
    public_blob: bytes | None
    key: Mapping[str, Any] | None


def _b64_field(obj: Mapping[str, Any], name: str, *, limit: int) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise AttestationError(f"the attestation lacks a base64url {name!r}", reason=UNSUPPORTED)
    try:
        decoded = b64url_decode(value)
    except PackageFormatError:
        raise AttestationError(f"{name!r} is not base64url", reason=UNSUPPORTED) from None
    if len(decoded) > limit:
        raise AttestationError(f"{name!r} is larger than {limit} bytes", reason=UNSUPPORTED)
    return decoded


def _parse_document(data: bytes) -> _Document:
    if len(data) > MAX_FILE_BYTES:
        raise AttestationError(
            f"the attestation file is larger than {MAX_FILE_BYTES} bytes", reason=UNSUPPORTED
        )
    try:
        doc = load_json_strict(data, what="attestation file")
    except (PackageFormatError, ValueError):
        raise AttestationError(
            "the attestation file is not strict JSON", reason=UNSUPPORTED
        ) from None
    if not isinstance(doc, dict):
        raise AttestationError("the attestation file is not a JSON object", reason=UNSUPPORTED)
    key = doc.get("key") if isinstance(doc.get("key"), dict) else None
    obj: Any = doc
    if isinstance(obj.get("attributes"), dict):
        obj = obj["attributes"]
    if isinstance(obj.get("attestation"), dict):
        obj = obj["attestation"]
    version = obj.get("version")
    if version != SUPPORTED_VERSION:
        raise AttestationError(
            f"attestation version {str(version)[:40]!r} is not supported (only "
            f"{SUPPORTED_VERSION}, Marvell LiquidSecurity)",
            reason=UNSUPPORTED,
        )
    pem = _b64_field(obj, "certificatePemFile", limit=MAX_FILE_BYTES)
    try:
        certificates = _load_pem_certificates(pem)
    except ValueError:
        raise AttestationError(
            "certificatePemFile holds no PEM certificates", reason=UNSUPPORTED
        ) from None
    if len(certificates) > MAX_CERTIFICATES:
        raise AttestationError(
            f"certificatePemFile holds more than {MAX_CERTIFICATES} certificates",
            reason=UNSUPPORTED,
        )
    private_blob = _b64_field(obj, "privateKeyAttestation", limit=MAX_BLOB_BYTES)
    public_blob = None
    if obj.get("publicKeyAttestation") is not None:
        public_blob = _b64_field(obj, "publicKeyAttestation", limit=MAX_BLOB_BYTES)
    return _Document(SUPPORTED_VERSION, certificates, private_blob, public_blob, key)


# -- the chain -------------------------------------------------------------------------------------
def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.subject == cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _may_issue(cert: x509.Certificate) -> bool:
    """An issuing certificate must not deny being a CA; v1 certificates carry no extensions."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not basic.ca:
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            return False
    except x509.ExtensionNotFound:
        pass
    return True


def _within(name: x509.Name, subtree: x509.Name) -> bool:
    return name.rdns[: len(subtree.rdns)] == subtree.rdns


def _name_allowed(anchor: x509.Certificate, subject: x509.Name) -> bool:
    """RFC 5280 directory-name constraints of the root, applied to a subject below it."""
    try:
        nc = anchor.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return True
    permitted = [g.value for g in nc.permitted_subtrees or [] if isinstance(g, x509.DirectoryName)]
    excluded = [g.value for g in nc.excluded_subtrees or [] if isinstance(g, x509.DirectoryName)]
    if permitted and not any(_within(subject, p) for p in permitted):
        return False
    return not any(_within(subject, e) for e in excluded)


@dataclass(frozen=True)
class _Path:
    anchor: TrustAnchor
    intermediate: x509.Certificate
    partition: x509.Certificate


def _manufacturer_paths(
    certs: Sequence[x509.Certificate], anchors: Sequence[TrustAnchor], now: datetime
) -> list[_Path]:
    paths: list[_Path] = []
    for anchor in anchors:
        if not _valid_at(anchor.certificate, now):
            continue
        for mid in certs:
            if not (
                _issued_by(mid, anchor.certificate)
                and _valid_at(mid, now)
                and _may_issue(mid)
                and _name_allowed(anchor.certificate, mid.subject)
            ):
                continue
            paths.extend(
                _Path(anchor, mid, leaf)
                for leaf in certs
                if leaf is not mid
                and _issued_by(leaf, mid)
                and _valid_at(leaf, now)
                and _name_allowed(anchor.certificate, leaf.subject)
            )
    return paths


def _owner_vouches(
    certs: Sequence[x509.Certificate],
    partition: x509.Certificate,
    anchors: Sequence[TrustAnchor],
    now: datetime,
) -> bool:
    """The partition owner's self-signed root issued a certificate for the same key."""
    anchor_ders = {a.sha256 for a in anchors}
    owner_roots = [
        c
        for c in certs
        if c.subject == c.issuer and _sha256_der(c) not in anchor_ders and _valid_at(c, now)
    ]
    key = _spki(partition.public_key())
    return any(
        _issued_by(c, root) and _valid_at(c, now) and _spki(c.public_key()) == key
        for root in owner_roots
        for c in certs
        if c is not partition
    )


# -- the signature ---------------------------------------------------------------------------------
def _hash_of(cert: x509.Certificate) -> hashes.HashAlgorithm:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if isinstance(algorithm, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
        return algorithm
    return hashes.SHA256()


def _split_signed(blob: bytes, cert: x509.Certificate) -> tuple[bytes, bytes, rsa.RSAPublicKey]:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(
            "the partition certificate's key is not RSA; only RSA-signed attestations are known",
            reason=UNSUPPORTED,
        )
    size = (key.key_size + 7) // 8
    if len(blob) <= size + _RESPONSE_HEADER.size:
        raise AttestationError("the attestation blob is too short", reason=UNSUPPORTED)
    return blob[:-size], blob[-size:], key


def _verify_blob(blob: bytes, cert: x509.Certificate, what: str) -> bytes:
    """The signed data of ``blob`` after its signature verified under ``cert``.

    Raises:
        AttestationError: ``attestation_signature_invalid``, or ``..._format_unsupported`` for
            the firmware 2.x raw-padding signature.
    """
    data, signature, key = _split_signed(blob, cert)
    try:
        key.verify(signature, data, padding.PKCS1v15(), _hash_of(cert))
    except InvalidSignature:
        pass
    else:
        return data
    numbers = key.public_numbers()
    recovered = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n)
    if recovered.to_bytes(len(signature), "big")[-32:] == hashlib.sha256(data).digest():
        raise AttestationError(
            f"the {what} is signed in Marvell's firmware 2.x raw-padding form; only PKCS#1 v1.5 "
            "(firmware 3.x) is verified strictly",
            reason=UNSUPPORTED,
        )
    raise AttestationError(
        f"the {what}'s signature does not verify under the partition certificate: it was altered",
        reason=SIGNATURE,
    )


# -- the attributes --------------------------------------------------------------------------------
def _parse_object(buffer: bytes, offset: int) -> dict[int, bytes]:
    if offset + _OBJECT_HEADER.size > len(buffer):
        raise AttestationError("a key object lies outside the attribute buffer", reason=UNSUPPORTED)
    _, count, _ = _OBJECT_HEADER.unpack_from(buffer, offset)
    if not 0 < count <= MAX_ATTRIBUTES:
        raise AttestationError(f"a key object claims {count} attributes", reason=UNSUPPORTED)
    pos = offset + _OBJECT_HEADER.size
    attributes: dict[int, bytes] = {}
    for _ in range(count):
        if pos + _TLV.size > len(buffer):
            raise AttestationError("an attribute runs past the buffer", reason=UNSUPPORTED)
        kind, length = _TLV.unpack_from(buffer, pos)
        pos += _TLV.size
        if length > len(buffer) - pos:
            raise AttestationError("an attribute value runs past the buffer", reason=UNSUPPORTED)
        if kind in attributes:
            raise AttestationError(f"attribute 0x{kind:04x} appears twice", reason=UNSUPPORTED)
        attributes[kind] = buffer[pos : pos + length]
        pos += length
    return attributes


def parse_signed_data(data: bytes, total_size: int) -> list[dict[int, bytes]]:
    """The key objects of a firmware 3.x attestation's signed data (``blob`` minus signature).

    Raises:
        AttestationError: ``attestation_format_unsupported`` for any size or offset that does
            not fit.
    """
    if len(data) < _RESPONSE_HEADER.size:
        raise AttestationError("the attestation has no response header", reason=UNSUPPORTED)
    _, _, total, buffer_size = _RESPONSE_HEADER.unpack_from(data, 0)
    if total != total_size:
        raise AttestationError(
            f"the response header's total size {total} is not the blob's {total_size}",
            reason=UNSUPPORTED,
        )
    if not _KEY_INFO.size <= buffer_size <= len(data) - _RESPONSE_HEADER.size:
        raise AttestationError(
            f"the attribute buffer size {buffer_size} does not fit", reason=UNSUPPORTED
        )
    buffer = data[len(data) - buffer_size :]
    _, _, first, second = _KEY_INFO.unpack_from(buffer, 0)
    offsets = [o for o in (first, second) if o]
    if not offsets or any(o < _KEY_INFO.size for o in offsets) or first == second:
        raise AttestationError("the key info offsets do not fit", reason=UNSUPPORTED)
    return [_parse_object(buffer, o) for o in offsets]


def _flag(attrs: Mapping[int, bytes], kind: int, name: str) -> bool | None:
    value = attrs.get(kind)
    if value is None:
        return None
    if value not in (b"\x00", b"\x01"):
        raise AttestationError(f"attribute {name} is not a one-byte boolean", reason=UNSUPPORTED)
    return value == b"\x01"


def _number(attrs: Mapping[int, bytes], kind: int) -> int | None:
    value = attrs.get(kind)
    if value is None or not value or len(value) > 1024:
        return None
    return int.from_bytes(value, "big")


def _attested_public_key(objects: Sequence[Mapping[int, bytes]]) -> rsa.RSAPublicKey:
    if any(_number(o, ATTR_KEY_TYPE) not in (None, CKK_RSA) for o in objects):
        raise AttestationError("the attested key is not an RSA key", reason=MISMATCH)
    pairs = {
        (n, e)
        for o in objects
        if (n := _number(o, ATTR_MODULUS)) is not None
        and (e := _number(o, ATTR_PUBLIC_EXPONENT)) is not None
    }
    if not pairs:
        raise AttestationError(
            "the attestation carries no RSA modulus and exponent: it cannot be bound to the KEK",
            reason=UNSUPPORTED,
        )
    if len(pairs) > 1:
        raise AttestationError("the attestation's key objects disagree on the key", reason=MISMATCH)
    n, e = pairs.pop()
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise AttestationError("the attested RSA numbers are invalid", reason=UNSUPPORTED) from None


def _check_attributes(private: Mapping[int, bytes]) -> dict[str, bool]:
    extractable = _flag(private, ATTR_EXTRACTABLE, "CKA_EXTRACTABLE")
    local = _flag(private, ATTR_LOCAL, "CKA_LOCAL")
    never = _flag(private, ATTR_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE")
    if extractable is None or local is None:
        raise AttestationError(
            "the private key object lacks CKA_EXTRACTABLE or CKA_LOCAL", reason=UNSUPPORTED
        )
    if extractable:
        raise AttestationError(
            "the attested private key is extractable (CKA_EXTRACTABLE true)", reason=EXTRACTABLE
        )
    if not local:
        raise AttestationError(
            "the attested private key was not generated inside the HSM (CKA_LOCAL false): a copy "
            "may exist outside it",
            reason=EXTRACTABLE,
        )
    if never is False:
        raise AttestationError(
            "the attested private key was extractable once (CKA_NEVER_EXTRACTABLE false)",
            reason=EXTRACTABLE,
        )
    out = {"extractable": extractable, "local": local}
    if never is not None:
        out["never_extractable"] = never
    sensitive = _flag(private, ATTR_SENSITIVE, "CKA_SENSITIVE")
    if sensitive is not None:
        out["sensitive"] = sensitive
    for name, kind in USAGE_ATTRS.items():
        value = _flag(private, kind, name)
        if value is not None:
            out[name] = value
    return out


def _attested_id(objects: Sequence[Mapping[int, bytes]], kek_kid: KeyId | None) -> str | None:
    ids = {o[ATTR_ID] for o in objects if o.get(ATTR_ID)}
    if len(ids) > 1:
        raise AttestationError(
            "the attestation's key objects disagree on the key id", reason=MISMATCH
        )
    if not ids:
        return None
    try:
        text = ids.pop().decode("utf-8").replace("\x00", "")
    except UnicodeDecodeError:
        raise AttestationError(
            "the attested key id is not UTF-8 text", reason=UNSUPPORTED
        ) from None
    if kek_kid is not None and text.rstrip("/").split("/")[-2:] != [kek_kid.name, kek_kid.version]:
        raise AttestationError(
            f"the attestation is for key {text[:200]!r}, not {kek_kid.name}/{kek_kid.version}",
            reason=MISMATCH,
        )
    return text[:512]


def _check_service_json(key: Mapping[str, Any] | None, kek: Kek, kek_kid: KeyId | None) -> None:
    """The unsigned key bundle beside the attestation must tell the same story."""
    if key is None:
        return
    ops = key.get("key_ops")
    if ops is not None and ops != ["import"]:
        raise AttestationError(
            f"the service reports key operations {ops!r}; a KEK allows import only",
            reason=MISMATCH,
        )
    kid = key.get("kid")
    if kek_kid is not None and isinstance(kid, str) and kid != kek_kid.kid:
        raise AttestationError(
            f"the attestation file is for {kid[:200]!r}, not {kek_kid.kid}", reason=MISMATCH
        )
    n, e = key.get("n"), key.get("e")
    if isinstance(n, str) and isinstance(e, str):
        try:
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(b64url_decode(e), "big"), int.from_bytes(b64url_decode(n), "big")
            )
        except PackageFormatError:
            raise AttestationError(
                "the key bundle's n/e are not base64url", reason=UNSUPPORTED
            ) from None
        if numbers != kek.public_key.public_numbers():
            raise AttestationError(
                "the attestation file's key bundle is another key than the KEK PEM",
                reason=MISMATCH,
            )


# -- the whole check -------------------------------------------------------------------------------
def verify_kek_attestation(
    data: bytes,
    kek: Kek,
    *,
    now: datetime,
    kek_kid: KeyId | None = None,
    anchors: Sequence[TrustAnchor] | None = None,
) -> AttestationResult:
    """Verify a KEK attestation file against the KEK PEM, offline.

    ``anchors`` defaults to the pinned Marvell roots; add a test root with
    :func:`load_test_root`. ``now`` (timezone-aware) is when certificates must be valid.

    Raises:
        AttestationError: ``attestation_chain_invalid``, ``attestation_signature_invalid``,
            ``attestation_key_mismatch``, ``attestation_key_extractable`` or
            ``attestation_format_unsupported``.
    """
    trusted = tuple(pinned_roots() if anchors is None else anchors)
    doc = _parse_document(data)
    paths = _manufacturer_paths(doc.certificates, trusted, now)
    if not paths:
        roots = ", ".join(a.label for a in trusted)
        raise AttestationError(
            f"no certificate in the attestation chains to a trusted root ({roots}) through "
            "valid certificates",
            reason=CHAIN,
        )
    chosen: _Path | None = None
    signed = b""
    last: AttestationError | None = None
    for path in paths:
        try:
            signed = _verify_blob(doc.private_blob, path.partition, "private key attestation")
        except AttestationError as exc:
            last = exc
            continue
        chosen = path
        break
    if chosen is None:
        assert last is not None  # noqa: S101  # paths is not empty, so the loop set it
        raise last
    if not _owner_vouches(doc.certificates, chosen.partition, trusted, now):
        raise AttestationError(
            "no partition-owner certificate (self-signed root and a certificate it issued) "
            "vouches for the partition key",
            reason=CHAIN,
        )
    if doc.public_blob is not None:
        _verify_blob(doc.public_blob, chosen.partition, "public key attestation")
    objects = parse_signed_data(signed, len(doc.private_blob))
    privates = [o for o in objects if _number(o, ATTR_CLASS) == CKO_PRIVATE_KEY]
    if len(privates) != 1:
        raise AttestationError(
            "the attestation does not hold exactly one private key object", reason=UNSUPPORTED
        )
    attested = _attested_public_key(objects)
    if not hmac.compare_digest(_spki(attested), _spki(kek.public_key)):
        raise AttestationError(
            "the attested public key is not the KEK PEM's (SubjectPublicKeyInfo differs)",
            reason=MISMATCH,
        )
    key_id = _attested_id(objects, kek_kid)
    _check_service_json(doc.key, kek, kek_kid)
    attributes = _check_attributes(privates[0])
    return AttestationResult(
        sha256=hashlib.sha256(data).hexdigest(),
        version=doc.version,
        trust_anchor=chosen.anchor.label,
        trust_anchor_sha256=chosen.anchor.sha256,
        partition_certificate_sha256=_sha256_der(chosen.partition),
        attested_key_id=key_id,
        kek_spki_sha256=kek.fingerprint,
        attributes=attributes,
    )
