"""BYOK import through the real SDK: all ten target types, an OpenSSL-built package, refusals,
and no secret anywhere in the emulator's files or logs."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import JsonWebKey, KeyClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from emulator_support import (
    ALL_TYPES,
    Kek,
    all_files,
    assert_is_packaged_key,
    create_kek,
    error_of,
    jwk_for,
    jwk_int,
    openssl_package,
    package_in_process,
    package_with_cli,
    scan_for,
)

from managed_hsm_emulator.testing import EmulatorHandle
from offline_packager.keytypes import TARGET_TYPES
from offline_packager.package_format import b64url_encode
from offline_packager.target_keys import TargetKey


@pytest.fixture(scope="module")
def kek(hsm: EmulatorHandle, client: KeyClient, tmp_path_factory: pytest.TempPathFactory) -> Kek:
    return create_kek(hsm, client, "byok-kek", tmp_path_factory.mktemp("kek"))


def _refusal(client: KeyClient, name: str, jwk: JsonWebKey) -> tuple[int, str, str]:
    with pytest.raises(HttpResponseError) as exc:
        client.import_key(name, jwk, hardware_protected=True)
    return error_of(exc)


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_each_type_packaged_by_the_cli_imports_as_that_key(
    hsm: EmulatorHandle,
    client: KeyClient,
    kek: Kek,
    targets: dict[str, TargetKey],
    tmp_path: Path,
    type_name: str,
) -> None:
    target = targets[type_name]
    name = f"imported-{type_name}"
    package = package_with_cli(kek, target, tmp_path, name)
    imported = client.import_key(name, jwk_for(target.type, package), hardware_protected=True)
    assert imported.id is not None
    assert imported.id.startswith(f"{hsm.url}/keys/{name}/")
    assert imported.key_type == target.type.kty  # reported in the -HSM form
    assert_is_packaged_key(hsm, imported, target)
    # the same key through a fresh GET (the SDK's trailing-slash "latest" form)
    assert_is_packaged_key(hsm, client.get_key(name), target)


def test_package_built_with_the_openssl_cli_imports(
    hsm: EmulatorHandle, client: KeyClient, kek: Kek, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(65537, 2048)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    package = openssl_package(kek, der, tmp_path)
    imported = client.import_key(
        "from-openssl", jwk_for(TARGET_TYPES["rsa-2048"], package), hardware_protected=True
    )
    assert jwk_int(imported, "n") == key.public_key().public_numbers().n


def test_padded_key_hsm_and_pretty_printed_package_import(
    hsm: EmulatorHandle, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    target = targets["oct-128"]
    package = package_in_process(kek.public_key, kek.kid, target.plaintext.reveal())
    pretty = json.dumps(json.loads(package), indent=2).replace("\n", "\r\n").encode()
    body = {
        "key": {
            "kty": "oct-HSM",
            "key_ops": ["encrypt", "decrypt"],
            "key_hsm": base64.urlsafe_b64encode(pretty).decode(),  # padded
        },
        "Hsm": True,
    }
    resp = hsm.request("PUT", "/keys/padded?api-version=7.4", body)
    assert resp.status == 200, resp.body
    assert resp.body["key"]["kty"] == "oct-HSM"
    assert resp.body["key"]["key_ops"] == ["encrypt", "decrypt"]


def test_import_of_the_same_name_creates_a_new_version(
    client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    target = targets["ec-p256"]
    package = package_in_process(kek.public_key, kek.kid, target.plaintext.reveal())
    first = client.import_key("twice", jwk_for(target.type, package), hardware_protected=True)
    second = client.import_key("twice", jwk_for(target.type, package), hardware_protected=True)
    assert first.properties.version != second.properties.version
    versions = {p.version for p in client.list_properties_of_key_versions("twice")}
    assert versions == {first.properties.version, second.properties.version}


# --- refusals ---------------------------------------------------------------------------------


def test_wrong_kid_version_is_refused(
    client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    target = targets["oct-256"]
    other_version = kek.kid.rsplit("/", 1)[0] + "/" + "0" * 32
    package = package_in_process(kek.public_key, other_version, target.plaintext.reveal())
    status, code, message = _refusal(client, "r-version", jwk_for(target.type, package))
    assert (status, code) == (404, "KeyNotFound")
    assert "kek_not_found" in message
    assert "has no version" in message


def test_unknown_kek_is_refused(
    hsm: EmulatorHandle, client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    target = targets["oct-256"]
    kid = f"{hsm.url}/keys/no-such-kek/{'a' * 32}"
    package = package_in_process(kek.public_key, kid, target.plaintext.reveal())
    with pytest.raises(ResourceNotFoundError) as exc:
        client.import_key("r-unknown", jwk_for(target.type, package), hardware_protected=True)
    status, code, message = error_of(exc)
    assert (status, code) == (404, "KeyNotFound")
    assert "no KEK named no-such-kek" in message


def test_kek_of_another_hsm_is_refused(
    client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    target = targets["oct-256"]
    kid = "https://contoso.managedhsm.azure.net/keys/byok-kek/" + kek.kid.rsplit("/", 1)[1]
    package = package_in_process(kek.public_key, kid, target.plaintext.reveal())
    status, code, message = _refusal(client, "r-host", jwk_for(target.type, package))
    assert (status, code) == (400, "BadParameter")
    assert "kid_wrong_hsm" in message


def test_kek_with_other_operations_is_refused(
    hsm: EmulatorHandle,
    client: KeyClient,
    targets: dict[str, TargetKey],
    tmp_path: Path,
) -> None:
    key = client.create_rsa_key("not-a-kek", size=2048, key_operations=["wrapKey", "unwrapKey"])
    assert key.id is not None
    public = rsa.RSAPublicNumbers(65537, jwk_int(key, "n")).public_key()
    target = targets["oct-256"]
    package = package_in_process(public, key.id, target.plaintext.reveal())
    status, code, message = _refusal(client, "r-ops", jwk_for(target.type, package))
    assert (status, code) == (400, "BadParameter")
    assert "kek_not_import_only" in message


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"enabled": False}, "kek_disabled"),
        ({"expires_on": dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)}, "kek_expired"),
        ({"not_before": dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)}, "kek_not_yet_valid"),
    ],
)
def test_disabled_expired_or_future_kek_is_refused(
    hsm: EmulatorHandle,
    client: KeyClient,
    targets: dict[str, TargetKey],
    tmp_path: Path,
    attrs: dict[str, object],
    reason: str,
) -> None:
    name = f"kek-{reason.replace('_', '-')}"
    local_kek = create_kek(hsm, client, name, tmp_path)
    target = targets["oct-192"]
    package = package_in_process(local_kek.public_key, local_kek.kid, target.plaintext.reveal())
    client.import_key("r-state-ok", jwk_for(target.type, package), hardware_protected=True)
    client.update_key_properties(name, **attrs)  # type: ignore[arg-type]  # kwargs vary per case
    status, code, message = _refusal(client, "r-state", jwk_for(target.type, package))
    assert (status, code) == (400, "BadParameter")
    assert reason in message


def test_tampered_ciphertext_is_refused(
    client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    target = targets["ec-p384"]
    doc = json.loads(package_in_process(kek.public_key, kek.kid, target.plaintext.reveal()))
    raw = bytearray(base64.urlsafe_b64decode(doc["ciphertext"] + "=="))
    raw[-3] ^= 0x01  # inside the AES-KWP block
    doc["ciphertext"] = b64url_encode(bytes(raw))
    status, code, message = _refusal(
        client, "r-tamper", jwk_for(target.type, json.dumps(doc).encode())
    )
    assert (status, code) == (400, "BadParameter")
    assert "kwp_integrity" in message
    raw[10] ^= 0x01  # inside the RSA-OAEP block
    doc["ciphertext"] = b64url_encode(bytes(raw))
    status, code, message = _refusal(
        client, "r-tamper", jwk_for(target.type, json.dumps(doc).encode())
    )
    assert "rsa_unwrap_failed" in message


def test_rsa_1024_target_is_refused(client: KeyClient, kek: Kek) -> None:
    small = rsa.generate_private_key(65537, 1024)  # noqa: S505  # the refused size is the point
    der = small.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    package = package_in_process(kek.public_key, kek.kid, der)
    status, code, message = _refusal(client, "r-1024", jwk_for(TARGET_TYPES["rsa-2048"], package))
    assert (status, code) == (400, "BadParameter")
    assert "RSA-1024" in message
    assert "unsupported_target" in message


@pytest.mark.parametrize(
    ("packaged", "claimed_kty", "claimed_crv", "reason"),
    [
        ("ec-p256", "RSA-HSM", None, "kty_mismatch"),
        ("rsa-2048", "EC-HSM", "P-256", "kty_mismatch"),
        ("oct-256", "RSA-HSM", None, "kty_mismatch"),
        ("rsa-2048", "oct-HSM", None, "kty_mismatch"),
        ("ec-p256", "EC-HSM", "P-384", "crv_mismatch"),
        ("ec-p256k", "EC-HSM", "P-256", "crv_mismatch"),
    ],
)
def test_kty_or_crv_not_matching_the_unwrapped_key_is_refused(
    client: KeyClient,
    kek: Kek,
    targets: dict[str, TargetKey],
    packaged: str,
    claimed_kty: str,
    claimed_crv: str | None,
    reason: str,
) -> None:
    package = package_in_process(kek.public_key, kek.kid, targets[packaged].plaintext.reveal())
    jwk = JsonWebKey(kty=claimed_kty, crv=claimed_crv, t=package)
    status, code, message = _refusal(client, "r-mismatch", jwk)
    assert (status, code) == (400, "BadParameter")
    assert reason in message


@pytest.mark.parametrize(
    ("key_hsm", "reason"),
    [
        ("not base64url!", "bad_key_hsm"),
        (b64url_encode(b"not json at all"), "malformed_package"),
        (b64url_encode(b'{"schema_version": "1.0.0"}'), "malformed_package"),
        (b64url_encode(b"\x00\xff" * 50), "malformed_package"),
    ],
)
def test_garbage_key_hsm_is_refused(hsm: EmulatorHandle, key_hsm: str, reason: str) -> None:
    body = {"key": {"kty": "RSA-HSM", "key_hsm": key_hsm}, "Hsm": True}
    resp = hsm.request("PUT", "/keys/r-garbage?api-version=2025-07-01", body)
    assert resp.status == 400
    assert resp.body["error"]["code"] == "BadParameter"
    assert reason in resp.body["error"]["message"]
    assert resp.body["error"]["innererror"]["code"] == reason


def test_byok_needs_an_hsm_kty_and_ec_needs_crv(
    hsm: EmulatorHandle, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    package = package_in_process(kek.public_key, kek.kid, targets["ec-p256"].plaintext.reveal())
    for key, reason in (
        ({"kty": "EC", "crv": "P-256"}, "byok_needs_hsm_kty"),
        ({"kty": "EC-HSM"}, "crv_required"),
        ({"kty": "EC-HSM", "crv": "P-256", "key_ops": ["import"]}, "bad_key_ops"),
    ):
        body = {"key": {**key, "key_hsm": b64url_encode(package)}, "Hsm": True}
        resp = hsm.request("PUT", "/keys/r-kty?api-version=7.5", body)
        assert resp.status == 400, key
        assert resp.body["error"]["innererror"]["code"] == reason


def test_refusals_do_not_create_keys(
    hsm: EmulatorHandle, client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    # Self-contained: every refusal here uses a name of its own, then none of them exists.
    oct_target = targets["oct-256"]
    oct_package = package_in_process(kek.public_key, kek.kid, oct_target.plaintext.reveal())
    wrong_version = kek.kid.rsplit("/", 1)[0] + "/" + "0" * 32
    other_hsm = "https://contoso.managedhsm.azure.net/keys/byok-kek/" + "0" * 32
    doc = json.loads(oct_package)
    raw = bytearray(base64.urlsafe_b64decode(doc["ciphertext"] + "=="))
    raw[-3] ^= 0x01
    doc["ciphertext"] = b64url_encode(bytes(raw))
    cases: dict[str, JsonWebKey] = {
        # the refusal the secret scan below makes: an AES package claimed as RSA-HSM
        "nc-kty": JsonWebKey(kty="RSA-HSM", t=oct_package),
        "nc-version": jwk_for(
            oct_target.type,
            package_in_process(kek.public_key, wrong_version, oct_target.plaintext.reveal()),
        ),
        "nc-host": jwk_for(
            oct_target.type,
            package_in_process(kek.public_key, other_hsm, oct_target.plaintext.reveal()),
        ),
        "nc-tampered": jwk_for(oct_target.type, json.dumps(doc).encode()),
        "nc-crv": JsonWebKey(
            kty="EC-HSM",
            crv="P-384",
            t=package_in_process(kek.public_key, kek.kid, targets["ec-p256"].plaintext.reveal()),
        ),
    }
    for name, jwk in cases.items():
        status, _, message = _refusal(client, name, jwk)
        assert status in (400, 404), (name, message)
    garbage = {"key": {"kty": "RSA-HSM", "key_hsm": "not base64url!"}, "Hsm": True}
    assert hsm.request("PUT", "/keys/nc-garbage?api-version=7.6", garbage).status == 400
    refused = {*cases, "nc-garbage"}
    for name in refused:
        with pytest.raises(ResourceNotFoundError):
            client.get_key(name)
    listed = {p.name for p in client.list_properties_of_keys()}
    assert not listed & refused
    # and the check can fail: a name that was imported is found
    client.import_key("nc-control", jwk_for(oct_target.type, oct_package), hardware_protected=True)
    assert "nc-control" in {p.name for p in client.list_properties_of_keys()}


@pytest.mark.parametrize("type_name", ["rsa-2048", "ec-p256", "ec-p384"])
def test_softhsm_style_zero_padded_plaintext_is_refused_with_a_clear_reason(
    client: KeyClient, kek: Kek, targets: dict[str, TargetKey], type_name: str
) -> None:
    # SoftHSM2 pads an RSA/EC PKCS#8 plaintext with zeros to a multiple of 8 before KWP-wrapping
    # it (byok-facts.md section 5). Managed HSM's answer to that is not public: refuse, clearly.
    target = targets[type_name]
    der = target.plaintext.reveal()
    zeros = (-len(der)) % 8 or 7
    package = package_in_process(kek.public_key, kek.kid, der + bytes(zeros))
    status, code, message = _refusal(client, f"softhsm-{type_name}", jwk_for(target.type, package))
    assert (status, code) == (400, "BadParameter")
    assert "plaintext_trailing_zeros" in message
    assert "target_not_pkcs8" not in message
    assert f"{zeros} zero byte" in message
    assert "SoftHSM" in message
    assert "PKCS#11" in message
    # the same key without the padding imports
    exact = package_in_process(kek.public_key, kek.kid, der)
    client.import_key(f"softhsm-{type_name}", jwk_for(target.type, exact), hardware_protected=True)


# --- no secret anywhere ------------------------------------------------------------------------


def test_no_target_or_kek_secret_in_logs_responses_or_files(
    hsm: EmulatorHandle, client: KeyClient, kek: Kek, targets: dict[str, TargetKey]
) -> None:
    from managed_hsm_emulator.sealing import Sealer
    from offline_packager.secret import SecretBytes

    secrets_to_find: dict[str, bytes] = {}
    for type_name in ("rsa-2048", "ec-p521", "oct-256"):
        target = targets[type_name]
        package = package_in_process(kek.public_key, kek.kid, target.plaintext.reveal())
        client.import_key(
            f"scan-{type_name}", jwk_for(target.type, package), hardware_protected=True
        )
        # a refusal too: its message must not echo the package
        bad = JsonWebKey(kty="RSA-HSM", t=package) if type_name == "oct-256" else None
        if bad is not None:
            _, _, message = _refusal(client, "scan-refused", bad)
            assert b64url_encode(package)[:40] not in message
        secrets_to_find[type_name] = target.plaintext.reveal()
        private = (
            serialization.load_der_private_key(target.plaintext.reveal(), None)
            if (target.type.family != "oct")
            else None
        )
        if isinstance(private, rsa.RSAPrivateKey):
            d = private.private_numbers().d
            secrets_to_find["rsa-d"] = d.to_bytes((d.bit_length() + 7) // 8, "big")
        if isinstance(private, ec.EllipticCurvePrivateKey):
            d = private.private_numbers().private_value
            secrets_to_find["ec-d"] = d.to_bytes(66, "big")
    # the KEK's private key, recovered from the sealed store with the master key
    record = json.loads((hsm.data_dir / "keys" / "byok-kek.json").read_text())
    version = record["versions"][0]
    sealer = Sealer(SecretBytes((hsm.data_dir / "master.key").read_bytes()))
    with sealer.open(
        base64.b64decode(version["sealed"]), name="byok-kek", version=version["version"]
    ) as kek_der:
        secrets_to_find["kek-pkcs8"] = kek_der.reveal()
        kek_key = serialization.load_der_private_key(kek_der.reveal(), None)
    assert isinstance(kek_key, rsa.RSAPrivateKey)
    assert kek_key.public_key().public_numbers() == kek.public_key.public_numbers()
    files = [p for p in all_files(hsm.data_dir) if p.name not in ("master.key", "token.key")]
    assert any(p.name == "emulator.log" for p in files)
    assert any(p.name == "requests.jsonl" for p in files)
    for what, secret in secrets_to_find.items():
        assert scan_for(files, secret) == [], what
    # the scan itself can find things: a file that holds a secret is reported
    probe = hsm.data_dir.parent / "probe.bin"
    probe.write_bytes(b"x" + b64url_encode(secrets_to_find["oct-256"]).encode())
    # (the base64 needle matches too when the secret's base64 has no "+" or "/")
    assert "probe.bin:base64url" in scan_for([probe], secrets_to_find["oct-256"])
    assert scan_for([probe], b"\x00" * 32) == []
