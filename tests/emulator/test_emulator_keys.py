"""Key management and cryptography through the real SDK clients."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.keys import JsonWebKey, KeyClient, KeyType
from azure.keyvault.keys.crypto import (
    EncryptionAlgorithm,
    KeyWrapAlgorithm,
    SignatureAlgorithm,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from emulator_support import error_of, jwk_int

from managed_hsm_emulator.testing import EmulatorHandle
from offline_packager.package_format import b64url_decode, b64url_encode

_VERSION = re.compile(r"^[0-9a-f]{32}$")


@pytest.mark.parametrize(
    ("kty", "size", "crv"),
    [
        ("RSA-HSM", 2048, None),
        ("RSA-HSM", 3072, None),
        ("RSA-HSM", 4096, None),
        ("EC-HSM", None, "P-256"),
        ("EC-HSM", None, "P-384"),
        ("EC-HSM", None, "P-521"),
        ("EC-HSM", None, "P-256K"),
        ("oct-HSM", 128, None),
        ("oct-HSM", 192, None),
        ("oct-HSM", 256, None),
    ],
)
def test_create_every_supported_type(
    hsm: EmulatorHandle, client: KeyClient, kty: str, size: int | None, crv: str | None
) -> None:
    name = f"create-{kty}-{size or crv}".lower()
    key = client.create_key(name, kty, size=size, curve=crv)
    assert key.key_type == kty
    assert key.id == f"{hsm.url}/keys/{name}/{key.properties.version}"
    assert _VERSION.match(key.properties.version or "")
    props = key.properties
    assert props.enabled is True
    assert props.created_on is not None
    assert props.recoverable_days == 7
    assert props.recovery_level == "CustomizedRecoverable+Purgeable"
    if kty == "RSA-HSM":
        assert jwk_int(key, "n").bit_length() == size
        assert jwk_int(key, "e") == 65537
    elif kty == "EC-HSM":
        assert key.key.crv == crv  # type: ignore[attr-defined]  # JsonWebKey fields are dynamic
    else:
        assert getattr(key.key, "k", None) is None  # secret never leaves the HSM


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"kty": "RSA-HSM", "key_size": 1024}, "unsupported_key_type"),
        ({"kty": "oct-HSM", "key_size": 512}, "unsupported_key_type"),
        ({"kty": "EC-HSM", "crv": "P-192"}, "unsupported_key_type"),
        ({"kty": "DSA"}, "bad_kty"),
        ({"kty": "EC-HSM", "key_ops": ["import"]}, "bad_key_ops"),
        ({"kty": "oct-HSM", "key_ops": ["import"]}, "bad_key_ops"),
        ({"kty": "RSA-HSM", "key_ops": ["import", "sign"]}, "import_not_alone"),
        ({"kty": "EC-HSM", "key_ops": ["encrypt"]}, "bad_key_ops"),
        ({"kty": "RSA-HSM", "key_ops": ["fly"]}, "bad_key_ops"),
        ({"kty": "RSA-HSM", "attributes": {"enabled": "yes"}}, "bad_attributes"),
        ({"kty": "RSA-HSM", "tags": {"a": 1}}, "bad_tags"),
    ],
)
def test_create_refusals(hsm: EmulatorHandle, body: dict[str, object], reason: str) -> None:
    resp = hsm.request("POST", "/keys/refused/create?api-version=7.6", body)
    assert resp.status == 400
    assert resp.body["error"]["code"] == "BadParameter"
    assert resp.body["error"]["innererror"]["code"] == reason


def test_get_latest_by_version_and_versions_list(hsm: EmulatorHandle, client: KeyClient) -> None:
    first = client.create_ec_key("versioned", curve="P-256", tags={"gen": "1"})
    second = client.create_ec_key("versioned", curve="P-256", tags={"gen": "2"})
    assert client.get_key("versioned").id == second.id  # GET /keys/versioned/
    assert client.get_key("versioned", first.properties.version).id == first.id
    assert hsm.request("GET", "/keys/versioned?api-version=7.6").body["key"]["kid"] == second.id
    listed = {p.version: p.tags for p in client.list_properties_of_key_versions("versioned")}
    assert listed == {
        first.properties.version: {"gen": "1"},
        second.properties.version: {"gen": "2"},
    }
    with pytest.raises(ResourceNotFoundError):
        client.get_key("versioned", "0" * 32)
    with pytest.raises(ResourceNotFoundError):
        client.get_key("never-created")


def test_names_are_case_insensitive(client: KeyClient) -> None:
    created = client.create_oct_key("MixedCase", size=128)
    assert client.get_key("mixedcase").id == created.id


def test_list_keys_pages_with_maxresults_and_next_link(
    hsm: EmulatorHandle, client: KeyClient
) -> None:
    for i in range(7):
        client.create_oct_key(f"page-{i}", size=128)
    since = hsm.last_request_seq()
    pages = client.list_properties_of_keys(max_page_size=3).by_page()
    names = [[p.name for p in page] for page in pages]
    flat = [n for page in names for n in page]
    assert len(flat) == len(set(flat))
    assert {f"page-{i}" for i in range(7)} <= set(flat)
    assert all(len(page) <= 3 for page in names)
    list_calls = [e for e in hsm.requests_seen(since) if e["path"] == "/keys"]
    assert len(list_calls) == len(names) >= 3
    # raw: the nextLink is absolute, on this host, and keeps maxresults
    first = hsm.request("GET", "/keys?api-version=7.6&maxresults=2").body
    assert first["nextLink"].startswith(f"{hsm.url}/keys?")
    assert "maxresults=2" in first["nextLink"]
    assert all("/" not in item["kid"].removeprefix(f"{hsm.url}/keys/") for item in first["value"])
    for bad in ("0", "26", "x"):
        resp = hsm.request("GET", f"/keys?api-version=7.6&maxresults={bad}")
        assert resp.status == 400


def test_versions_page(hsm: EmulatorHandle, client: KeyClient) -> None:
    made = [client.create_oct_key("many-versions", size=128).properties.version for _ in range(5)]
    pages = list(client.list_properties_of_key_versions("many-versions", max_page_size=2).by_page())
    seen = [p.version for page in pages for p in page]
    assert seen == made  # creation order, every version once
    assert len(list(pages)) >= 3


def test_update_attributes_tags_and_operations(client: KeyClient) -> None:
    key = client.create_rsa_key("updatable", size=2048)
    updated = client.update_key_properties(
        "updatable", key.properties.version, enabled=False, tags={"owner": "team"},
        key_operations=["sign", "verify"],
    )  # fmt: skip
    assert updated.properties.enabled is False
    assert updated.properties.tags == {"owner": "team"}
    assert updated.key_operations == ["sign", "verify"]
    assert client.get_key("updatable").key_operations == ["sign", "verify"]
    with pytest.raises(HttpResponseError) as exc:
        client.update_key_properties("updatable", key_operations=["import", "sign"])
    assert error_of(exc)[:2] == (400, "BadParameter")


def test_import_operation_only_on_generated_rsa_keys(hsm: EmulatorHandle) -> None:
    private = rsa.generate_private_key(65537, 2048)
    jwk = _rsa_private_jwk(private)
    resp = hsm.request(
        "PUT", "/keys/imported-kek?api-version=7.6", {"key": {**jwk, "key_ops": ["import"]}}
    )
    assert resp.status == 400
    assert "generated in this HSM" in resp.body["error"]["message"]


def _rsa_private_jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    n = key.private_numbers()

    def enc(v: int) -> str:
        return b64url_encode(v.to_bytes((v.bit_length() + 7) // 8, "big"))

    return {
        "kty": "RSA", "n": enc(n.public_numbers.n), "e": enc(n.public_numbers.e), "d": enc(n.d),
        "p": enc(n.p), "q": enc(n.q), "dp": enc(n.dmp1), "dq": enc(n.dmq1), "qi": enc(n.iqmp),
    }  # fmt: skip


def test_plaintext_jwk_import_of_rsa_ec_and_oct(hsm: EmulatorHandle, client: KeyClient) -> None:
    private = rsa.generate_private_key(65537, 3072)
    fields = {k: b64url_decode(v) for k, v in _rsa_private_jwk(private).items() if k != "kty"}
    key = client.import_key("plain-rsa", JsonWebKey(kty=KeyType.rsa, **fields))
    assert key.key_type == "RSA-HSM"
    assert jwk_int(key, "n") == private.public_key().public_numbers().n
    digest = hashlib.sha256(b"m").digest()
    sig = hsm.crypto_client(key).sign(SignatureAlgorithm.ps256, digest).signature
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    private.public_key().verify(
        sig,
        digest,
        padding.PSS(padding.MGF1(hashes.SHA256()), 32),
        utils.Prehashed(hashes.SHA256()),
    )
    ec_key = ec.generate_private_key(ec.SECP384R1())
    nums = ec_key.private_numbers()
    imported_ec = client.import_key(
        "plain-ec",
        JsonWebKey(
            kty="EC", crv="P-384", d=nums.private_value.to_bytes(48, "big"),
            x=nums.public_numbers.x.to_bytes(48, "big"), y=nums.public_numbers.y.to_bytes(48, "big"),
        ),
    )  # fmt: skip
    assert imported_ec.key_type == "EC-HSM"
    aes = os.urandom(32)
    imported_oct = client.import_key("plain-oct", JsonWebKey(kty="oct", k=aes))
    assert imported_oct.key_type == "oct-HSM"
    bad = JsonWebKey(
        kty="EC", crv="P-384", d=nums.private_value.to_bytes(48, "big"),
        x=nums.public_numbers.y.to_bytes(48, "big"), y=nums.public_numbers.x.to_bytes(48, "big"),
    )  # fmt: skip
    with pytest.raises(HttpResponseError) as exc:
        client.import_key("plain-bad", bad)
    assert "do not match" in error_of(exc)[2]


def test_soft_delete_recover_and_purge(hsm: EmulatorHandle, client: KeyClient) -> None:
    key = client.create_ec_key("lifecycle", curve="P-256")
    poller = client.begin_delete_key("lifecycle", _polling_interval=0)
    poller.wait()
    deleted = poller.result()
    assert deleted.recovery_id == f"{hsm.url}/deletedkeys/lifecycle"
    assert deleted.deleted_date is not None
    assert deleted.scheduled_purge_date is not None
    assert (deleted.scheduled_purge_date - deleted.deleted_date).days == 7
    with pytest.raises(ResourceNotFoundError):
        client.get_key("lifecycle")
    assert "lifecycle" in {d.name for d in client.list_deleted_keys()}
    assert client.get_deleted_key("lifecycle").id == key.id
    # the name is held while the key is recoverable
    with pytest.raises(ResourceExistsError):
        client.create_ec_key("lifecycle", curve="P-256")
    recover = client.begin_recover_deleted_key("lifecycle", _polling_interval=0)
    recover.wait()
    assert client.get_key("lifecycle").id == key.id
    client.begin_delete_key("lifecycle", _polling_interval=0).wait()
    since = hsm.last_request_seq()
    client.purge_deleted_key("lifecycle")
    assert [e["status"] for e in hsm.requests_seen(since)] == [204]
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_key("lifecycle")
    with pytest.raises(ResourceNotFoundError):
        client.purge_deleted_key("lifecycle")
    assert client.create_ec_key("lifecycle", curve="P-256").id != key.id


# --- cryptography ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key(client: KeyClient) -> object:
    return client.create_rsa_key("crypto-rsa", size=2048)


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_sign_verify(hsm: EmulatorHandle, rsa_key: object, alg: str) -> None:
    crypto = hsm.crypto_client(rsa_key)
    digest = hashlib.new(f"sha{alg[2:]}", b"data").digest()
    sig = crypto.sign(SignatureAlgorithm(alg), digest).signature
    assert crypto.verify(SignatureAlgorithm(alg), digest, sig).is_valid
    assert not crypto.verify(SignatureAlgorithm(alg), digest, bytes(len(sig))).is_valid
    # the service's own verify endpoint agrees
    key_id = rsa_key.id  # type: ignore[attr-defined]  # a KeyVaultKey
    path = key_id.removeprefix(hsm.url) + "/verify?api-version=7.6"
    body = {"alg": alg, "digest": b64url_encode(digest), "value": b64url_encode(sig)}
    assert hsm.request("POST", path, body).body == {"value": True}


@pytest.mark.parametrize(
    ("crv", "alg", "hash_name"),
    [("P-256", "ES256", "sha256"), ("P-384", "ES384", "sha384"), ("P-521", "ES512", "sha512"),
     ("P-256K", "ES256K", "sha256")],
)  # fmt: skip
def test_ec_sign_verify(
    hsm: EmulatorHandle, client: KeyClient, crv: str, alg: str, hash_name: str
) -> None:
    key = client.create_ec_key(f"crypto-ec-{crv}", curve=crv)
    crypto = hsm.crypto_client(key)
    digest = hashlib.new(hash_name, b"data").digest()
    sig = crypto.sign(SignatureAlgorithm(alg), digest).signature
    assert crypto.verify(SignatureAlgorithm(alg), digest, sig).is_valid
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not crypto.verify(SignatureAlgorithm(alg), digest, tampered).is_valid
    wrong_alg = "ES384" if alg != "ES384" else "ES256"
    with pytest.raises(HttpResponseError) as exc:
        crypto.sign(SignatureAlgorithm(wrong_alg), hashlib.sha384(b"x").digest())
    assert error_of(exc)[:2] == (400, "BadParameter")


@pytest.mark.parametrize("alg", ["RSA-OAEP", "RSA-OAEP-256"])
def test_rsa_encrypt_decrypt_and_wrap_unwrap(
    hsm: EmulatorHandle, rsa_key: object, alg: str
) -> None:
    crypto = hsm.crypto_client(rsa_key)
    enc = crypto.encrypt(EncryptionAlgorithm(alg), b"secret message")
    assert crypto.decrypt(EncryptionAlgorithm(alg), enc.ciphertext).plaintext == b"secret message"
    cek = os.urandom(32)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm(alg), cek)
    assert crypto.unwrap_key(KeyWrapAlgorithm(alg), wrapped.encrypted_key).key == cek


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_aes_cbc_gcm_and_key_wrap(hsm: EmulatorHandle, client: KeyClient, bits: int) -> None:
    key = client.create_oct_key(f"crypto-aes-{bits}", size=bits)
    crypto = hsm.crypto_client(key)
    iv = os.urandom(16)
    cbc = EncryptionAlgorithm(f"A{bits}CBC")
    enc = crypto.encrypt(cbc, b"0123456789abcdef" * 2, iv=iv)
    assert enc.iv == iv
    assert crypto.decrypt(cbc, enc.ciphertext, iv=iv).plaintext == b"0123456789abcdef" * 2
    pad = EncryptionAlgorithm(f"A{bits}CBCPAD")
    path = (key.id or "").removeprefix(hsm.url)
    raw = hsm.request(
        "POST", f"{path}/encrypt?api-version=7.6",
        {"alg": pad.value, "value": b64url_encode(b"odd length"), "iv": b64url_encode(iv)},
    ).body  # fmt: skip
    back = hsm.request(
        "POST", f"{path}/decrypt?api-version=7.6",
        {"alg": pad.value, "value": raw["value"], "iv": b64url_encode(iv)},
    ).body  # fmt: skip
    assert b64url_decode(back["value"]) == b"odd length"
    if bits != 192:
        gcm = EncryptionAlgorithm(f"A{bits}GCM")
        enc = crypto.encrypt(gcm, b"gcm data", additional_authenticated_data=b"aad")
        assert enc.iv is not None
        assert enc.tag is not None
        dec = crypto.decrypt(
            gcm, enc.ciphertext, iv=enc.iv, authentication_tag=enc.tag,
            additional_authenticated_data=b"aad",
        )  # fmt: skip
        assert dec.plaintext == b"gcm data"
        with pytest.raises(HttpResponseError) as exc:
            crypto.decrypt(
                gcm, enc.ciphertext, iv=enc.iv, authentication_tag=enc.tag,
                additional_authenticated_data=b"other",
            )  # fmt: skip
        assert "decryption failed" in error_of(exc)[2]
    # AES key wrap goes through REST: the SDK would do A*KW locally with a key it lacks
    cek = os.urandom(32)
    kw = f"A{bits}KW"
    wrapped = hsm.request(
        "POST", f"{path}/wrapkey?api-version=7.6", {"alg": kw, "value": b64url_encode(cek)}
    ).body["value"]
    unwrapped = hsm.request(
        "POST", f"{path}/unwrapkey?api-version=7.6", {"alg": kw, "value": wrapped}
    ).body["value"]
    assert b64url_decode(unwrapped) == cek
    wrong = "A256KW" if bits != 256 else "A128KW"
    resp = hsm.request(
        "POST", f"{path}/wrapkey?api-version=7.6", {"alg": wrong, "value": b64url_encode(cek)}
    )
    assert resp.status == 400
    assert resp.body["error"]["innererror"]["code"] == "bad_algorithm"


def test_operations_a_key_does_not_allow_are_refused(
    hsm: EmulatorHandle, client: KeyClient
) -> None:
    key = client.create_rsa_key("sign-only", size=2048, key_operations=["sign"])
    path = (key.id or "").removeprefix(hsm.url)
    resp = hsm.request(
        "POST", f"{path}/decrypt?api-version=7.6", {"alg": "RSA-OAEP", "value": "AAAA"}
    )
    assert resp.status == 403
    assert resp.body["error"]["innererror"]["code"] == "operation_not_allowed"
    kek = client.create_rsa_key("kek-no-sign", size=2048, key_operations=["import"])
    digest = b64url_encode(hashlib.sha256(b"x").digest())
    resp = hsm.request(
        "POST",
        f"{(kek.id or '').removeprefix(hsm.url)}/sign?api-version=7.6",
        {"alg": "RS256", "value": digest},
    )
    assert resp.status == 403


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"enabled": False}, "key_disabled"),
        ({"exp": 1_000_000_000}, "key_expired"),
        ({"nbf": 4_000_000_000}, "key_not_yet_valid"),
    ],
)
def test_disabled_or_out_of_window_keys_cannot_be_used(
    hsm: EmulatorHandle, client: KeyClient, attrs: dict[str, object], reason: str
) -> None:
    key = client.create_ec_key(f"unusable-{reason.replace('_', '-')}", curve="P-256")
    path = (key.id or "").removeprefix(hsm.url)
    digest = b64url_encode(hashlib.sha256(b"x").digest())
    assert (
        hsm.request(
            "POST", f"{path}/sign?api-version=7.6", {"alg": "ES256", "value": digest}
        ).status
        == 200
    )
    assert hsm.request("PATCH", f"{path}?api-version=7.6", {"attributes": attrs}).status == 200
    resp = hsm.request("POST", f"{path}/sign?api-version=7.6", {"alg": "ES256", "value": digest})
    assert resp.status == 403
    assert resp.body["error"]["innererror"]["code"] == reason
    # the key itself can still be read
    assert hsm.request("GET", f"{path}?api-version=7.6").status == 200


def test_random_bytes(client: KeyClient) -> None:
    a, b = client.get_random_bytes(32), client.get_random_bytes(32)
    assert len(a) == len(b) == 32
    assert a != b


def test_unknown_paths_and_methods(hsm: EmulatorHandle) -> None:
    assert hsm.request("GET", "/secrets?api-version=7.6").status == 404
    assert hsm.request("POST", "/keys?api-version=7.6", {}).status == 405
    resp = hsm.request(
        "POST", "/keys/x/create?api-version=7.6", None, headers={"Content-Length": "0"}
    )
    assert resp.status == 400
    assert resp.body["error"]["innererror"]["code"] == "bad_body"
