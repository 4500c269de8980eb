"""Key attestations: Managed HSM's JSON shape, signed by the emulator's TEST PKI; refused by
byok-package without --trust-test-root, accepted with it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.keys import KeyClient
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from emulator_support import create_kek, jwk_for, package_in_process

from managed_hsm_emulator.attestation import ROOT_CN, AttestationAuthority
from managed_hsm_emulator.datadir import DataDir
from managed_hsm_emulator.testing import EmulatorHandle
from offline_packager.attestation import load_test_root, pinned_roots, verify_kek_attestation
from offline_packager.errors import AttestationError
from offline_packager.kek import check_kek
from offline_packager.kid import parse_kid
from offline_packager.package_format import b64url_decode
from offline_packager.target_keys import TargetKey

NOW = dt.datetime.now(dt.UTC)


def _get(hsm: EmulatorHandle, path: str, api_version: str = "7.6-preview.1") -> Any:
    return hsm.request("GET", f"{path}?api-version={api_version}")


def test_answer_has_managed_hsms_shape(
    hsm: EmulatorHandle, client: KeyClient, tmp_path: Path
) -> None:
    kek = create_kek(hsm, client, "att-kek", tmp_path, size=3072)
    name, version = kek.kid.split("/")[-2:]
    for path in (f"/keys/{name}/{version}/attestation", f"/keys/{name}/attestation"):
        response = _get(hsm, path)
        assert response.status == 200, response.body
        body = response.body
        assert body["key"]["kid"] == kek.kid
        assert body["key"]["key_ops"] == ["import"]
        attestation = body["attributes"]["attestation"]
        assert set(attestation) == {"certificatePemFile", "privateKeyAttestation", "version"}
        assert attestation["version"] == "MRVL-1"
        assert "=" not in attestation["privateKeyAttestation"]  # base64url without padding
        pem = b64url_decode(attestation["certificatePemFile"])
        assert len(x509.load_pem_x509_certificates(pem)) == 4
    # the SDK (api-version 2025-07-01, its own get_key_attestation) reads the same answer
    sdk = client.get_key_attestation(name, version).properties.attestation
    assert sdk is not None
    assert sdk.version == "MRVL-1"
    assert sdk.private_key_attestation
    assert sdk.public_key_attestation is None


def test_verified_with_the_test_root_refused_without(
    hsm: EmulatorHandle, client: KeyClient, tmp_path: Path
) -> None:
    kek = create_kek(hsm, client, "att-kek-2", tmp_path)
    name, version = kek.kid.split("/")[-2:]
    data = json.dumps(_get(hsm, f"/keys/{name}/{version}/attestation").body).encode()
    public = check_kek(kek.public_key)
    with pytest.raises(AttestationError) as refused:
        verify_kek_attestation(data, public, now=NOW, kek_kid=parse_kid(kek.kid))
    assert refused.value.reason == "attestation_chain_invalid"
    root = load_test_root((hsm.data_dir / "attestation-test-root.pem").read_bytes())
    result = verify_kek_attestation(
        data,
        public,
        now=NOW,
        kek_kid=parse_kid(kek.kid),
        anchors=[*pinned_roots(require_all=False), root],
    )
    assert result.trust_anchor == "test-root"
    assert result.attested_key_id == kek.kid
    assert result.attributes["local"] is True
    assert result.attributes["extractable"] is False


def test_an_imported_key_is_not_attested_as_generated_in_the_hsm(
    hsm: EmulatorHandle, client: KeyClient, targets: dict[str, TargetKey], tmp_path: Path
) -> None:
    """A key someone imported (here: an RSA key posing as a KEK) may exist outside the HSM."""
    kek = create_kek(hsm, client, "att-kek-3", tmp_path)
    target = targets["rsa-2048"]
    package = package_in_process(kek.public_key, kek.kid, target.plaintext.reveal())
    imported = client.import_key(
        "att-imported", jwk_for(target.type, package), hardware_protected=True
    )
    assert imported.id is not None
    name, version = imported.id.split("/")[-2:]
    data = json.dumps(_get(hsm, f"/keys/{name}/{version}/attestation").body).encode()
    root = load_test_root((hsm.data_dir / "attestation-test-root.pem").read_bytes())
    public = target.public.public_key
    assert isinstance(public, rsa.RSAPublicKey)
    with pytest.raises(AttestationError) as refused:
        verify_kek_attestation(data, check_kek(public), now=NOW, anchors=[root])
    assert refused.value.reason in {"attestation_key_extractable", "attestation_key_mismatch"}
    # the service's key_ops are not import-only either; the signed CKA_LOCAL alone also refuses
    body = json.loads(data)
    body["key"].pop("key_ops")
    with pytest.raises(AttestationError) as local:
        verify_kek_attestation(
            json.dumps(body).encode(), check_kek(public), now=NOW, anchors=[root]
        )
    assert local.value.reason == "attestation_key_extractable"
    assert "not generated inside the HSM" in local.value.message


def test_symmetric_keys_get_a_public_key_attestation_too(
    client: KeyClient, hsm: EmulatorHandle
) -> None:
    key = client.create_oct_key("att-aes", size=256, hardware_protected=True)
    assert key.id is not None
    body = _get(hsm, "/keys/att-aes/attestation", api_version="2025-07-01").body
    attestation = body["attributes"]["attestation"]
    assert attestation["publicKeyAttestation"] == attestation["privateKeyAttestation"]


def test_errors_are_key_vaults(hsm: EmulatorHandle) -> None:
    missing = _get(hsm, "/keys/no-such-key/attestation")
    assert missing.status == 404
    assert missing.body["error"]["code"] == "KeyNotFound"
    assert hsm.request("POST", "/keys/no-such-key/attestation?api-version=7.6", {}).status == 405
    assert _get(hsm, "/keys/no-such-key/attestation", api_version="7.6-preview.9").status == 400


def test_the_test_pki_is_labelled_constrained_and_kept(tmp_path: Path) -> None:
    paths = DataDir(tmp_path)
    paths.create()
    first = AttestationAuthority.ensure(paths)
    root_pem = paths.attestation_test_root.read_bytes()
    root = x509.load_pem_x509_certificate(root_pem)
    assert root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == ROOT_CN
    assert root.extensions.get_extension_for_class(x509.NameConstraints).critical
    assert load_test_root(root_pem).test
    # only the partition key is on disk: nothing more can be issued under the TEST root
    keys = [p.name for p in tmp_path.iterdir() if p.suffix == ".key"]
    assert keys == ["attestation-partition.key"]
    assert paths.attestation_partition_key.stat().st_mode & 0o777 == 0o600
    # a restart keeps it; a lost partition key makes a new PKI (a new root)
    AttestationAuthority.ensure(paths)
    assert paths.attestation_test_root.read_bytes() == root_pem
    paths.attestation_partition_key.write_bytes(b"garbage")
    AttestationAuthority.ensure(paths)
    assert paths.attestation_test_root.read_bytes() != root_pem
    assert first is not None


def test_same_key_version_gets_the_same_attestation(
    hsm: EmulatorHandle, client: KeyClient, tmp_path: Path
) -> None:
    """PKCS#1 v1.5 is deterministic: the same key version gets the same blob, so a custodian
    who downloads twice can compare SHA-256 values."""
    kek = create_kek(hsm, client, "att-kek-4", tmp_path)
    name, version = kek.kid.split("/")[-2:]
    one = _get(hsm, f"/keys/{name}/{version}/attestation").body["attributes"]["attestation"]
    two = _get(hsm, f"/keys/{name}/attestation").body["attributes"]["attestation"]
    assert one == two
