"""A stable identity: the port is kept in DIR across restarts, only the emulator's own names are
served (Host), package kids must name it, and its CA can only vouch for loopback names."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from emulator_support import (
    bearer,
    create_kek,
    error_of,
    exchange,
    http_request,
    jwk_for,
    package_in_process,
    package_with_cli,
)

from managed_hsm_emulator.testing import EmulatorHandle, EmulatorStartError, running_emulator
from managed_hsm_emulator.tls import NAME_CONSTRAINTS, client_context
from offline_packager.target_keys import TargetKey


def test_byok_package_still_imports_after_a_restart_on_the_same_data_dir(
    tmp_path: Path, targets: dict[str, TargetKey]
) -> None:
    data = tmp_path / "hsm"
    target = targets["rsa-2048"]
    with running_emulator(data) as hsm:  # --port 0: a free port, kept in DIR
        kek = create_kek(hsm, hsm.key_client(), "restart-kek", tmp_path)
        first_url = hsm.url
    assert json.loads((data / "identity.json").read_text())["port"] == hsm.port
    # the package is built offline while the emulator is down
    package = package_with_cli(kek, target, tmp_path, "restart-target")
    with running_emulator(data) as hsm:  # --port 0 again: the kept port, so the same kids
        assert hsm.url == first_url
        client = hsm.key_client()
        assert client.get_key("restart-kek").id == kek.kid
        imported = client.import_key(
            "after-restart", jwk_for(target.type, package), hardware_protected=True
        )
        assert imported.id is not None
        assert imported.id.startswith(f"{first_url}/keys/after-restart/")


def test_explicit_port_moves_the_emulator_and_a_taken_kept_port_fails_loudly(
    tmp_path: Path, targets: dict[str, TargetKey]
) -> None:
    data = tmp_path / "hsm"
    target = targets["oct-128"]
    with running_emulator(data) as hsm:
        kek = create_kek(hsm, hsm.key_client(), "moving-kek", tmp_path)
        old_port = hsm.port
    package = package_in_process(kek.public_key, kek.kid, target.plaintext.reveal())
    # something else takes the kept port while the emulator is down
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        with pytest.raises(EmulatorStartError) as exc, running_emulator(data):
            pass
        message = str(exc.value)
        assert "port_in_use" in message
        assert f"port {old_port}" in message
        assert "identity.json" in message
        assert "--port" in message
        # an explicit --port wins, and becomes the kept port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            new_port = int(probe.getsockname()[1])
        with running_emulator(data, port=new_port) as hsm:
            assert hsm.port == new_port
            assert "moved from port" in hsm.log_text()
            # the emulator has a new identity: the old package names another HSM now
            with pytest.raises(HttpResponseError) as refused:
                hsm.key_client().import_key(
                    "moved", jwk_for(target.type, package), hardware_protected=True
                )
            status, code, message = error_of(refused)
            assert (status, code) == (400, "BadParameter")
            assert "kid_wrong_hsm" in message
    assert json.loads((data / "identity.json").read_text())["port"] == new_port
    with running_emulator(data) as hsm:
        assert hsm.port == new_port


def test_damaged_identity_file_stops_the_start(tmp_path: Path) -> None:
    data = tmp_path / "hsm"
    with running_emulator(data):
        pass
    (data / "identity.json").write_text('{"port": "soon"}')
    with pytest.raises(EmulatorStartError, match="damaged_state"), running_emulator(data):
        pass


# --- Host ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["evil.example:1", "evil.example", "127.0.0.1", "127.0.0.1:1", "192.0.2.10:{port}", ""],
)
def test_foreign_host_is_refused_with_key_vaults_error_shape(
    hsm: EmulatorHandle, host: str
) -> None:
    resp = hsm.request("GET", "/keys?api-version=7.6", headers={"Host": host.format(port=hsm.port)})
    assert resp.status == 400
    assert resp.body["error"]["code"] == "BadParameter"
    assert resp.body["error"]["innererror"]["code"] == "bad_host"
    assert f"127.0.0.1:{hsm.port}" in resp.body["error"]["message"]


def test_host_is_checked_after_the_token_and_before_faults_and_routing(
    hsm: EmulatorHandle,
) -> None:
    evil = {"Host": "evil.example:1"}
    # no token: the challenge still comes first
    assert (
        hsm.request("GET", "/keys?api-version=7.6", headers=evil, authenticated=False).status == 401
    )
    # an unknown path or a missing api-version: the Host is refused first
    for path in ("/nonsense?api-version=7.6", "/keys"):
        resp = hsm.request("GET", path, headers=evil)
        assert (resp.status, resp.body["error"]["innererror"]["code"]) == (400, "bad_host"), path
    # a fault rule does not fire for a foreign Host (and is left for the next real request)
    hsm.inject_fault("503", path="/keys", count=1)
    try:
        assert hsm.request("GET", "/keys?api-version=7.6", headers=evil).status == 400
        assert hsm.request("GET", "/keys?api-version=7.6").status == 503
    finally:
        hsm.clear_faults()


def test_foreign_host_never_gets_a_kid(hsm: EmulatorHandle) -> None:
    resp = hsm.request(
        "POST",
        "/keys/host-probe/create?api-version=7.6",
        {"kty": "oct-HSM"},
        headers={"Host": "evil.example:1"},
    )
    assert resp.status == 400
    assert "evil.example" not in json.dumps(resp.body)
    assert hsm.request("GET", "/keys/host-probe/?api-version=7.6").status == 404  # not created


def test_repeated_host_header_is_refused(hsm: EmulatorHandle) -> None:
    good = f"127.0.0.1:{hsm.port}"
    request = http_request(
        "GET",
        "/keys?api-version=7.6",
        [("Host", good), ("Host", "evil.example:1"), ("Authorization", bearer(hsm))],
    )
    (reply,), _ = exchange(hsm, request, replies=1)
    assert reply.status == 400
    assert reply.body["error"]["innererror"]["code"] == "bad_host"


@pytest.mark.parametrize("name", ["localhost", "LocalHost", "[::1]", "127.0.0.1"])
def test_the_emulators_own_names_are_served_and_name_the_kid(
    hsm: EmulatorHandle, name: str
) -> None:
    host = f"{name}:{hsm.port}"
    resp = hsm.request("POST", "/keys/own-name/create?api-version=7.6", {"kty": "oct-HSM"})
    assert resp.status == 200
    resp = hsm.request("GET", "/keys/own-name/?api-version=7.6", headers={"Host": host})
    assert resp.status == 200
    assert resp.body["key"]["kid"].startswith(f"https://{host.lower()}/keys/own-name/")


def test_kek_downloaded_through_localhost_imports_through_127_0_0_1(
    hsm: EmulatorHandle, tmp_path: Path, targets: dict[str, TargetKey]
) -> None:
    kek = create_kek(hsm, hsm.key_client(), "alias-kek", tmp_path)
    localhost_kid = kek.kid.replace("https://127.0.0.1:", "https://localhost:")
    assert localhost_kid != kek.kid
    target = targets["ec-p256"]
    package = package_in_process(kek.public_key, localhost_kid, target.plaintext.reveal())
    imported = hsm.key_client().import_key(
        "alias-imported", jwk_for(target.type, package), hardware_protected=True
    )
    assert imported.key_type == "EC-HSM"


# --- the CA: name constraints ------------------------------------------------------------------


def _issue(ca_dir: Path, names: list[x509.GeneralName], out: Path) -> x509.Certificate:
    """A server certificate for ``names``, issued with the emulator's own ca.key."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def _openssl_verify(ca_pem: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_pem), str(cert)],  # the OpenSSL CLI
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_ca_is_name_constrained_to_loopback(hsm: EmulatorHandle, tmp_path: Path) -> None:
    import ipaddress

    ca = x509.load_pem_x509_certificate(hsm.ca.read_bytes())
    ext = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert ext.value == NAME_CONSTRAINTS
    assert set(ext.value.permitted_subtrees or []) == {
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
        x509.IPAddress(ipaddress.ip_network("::1/128")),
    }
    assert ext.value.excluded_subtrees is None
    # the emulator's own certificate passes both OpenSSL's and cryptography's checks...
    assert _openssl_verify(hsm.ca, hsm.data_dir / "server.pem").returncode == 0
    store = verification.Store([ca])
    server = x509.load_pem_x509_certificate((hsm.data_dir / "server.pem").read_bytes())
    verification.PolicyBuilder().store(store).build_server_verifier(
        x509.DNSName("localhost")
    ).verify(server, [])
    # ...while a certificate minted with ca.key for any other name is refused
    rogue_names: list[list[x509.GeneralName]] = [
        [x509.DNSName("login.microsoftonline.com")],
        [x509.DNSName("localhost"), x509.DNSName("evil.example")],
        [x509.IPAddress(ipaddress.ip_address("192.0.2.10"))],
        [x509.IPAddress(ipaddress.ip_address("fd00::2"))],
    ]
    for names in rogue_names:
        rogue_path = tmp_path / "rogue.pem"
        rogue = _issue(hsm.data_dir, names, rogue_path)
        result = _openssl_verify(hsm.ca, rogue_path)
        assert result.returncode != 0, names
        assert "subtree" in (result.stdout + result.stderr).lower(), names
        subject = names[-1]  # the name a client would connect to
        assert isinstance(subject, x509.DNSName | x509.IPAddress)
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(subject)
        with pytest.raises(verification.VerificationError):
            verifier.verify(rogue, [])
    # a loopback name inside the subtrees is fine
    ok_path = tmp_path / "ok.pem"
    ok_name = x509.IPAddress(ipaddress.ip_address("127.0.0.2"))
    ok = _issue(hsm.data_dir, [ok_name], ok_path)
    assert _openssl_verify(hsm.ca, ok_path).returncode == 0
    verification.PolicyBuilder().store(store).build_server_verifier(ok_name).verify(ok, [])


def test_unconstrained_ca_from_an_older_version_is_replaced(tmp_path: Path) -> None:
    from managed_hsm_emulator.datadir import DataDir
    from managed_hsm_emulator.tls import _constrained, ensure_certificates

    paths = DataDir(tmp_path / "d")
    paths.create()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = dt.datetime.now(dt.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths.ca_pem.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    paths.ca_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ensure_certificates(paths)
    ca = x509.load_pem_x509_certificate(paths.ca_pem.read_bytes())
    assert ca.serial_number != 1
    assert _constrained(ca)
    server = x509.load_pem_x509_certificate(paths.server_pem.read_bytes())
    server.verify_directly_issued_by(ca)


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_the_server_certificate_verifies_under_the_constrained_ca(
    hsm: EmulatorHandle, name: str
) -> None:
    ctx = client_context(str(hsm.ca))  # hostname checking on
    with (
        socket.create_connection(("127.0.0.1", hsm.port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname=name) as tls,
    ):
        assert tls.getpeercert()
