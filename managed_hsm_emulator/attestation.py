"""Key attestations shaped like Managed HSM's, signed by a TEST root this emulator creates.

The answer of ``GET /keys/{name}[/{version}]/attestation`` is the key bundle with
``attributes.attestation``: ``certificatePemFile`` (base64url of a PEM bundle),
``privateKeyAttestation`` (and ``publicKeyAttestation`` for oct keys), ``version`` ``MRVL-1``.
The blob follows the Marvell LiquidSecurity firmware 3.x layout as far as public sources
describe it (``docs/kek-attestation.md``): a response header, the attribute buffer with one or
two key objects of PKCS#11 attributes, and an RSA PKCS#1 v1.5 SHA-256 signature by the
partition key.

The certificates imitate the two chains of the real bundle:

- ``TEST root`` (self-signed, critical NameConstraints permitting only the directory name
  ``O=managed-hsm-emulator TEST``) -> ``TEST card`` -> ``TEST partition`` (the signing key),
  standing in for Marvell's root -> adapter -> partition;
- ``TEST partition owner root`` (self-signed) -> a certificate for the same partition key,
  standing in for Microsoft's partition-owner chain.

Nothing in this PKI is Marvell's or Microsoft's: ``byok-package`` refuses it unless the root is
given with ``--trust-test-root DIR/attestation-test-root.pem``. Only the partition key is kept
(``DIR/attestation-partition.key``, 0600); the root, card and owner keys are discarded after
issuing, so no further certificate can be issued under the TEST root.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from offline_packager.attestation import (
    ATTR_CLASS,
    ATTR_EXTRACTABLE,
    ATTR_ID,
    ATTR_KEY_TYPE,
    ATTR_LOCAL,
    ATTR_MODULUS,
    ATTR_NEVER_EXTRACTABLE,
    ATTR_PUBLIC_EXPONENT,
    ATTR_SENSITIVE,
    CKO_PRIVATE_KEY,
    CKO_PUBLIC_KEY,
    SUPPORTED_VERSION,
    USAGE_ATTRS,
)
from offline_packager.package_format import b64url_encode

from .datadir import DataDir, atomic_write

TEST_ORG = "managed-hsm-emulator TEST"
TEST_SUBTREE = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TEST_ORG)])
ROOT_CN = "TEST ROOT managed-hsm-emulator attestation (not Marvell)"
VALID_DAYS = 3650
ATTR_VALUE_LEN = 0x0161
CKO_SECRET_KEY = 4
CKK_RSA, CKK_EC, CKK_AES = 0x00, 0x03, 0x1F
_KEY_TYPES = {"RSA": CKK_RSA, "EC": CKK_EC, "oct": CKK_AES}
Now = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, *, test_subtree: bool) -> x509.Name:
    org = TEST_ORG if test_subtree else "managed-hsm-emulator TEST partition owner"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_extensions(builder: x509.CertificateBuilder, *, ca: bool) -> x509.CertificateBuilder:
    return builder.add_extension(
        x509.BasicConstraints(ca=ca, path_length=None), critical=True
    ).add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )


def issue(
    subject: x509.Name,
    public_key: rsa.RSAPublicKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    now: dt.datetime,
    ca: bool,
    constraints: x509.NameConstraints | None = None,
) -> x509.Certificate:
    """One certificate of the test PKI (tests use it to craft bad chains too)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )
    builder = _ca_extensions(builder, ca=ca)
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class AttestationPki:
    """The emulator's attestation certificates and the partition signing key."""

    root: x509.Certificate
    card: x509.Certificate
    partition: x509.Certificate
    owner_root: x509.Certificate
    owner_partition: x509.Certificate
    partition_key: rsa.RSAPrivateKey = field(repr=False)

    def bundle(self) -> list[x509.Certificate]:
        """The certificates an answer carries (the root is not among them: it is pinned)."""
        return [self.partition, self.card, self.owner_partition, self.owner_root]


def make_test_pki(*, now: dt.datetime, label: str = "emulator") -> AttestationPki:
    """A fresh TEST PKI (four RSA-2048 keys); only the partition key is returned."""
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    card_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    partition_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    owner_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root_name = _name(ROOT_CN, test_subtree=False)
    root = issue(
        root_name,
        root_key.public_key(),
        root_name,
        root_key,
        now=now,
        ca=True,
        constraints=x509.NameConstraints(
            permitted_subtrees=[x509.DirectoryName(TEST_SUBTREE)], excluded_subtrees=None
        ),
    )
    card_name = _name(f"TEST card {label}", test_subtree=True)
    card = issue(card_name, card_key.public_key(), root_name, root_key, now=now, ca=True)
    partition = issue(
        _name(f"TEST partition {label}", test_subtree=True),
        partition_key.public_key(),
        card_name,
        card_key,
        now=now,
        ca=False,
    )
    owner_name = _name("TEST partition owner root", test_subtree=False)
    owner_root = issue(owner_name, owner_key.public_key(), owner_name, owner_key, now=now, ca=True)
    owner_partition = issue(
        _name(f"TEST owner-issued partition {label}", test_subtree=False),
        partition_key.public_key(),
        owner_name,
        owner_key,
        now=now,
        ca=False,
    )
    return AttestationPki(root, card, partition, owner_root, owner_partition, partition_key)


# -- the blob --------------------------------------------------------------------------------------
def _tlvs(attributes: Mapping[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">II", k, len(v)) + v for k, v in attributes.items())
    return struct.pack(">III", 0, len(attributes), len(body)) + body


def signed_data(objects: Sequence[Mapping[int, bytes]], *, signature_size: int) -> bytes:
    """Response header + attribute buffer (key info, then each key object), unsigned."""
    encoded = [_tlvs(o) for o in objects]
    offsets = []
    pos = 8
    for e in encoded:
        offsets.append(pos)
        pos += len(e)
    first, second = [*offsets, 0][:2]
    buffer = struct.pack(">HHHH", 1, 0, first, second) + b"".join(encoded)
    total = 16 + len(buffer) + signature_size
    return struct.pack(">IIII", 0, 0, total, len(buffer)) + buffer


def sign_blob(objects: Sequence[Mapping[int, bytes]], key: rsa.RSAPrivateKey) -> bytes:
    """``data || PKCS#1 v1.5 SHA-256 signature``, as Marvell firmware 3.x signs it."""
    data = signed_data(objects, signature_size=key.key_size // 8)
    return data + key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _flag(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


def _int(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def key_objects(
    *,
    family: str,
    kid: str,
    key_ops: Sequence[str],
    rsa_public: rsa.RSAPublicNumbers | None = None,
    key_bytes: int | None = None,
    local: bool = True,
    extractable: bool = False,
) -> list[dict[int, bytes]]:
    """The key objects an attestation of one key version holds (public first for key pairs)."""
    common: dict[int, bytes] = {
        ATTR_KEY_TYPE: bytes([_KEY_TYPES[family]]),
        ATTR_ID: kid.encode(),
    }
    if rsa_public is not None:
        common[ATTR_MODULUS] = _int(rsa_public.n)
        common[ATTR_PUBLIC_EXPONENT] = _int(rsa_public.e)
    usage = {
        "encrypt": "encrypt" in key_ops,
        "decrypt": "decrypt" in key_ops,
        "wrap": "wrapKey" in key_ops,
        "unwrap": "unwrapKey" in key_ops or "import" in key_ops,
        "sign": "sign" in key_ops,
        "verify": "verify" in key_ops,
        "derive": False,
    }
    protection = {
        ATTR_SENSITIVE: _flag(True),
        ATTR_EXTRACTABLE: _flag(extractable),
        ATTR_LOCAL: _flag(local),
        ATTR_NEVER_EXTRACTABLE: _flag(local and not extractable),
    }
    if family == "oct":
        secret = {ATTR_CLASS: bytes([CKO_SECRET_KEY]), **common, **protection}
        secret[ATTR_VALUE_LEN] = _int(key_bytes or 0)
        secret.update({USAGE_ATTRS[k]: _flag(v) for k, v in usage.items()})
        return [secret]
    public = {ATTR_CLASS: bytes([CKO_PUBLIC_KEY]), **common}
    public.update(
        {USAGE_ATTRS[k]: _flag(usage[k]) for k in ("encrypt", "wrap", "verify")},
    )
    private = {ATTR_CLASS: bytes([CKO_PRIVATE_KEY]), **common, **protection}
    private.update(
        {USAGE_ATTRS[k]: _flag(usage[k]) for k in ("decrypt", "unwrap", "sign", "derive")},
    )
    return [public, private]


def attestation_object(
    certificates: Sequence[x509.Certificate],
    private_blob: bytes,
    public_blob: bytes | None = None,
) -> dict[str, Any]:
    """The ``attributes.attestation`` object of the answer."""
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    out: dict[str, Any] = {
        "certificatePemFile": b64url_encode(pem),
        "privateKeyAttestation": b64url_encode(private_blob),
        "version": SUPPORTED_VERSION,
    }
    if public_blob is not None:
        out["publicKeyAttestation"] = b64url_encode(public_blob)
    return out


# -- the data directory ----------------------------------------------------------------------------
class AttestationAuthority:
    """The emulator's signer of attestations, loaded from (or created in) its data directory."""

    def __init__(self, pki_bundle: list[x509.Certificate], partition_key: rsa.RSAPrivateKey):
        self._bundle = pki_bundle
        self._key = partition_key

    @classmethod
    def ensure(cls, paths: DataDir, *, now: Now = _utcnow) -> AttestationAuthority:
        """Load the TEST PKI of DIR, or create it (on first start, or when a file is missing or
        the partition key no longer matches its certificate).

        Raises:
            OSError: the data directory cannot be written.
        """
        try:
            root = x509.load_pem_x509_certificate(paths.attestation_test_root.read_bytes())
            bundle = x509.load_pem_x509_certificates(paths.attestation_chain.read_bytes())
            key = serialization.load_pem_private_key(
                paths.attestation_partition_key.read_bytes(), password=None
            )
        except (OSError, ValueError):
            return cls._create(paths, now())
        if (
            isinstance(key, rsa.RSAPrivateKey)
            and len(bundle) == 4
            and bundle[0].public_key() == key.public_key()
            and bundle[1].issuer == root.subject
            and bundle[0].not_valid_after_utc > now() + dt.timedelta(days=7)
        ):
            return cls(bundle, key)
        return cls._create(paths, now())

    @classmethod
    def _create(cls, paths: DataDir, now: dt.datetime) -> AttestationAuthority:
        pki = make_test_pki(now=now)
        key_pem = pki.partition_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in pki.bundle())
        atomic_write(paths.attestation_partition_key, key_pem, mode=0o600)
        atomic_write(paths.attestation_chain, chain, mode=0o644)
        atomic_write(
            paths.attestation_test_root,
            pki.root.public_bytes(serialization.Encoding.PEM),
            mode=0o644,
        )
        return cls(pki.bundle(), pki.partition_key)

    def attestation(
        self,
        *,
        family: str,
        kid: str,
        key_ops: Sequence[str],
        rsa_public: rsa.RSAPublicNumbers | None,
        key_bytes: int | None,
        local: bool,
    ) -> dict[str, Any]:
        """The ``attestation`` object for one key version (public blob for oct keys only)."""
        objects = key_objects(
            family=family,
            kid=kid,
            key_ops=key_ops,
            rsa_public=rsa_public,
            key_bytes=key_bytes,
            local=local,
        )
        blob = sign_blob(objects, self._key)
        return attestation_object(self._bundle, blob, blob if family == "oct" else None)
