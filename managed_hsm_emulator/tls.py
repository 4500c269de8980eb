"""The emulator's HTTPS identity: a private CA and a server certificate, made once per DIR.

The CA (``ca.pem``) is what clients trust (``connection_verify=ca.pem``). The server
certificate names ``localhost``, ``127.0.0.1`` and ``::1``. Both are reused on later starts;
the server certificate is re-issued when it nears expiry or no longer chains to the CA.

``ca.key`` has to stay in DIR (the server certificate is re-issued from it), so whoever reads
DIR can issue certificates under this CA. To keep that from mattering beyond this machine, the
CA carries a critical NameConstraints extension that permits only the DNS name ``localhost``
and the addresses ``127.0.0.0/8`` and ``::1/128``: a certificate it issues for any other name
fails verification in every client that trusts ``ca.pem``. A CA made by an earlier version
without the constraint is replaced (with a new server certificate) on the next start.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .datadir import DataDir, atomic_write
from .errors import StartupError

CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=7)
Now = Callable[[], dt.datetime]
NAME_CONSTRAINTS = x509.NameConstraints(
    permitted_subtrees=[
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
        x509.IPAddress(ipaddress.ip_network("::1/128")),
    ],
    excluded_subtrees=None,
)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "managed-hsm-emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(
    paths: DataDir, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("managed-hsm-emulator local CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(NAME_CONSTRAINTS, critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write(paths.ca_key, _key_pem(key), mode=0o600)
    atomic_write(paths.ca_pem, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert, key


def _make_server(
    paths: DataDir, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    atomic_write(paths.server_key, _key_pem(key), mode=0o600)
    atomic_write(paths.server_pem, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _load_ca(
    paths: DataDir, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    if not (paths.ca_pem.exists() and paths.ca_key.exists()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_pem.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except ValueError:
        return None
    if (
        not isinstance(key, ec.EllipticCurvePrivateKey)
        or cert.not_valid_after_utc - now < RENEW_BEFORE
        or not _constrained(cert)
    ):
        return None
    return cert, key


def _constrained(ca: x509.Certificate) -> bool:
    """Whether the CA carries this module's NameConstraints, marked critical."""
    try:
        ext = ca.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return False
    return ext.critical and ext.value == NAME_CONSTRAINTS


def _server_ok(paths: DataDir, ca: x509.Certificate, now: dt.datetime) -> bool:
    if not (paths.server_pem.exists() and paths.server_key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(paths.server_pem.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return cert.not_valid_after_utc - now >= RENEW_BEFORE


def ensure_certificates(paths: DataDir, *, now: Now = _utcnow) -> None:
    """Create (or reuse) the CA and the server certificate in ``paths``.

    Raises:
        StartupError: reason ``tls`` if the files cannot be written.
    """
    current = now()
    try:
        loaded = _load_ca(paths, current)
        if loaded is None:
            ca, ca_key = _make_ca(paths, current)
            _make_server(paths, ca, ca_key, current)
            return
        ca, ca_key = loaded
        if not _server_ok(paths, ca, current):
            _make_server(paths, ca, ca_key, current)
    except OSError as exc:
        raise StartupError(f"cannot write TLS files: {exc.strerror}", reason="tls") from None


def server_context(paths: DataDir) -> ssl.SSLContext:
    """A TLS 1.2+ server context with the emulator's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(paths.server_pem, paths.server_key)
    return ctx


def client_context(ca_pem: str) -> ssl.SSLContext:
    """A client context that trusts only the emulator's CA (admin client, tests)."""
    return ssl.create_default_context(cafile=ca_pem)
